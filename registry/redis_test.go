package registry_test

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/redistest"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/registry/registrytest"
)

// prefixes gives every contract subtest its own key prefix (and so its own
// events channel) on a shared server: an empty registry of its own.
var prefixes atomic.Int64

func openRedis(t testing.TB, o registry.RedisOptions) *registry.Redis {
	t.Helper()
	if o.Prefix == "" {
		o.Prefix = fmt.Sprintf("vpctest%d:", prefixes.Add(1))
	}
	r, err := registry.NewRedis(o)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestRedisContractStandalone(t *testing.T) {
	srv := redistest.Start(t)
	registrytest.Run(t, func(t *testing.T) registry.Registry {
		return openRedis(t, registry.RedisOptions{Addrs: []string{srv.Addr}})
	})
}

func TestRedisContractSentinel(t *testing.T) {
	s := redistest.StartSentinel(t)
	registrytest.Run(t, func(t *testing.T) registry.Registry {
		return openRedis(t, registry.RedisOptions{Addrs: s.Addrs, MasterName: s.MasterName})
	})
}

func TestRedisContractCluster(t *testing.T) {
	c := redistest.StartCluster(t, 3)
	registrytest.Run(t, func(t *testing.T) registry.Registry {
		return openRedis(t, registry.RedisOptions{Addrs: c.Addrs, Cluster: true})
	})
}

func redisRoute(target, session string, gen uint64) registry.Route {
	r := testRoute(target, "id-1", session, gen)
	r.Registered = time.Date(2026, 11, 25, 8, 0, 0, 123456789, time.UTC)
	return r
}

// The record is readable by any Redis client under the documented key.
func TestRedisKeyFormat(t *testing.T) {
	srv := redistest.Start(t)
	r := openRedis(t, registry.RedisOptions{Addrs: []string{srv.Addr}, Prefix: "vpcreach:"})
	defer r.Close()
	rt := redisRoute("10.1.0.5:6379", "sess-1", 1764057600000000001)
	rt.Network = "vpc-a"
	if err := r.Register(t.Context(), rt, time.Minute); err != nil {
		t.Fatal(err)
	}
	const name = "vpcreach:route:{vpc-a/10.1.0.5:6379}"
	if got := r.KeyName(rt.Key); got != name {
		t.Fatalf("KeyName = %q, want %q", got, name)
	}
	got := srv.Do(t, "HGETALL", name)
	for _, want := range []string{"network vpc-a", "target 10.1.0.5:6379", "proxy 192.0.2.10:31001",
		"relay 192.0.2.10:7443", "agent agent-1", "identity id-1", "server server-1", "session sess-1",
		"generation 1764057600000000001", "registered 2026-11-25T08:00:00.123456789Z"} {
		if !strings.Contains(got, strings.Replace(want, " ", "\n", 1)) {
			t.Errorf("HGETALL %s = %q; missing %q", name, got, want)
		}
	}
	ttl := srv.Do(t, "PTTL", name)
	var ms int
	if _, err := fmt.Sscan(ttl, &ms); err != nil || ms <= 0 || ms > 60000 {
		t.Errorf("PTTL = %q, want a lease of at most 60000 ms", ttl)
	}
	v6 := redisRoute("[2001:db8::5]:443", "sess-2", 1)
	if err := r.Register(t.Context(), v6, time.Minute); err != nil {
		t.Fatal(err)
	}
	if got := srv.Do(t, "HGET", "vpcreach:route:{[2001:db8::5]:443}", "target"); got != "[2001:db8::5]:443" {
		t.Errorf("IPv6 record target = %q", got)
	}
}

// A malformed record is an error naming the key, not a zero route.
func TestRedisBadRecord(t *testing.T) {
	srv := redistest.Start(t)
	r := openRedis(t, registry.RedisOptions{Addrs: []string{srv.Addr}, Prefix: "bad:"})
	defer r.Close()
	k := registry.Key{Addr: netip.MustParseAddrPort("10.1.0.5:80")}
	srv.Do(t, "HSET", r.KeyName(k), "target", "10.1.0.5:80", "session", "s", "generation", "-1")
	_, err := r.Lookup(t.Context(), k)
	if err == nil || !strings.Contains(err.Error(), "bad record") || !strings.Contains(err.Error(), "generation") {
		t.Fatalf("Lookup of a malformed record = %v, want a 'bad record ... generation' error", err)
	}
}

// Redis restarted with no data: a renewal re-creates the record, and the
// watcher reports the gap in events.
func TestRedisRestartEmpty(t *testing.T) {
	srv := redistest.Start(t)
	r := openRedis(t, registry.RedisOptions{Addrs: []string{srv.Addr}})
	defer r.Close()
	events, err := r.Watch(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	rt := redisRoute("10.1.0.5:6379", "sess-1", 5)
	if err := r.Register(t.Context(), rt, time.Minute); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, events, registry.EventPut)
	srv.Kill(t)
	if err := r.Renew(t.Context(), rt, time.Minute); err == nil {
		t.Fatal("Renew with Redis killed succeeded")
	}
	srv.Restart(t)
	if _, err := r.Lookup(t.Context(), rt.Key); !errors.Is(err, registry.ErrNotFound) {
		// The first command after the restart may meet a dead pooled
		// connection; a second one must not.
		if _, err := r.Lookup(t.Context(), rt.Key); !errors.Is(err, registry.ErrNotFound) {
			t.Fatalf("Lookup after an empty restart = %v, want ErrNotFound", err)
		}
	}
	if err := r.Renew(t.Context(), rt, time.Minute); err != nil {
		t.Fatalf("Renew after the restart: %v", err)
	}
	got, err := r.Lookup(t.Context(), rt.Key)
	if err != nil || got.Session != "sess-1" {
		t.Fatalf("Lookup after the renewal = %+v, %v", got, err)
	}
	waitEvent(t, events, registry.EventReset)
}

func waitEvent(t *testing.T, events <-chan registry.Event, typ registry.EventType) registry.Event {
	t.Helper()
	timeout := time.After(15 * time.Second)
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				t.Fatal("events channel closed")
			}
			if ev.Type == typ {
				return ev
			}
		case <-timeout:
			t.Fatalf("no event of type %d within 15 s", typ)
		}
	}
}

// Listing walks every master: routes spread over the slots of all three.
func TestRedisClusterListWalksEveryMaster(t *testing.T) {
	c := redistest.StartCluster(t, 3)
	r := openRedis(t, registry.RedisOptions{Addrs: c.Addrs, Cluster: true})
	defer r.Close()
	const n = 60
	for i := range n {
		rt := redisRoute(fmt.Sprintf("10.1.%d.%d:80", i/250, i%250+1), fmt.Sprintf("s%d", i), 1)
		if err := r.Register(t.Context(), rt, time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	for _, node := range c.Nodes {
		if got := node.Do(t, "DBSIZE"); got == "0" {
			t.Fatalf("master %s holds no route: keys are not spread by their hash tags", node.Addr)
		}
	}
	all, err := r.List(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != n {
		t.Fatalf("List returned %d routes, want %d", len(all), n)
	}
}

// After a Sentinel failover the registry follows the new master.
func TestRedisSentinelFailover(t *testing.T) {
	s := redistest.StartSentinel(t)
	r := openRedis(t, registry.RedisOptions{Addrs: s.Addrs, MasterName: s.MasterName})
	defer r.Close()
	rt := redisRoute("10.1.0.5:6379", "sess-1", 1)
	if err := r.Register(t.Context(), rt, time.Minute); err != nil {
		t.Fatal(err)
	}
	old := s.Master.Addr
	s.Failover(t)
	if s.Master.Addr == old {
		t.Fatal("failover did not change the master")
	}
	// Until the old master is demoted, a write may still land there and
	// be lost: the renewal loop's re-assertion is what covers that, so
	// the test renews until the new master holds the record.
	rt2 := redisRoute("10.1.0.6:6379", "sess-2", 1)
	testutil.Eventually(t, 10*time.Second, "the route renewed onto the new master", func() bool {
		return r.Renew(t.Context(), rt2, time.Minute) == nil &&
			s.Master.Do(t, "HGET", r.KeyName(rt2.Key), "session") == "sess-2"
	})
}

// The cache over a real Redis serves stale routes while Redis is down and
// fresh ones once it is back.
func TestRedisCacheServesStaleWhileDown(t *testing.T) {
	srv := redistest.Start(t)
	r := openRedis(t, registry.RedisOptions{Addrs: []string{srv.Addr}})
	defer r.Close()
	c := registry.NewCache(r, registry.CacheOptions{Fresh: 50 * time.Millisecond, MaxStale: time.Minute})
	rt := redisRoute("10.1.0.5:6379", "sess-1", 1)
	if err := r.Register(t.Context(), rt, time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Lookup(t.Context(), rt.Key); err != nil {
		t.Fatal(err)
	}
	srv.Kill(t)
	testutil.Eventually(t, 5*time.Second, "a stale answer while Redis is down", func() bool {
		got, err := c.Lookup(t.Context(), rt.Key)
		if err != nil || got.Session != "sess-1" {
			t.Fatalf("Lookup with Redis down = %+v, %v; want the stale route", got, err)
		}
		return c.Stats.Stale.Load() > 0
	})
	other := registry.Key{Addr: netip.MustParseAddrPort("10.9.9.9:9")}
	if _, err := c.Lookup(t.Context(), other); err == nil || errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("uncached lookup with Redis down = %v, want a store error", err)
	}
}

// The ACL documented in SECURITY.md is enough for a member and socks5d:
// the contract suite passes as that user, limited to its key prefix.
func TestRedisACLUserFromSecurityDoc(t *testing.T) {
	srv := redistest.Start(t)
	if got := srv.Do(t, "ACL", "SETUSER", "vpcreach", "on", ">acl-password-0123", "~vpcreach:*", "&vpcreach:*",
		"+@read", "+@write", "+@scripting", "+@pubsub", "+ping", "+info", "-@dangerous"); got != "OK" {
		t.Fatalf("ACL SETUSER: %s", got)
	}
	registrytest.Run(t, func(t *testing.T) registry.Registry {
		return openRedis(t, registry.RedisOptions{Addrs: []string{srv.Addr}, Username: "vpcreach",
			Password: "acl-password-0123", Prefix: fmt.Sprintf("vpcreach:t%d:", prefixes.Add(1))})
	})
	// Outside its prefix the user can do nothing.
	r := openRedis(t, registry.RedisOptions{Addrs: []string{srv.Addr}, Username: "vpcreach",
		Password: "acl-password-0123", Prefix: "other:"})
	defer r.Close()
	if err := r.Register(t.Context(), redisRoute("10.1.0.5:6379", "s", 1), time.Minute); err == nil {
		t.Fatal("the ACL user wrote outside its key prefix")
	}
}
