package redistest

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

// Sentinel is a master, one replica and one redis-sentinel watching them.
type Sentinel struct {
	MasterName string   // name the sentinel monitors the master under
	Addrs      []string // sentinel addresses
	Sentinels  []*Server
	Master     *Server
	Replica    *Server
}

// sentinelTimeout bounds each wait on the sentinel's view of the world.
const sentinelTimeout = 20 * time.Second

// StartSentinel starts a master, a replica of it and one sentinel (quorum
// 1, down-after-milliseconds 1000, failover-timeout 5000), and returns
// once writes to the master stream to the replica and the sentinel reports
// the master and a healthy replica, so that Failover can proceed at once.
// Both servers start empty.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	sentinelBin := testutil.NeedBinary(t, "redis-sentinel")
	// The default 5 s delay before a diskless full sync would dominate.
	fast := []string{"--repl-diskless-sync-delay", "0"}
	s := &Sentinel{MasterName: "vpcmaster"}
	s.Master = Start(t, fast...)
	host, port, _ := net.SplitHostPort(s.Master.Addr)
	s.Replica = Start(t, append(fast, "--replicaof", host, port)...)
	testutil.Eventually(t, sentinelTimeout, "replica "+s.Replica.Addr+" to sync", func() bool {
		return infoField(s.Replica.Addr, "replication", "master_link_status") == "up"
	})
	// "up" is the replica's view: the master streams writes only once it
	// has reaped its sync child and had the replica's first ACK, up to a
	// second later. A write made before that is lost by a failover, and
	// WAIT may even count the replica (seen with 7.0.15). So wait until a
	// write, and then its deletion, have reached the replica.
	const probe = "redistest:probe"
	s.Master.Do(t, "SET", probe, "1")
	testutil.Eventually(t, sentinelTimeout, "a write to reach replica "+s.Replica.Addr, func() bool {
		v, err := do(s.Replica.Addr, "GET", probe)
		return err == nil && v == "1"
	})
	s.Master.Do(t, "DEL", probe)
	testutil.Eventually(t, sentinelTimeout, "a delete to reach replica "+s.Replica.Addr, func() bool {
		v, err := do(s.Replica.Addr, "EXISTS", probe)
		return err == nil && v == int64(0)
	})

	// Sentinel insists on a writable config file (it rewrites it); the
	// port, dir and log come from start's command-line arguments.
	conf := filepath.Join(t.TempDir(), "sentinel.conf")
	text := fmt.Sprintf("sentinel monitor %[1]s %[2]s %[3]s 1\n"+
		"sentinel down-after-milliseconds %[1]s 1000\n"+
		"sentinel failover-timeout %[1]s 5000\n", s.MasterName, host, port)
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	sent := start(t, sentinelBin, conf, false, nil)
	s.Sentinels = []*Server{sent}
	s.Addrs = []string{sent.Addr}

	testutil.Eventually(t, sentinelTimeout, "sentinel to report master "+s.Master.Addr, func() bool {
		return s.masterAddr() == s.Master.Addr
	})
	testutil.Eventually(t, sentinelTimeout, "sentinel to see healthy replica "+s.Replica.Addr, func() bool {
		return s.replicaHealthy(s.Replica.Addr)
	})
	return s
}

// masterAddr asks the first sentinel for the master's address ("" on error).
func (s *Sentinel) masterAddr() string {
	v, err := do(s.Addrs[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", s.MasterName)
	a, ok := v.([]any)
	if err != nil || !ok || len(a) != 2 {
		return ""
	}
	return net.JoinHostPort(render(a[0]), render(a[1]))
}

// replicaHealthy reports whether the first sentinel lists addr as a replica
// with no trouble flags (not down, not disconnected) and a working link to
// its master: what SENTINEL FAILOVER needs to pick it.
func (s *Sentinel) replicaHealthy(addr string) bool {
	v, err := do(s.Addrs[0], "SENTINEL", "REPLICAS", s.MasterName)
	list, ok := v.([]any)
	if err != nil || !ok {
		return false
	}
	for _, r := range list {
		fields, _ := r.([]any) // flat name, value, name, value, ...
		m := map[string]string{}
		for i := 0; i+1 < len(fields); i += 2 {
			m[render(fields[i])] = render(fields[i+1])
		}
		if m["name"] == addr {
			return m["flags"] == "slave" && m["master-link-status"] == "ok"
		}
	}
	return false
}

// Failover asks the sentinel for a failover (SENTINEL FAILOVER), waits
// until it reports the replica as master and that server reports
// role:master (so it accepts writes), then swaps s.Master and s.Replica.
//
// As with any Sentinel failover, the old master (now s.Replica) keeps
// acting as a master until the sentinel reconfigures it as a replica of
// the new one, about 10 s later; Failover does not wait for that. So a
// second Failover right after the first takes those 10 s too: the
// sentinel refuses it until the old master is a healthy replica again.
func (s *Sentinel) Failover(t testing.TB) {
	t.Helper()
	// The sentinel refuses (NOGOODSLAVE) until it has fresh INFO from a
	// healthy replica, so retry until it accepts.
	var reply any
	var err error
	if !testutil.WaitFor(sentinelTimeout, func() bool {
		reply, err = do(s.Addrs[0], "SENTINEL", "FAILOVER", s.MasterName)
		return reply == "OK"
	}) {
		t.Fatalf("redistest: SENTINEL FAILOVER not accepted within %v: %s %v", sentinelTimeout, render(reply), err)
	}
	next := s.Replica
	testutil.Eventually(t, sentinelTimeout, "sentinel to report new master "+next.Addr, func() bool {
		return s.masterAddr() == next.Addr && infoField(next.Addr, "replication", "role") == "master"
	})
	s.Master, s.Replica = next, s.Master
}
