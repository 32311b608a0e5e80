package registry_test

import (
	"context"
	"errors"
	"net/netip"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/registry/registrytest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestMemoryContract(t *testing.T) {
	registrytest.Run(t, func(t *testing.T) registry.Registry {
		return registry.NewMemory(nil)
	})
}

// fakeClock is a settable clock for the memory backend.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

var t0 = time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)

func newFake(t *testing.T) (*registry.Memory, *fakeClock) {
	t.Helper()
	c := &fakeClock{now: t0}
	m := registry.NewMemory(c.Now)
	t.Cleanup(func() { _ = m.Close() })
	return m, c
}

func testRoute(target, identity, session string, gen uint64) registry.Route {
	return registry.Route{
		Key:        registry.Key{Addr: netip.MustParseAddrPort(target)},
		Proxy:      netip.MustParseAddrPort("192.0.2.10:31001"),
		Relay:      netip.MustParseAddrPort("192.0.2.10:7443"),
		Agent:      "agent-1",
		Identity:   identity,
		Server:     "server-1",
		Session:    session,
		Generation: gen,
	}
}

func live(t *testing.T, m *registry.Memory, k registry.Key) bool {
	t.Helper()
	_, err := m.Lookup(context.Background(), k)
	switch {
	case err == nil:
		return true
	case errors.Is(err, registry.ErrNotFound):
		return false
	default:
		t.Fatalf("Lookup: %v", err)
		return false
	}
}

func listLen(t *testing.T, m *registry.Memory) int {
	t.Helper()
	rs, err := m.List(context.Background())
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	return len(rs)
}

func TestMemoryExpiresExactlyAtTTL(t *testing.T) {
	m, c := newFake(t)
	ctx := context.Background()
	r := testRoute("10.0.0.1:80", "id-a", "sess-a", 1)
	const ttl = 10 * time.Second
	if err := m.Register(ctx, r, ttl); err != nil {
		t.Fatal(err)
	}
	c.Set(t0.Add(ttl - time.Nanosecond))
	if !live(t, m, r.Key) || listLen(t, m) != 1 {
		t.Fatal("route gone 1 ns before its TTL")
	}
	c.Set(t0.Add(ttl))
	if live(t, m, r.Key) {
		t.Fatal("route live at its TTL")
	}
	if n := listLen(t, m); n != 0 {
		t.Fatalf("List has %d routes after expiry, want 0", n)
	}
}

func TestMemoryListSkipsExpired(t *testing.T) {
	m, c := newFake(t)
	ctx := context.Background()
	short := testRoute("10.0.0.1:80", "id-a", "sess-a", 1)
	long := testRoute("10.0.0.2:80", "id-a", "sess-b", 1)
	if err := m.Register(ctx, short, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := m.Register(ctx, long, time.Minute); err != nil {
		t.Fatal(err)
	}
	c.Set(t0.Add(time.Second))
	rs, err := m.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 || rs[0].Key != long.Key {
		t.Fatalf("List = %+v, want only %v", rs, long.Key)
	}
}

func TestMemoryRenewExtendsFromNow(t *testing.T) {
	m, c := newFake(t)
	ctx := context.Background()
	r := testRoute("10.0.0.1:80", "id-a", "sess-a", 1)
	const ttl = 10 * time.Second
	if err := m.Register(ctx, r, ttl); err != nil {
		t.Fatal(err)
	}
	c.Set(t0.Add(9 * time.Second))
	if err := m.Renew(ctx, r, ttl); err != nil {
		t.Fatal(err)
	}
	c.Set(t0.Add(19*time.Second - time.Nanosecond))
	if !live(t, m, r.Key) {
		t.Fatal("renewed route gone before its new TTL")
	}
	c.Set(t0.Add(19 * time.Second))
	if live(t, m, r.Key) {
		t.Fatal("renewed route live at its new TTL")
	}
}

func TestMemoryExpiredFreesKeyForOthers(t *testing.T) {
	m, c := newFake(t)
	ctx := context.Background()
	a := testRoute("10.0.0.1:80", "id-a", "sess-a", 5)
	if err := m.Register(ctx, a, time.Second); err != nil {
		t.Fatal(err)
	}
	b := testRoute("10.0.0.1:80", "id-b", "sess-b", 1)
	c.Set(t0.Add(time.Second - time.Nanosecond))
	if err := m.Register(ctx, b, time.Second); !errors.Is(err, registry.ErrOwned) {
		t.Fatalf("Register(other identity, live) = %v, want ErrOwned", err)
	}
	old := testRoute("10.0.0.1:80", "id-a", "sess-0", 1)
	if err := m.Register(ctx, old, time.Second); !errors.Is(err, registry.ErrStale) {
		t.Fatalf("Register(older generation, live) = %v, want ErrStale", err)
	}
	c.Set(t0.Add(time.Second))
	if err := m.Register(ctx, b, time.Second); err != nil {
		t.Fatalf("Register(other identity, expired) = %v, want success", err)
	}
	got, err := m.Lookup(ctx, b.Key)
	if err != nil || got.Session != b.Session {
		t.Fatalf("Lookup = %+v, %v; want session %s", got, err, b.Session)
	}
}

func TestMemoryRegisteredTime(t *testing.T) {
	m, c := newFake(t)
	ctx := context.Background()
	c.Set(t0.Add(time.Hour))
	r := testRoute("10.0.0.1:80", "id-a", "sess-a", 1)
	if err := m.Register(ctx, r, time.Minute); err != nil {
		t.Fatal(err)
	}
	got, err := m.Lookup(ctx, r.Key)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Registered.Equal(t0.Add(time.Hour)) {
		t.Fatalf("Registered = %v, want the clock's %v", got.Registered, t0.Add(time.Hour))
	}
	given := testRoute("10.0.0.2:80", "id-a", "sess-a", 1)
	given.Registered = t0
	if err := m.Register(ctx, given, time.Minute); err != nil {
		t.Fatal(err)
	}
	got, err = m.Lookup(ctx, given.Key)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Registered.Equal(t0) {
		t.Fatalf("Registered = %v, want the given %v", got.Registered, t0)
	}
}

// A watcher that never reads must not block writers, and its channel
// still closes when its ctx ends.
func TestMemorySlowWatcher(t *testing.T) {
	m, _ := newFake(t)
	ctx, cancel := context.WithCancel(context.Background())
	ch, err := m.Watch(ctx)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		r := testRoute("10.0.0.1:80", "id-a", "sess-a", 1)
		for i := 0; i < 1000; i++ {
			if err := m.Register(context.Background(), r, time.Minute); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Register blocked on a watcher that does not read")
	}
	cancel()
	n := 0
	timeout := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				if n == 0 || n >= 1000 {
					t.Fatalf("slow watcher got %d of 1000 events, want some dropped and some kept", n)
				}
				return
			}
			n++
		case <-timeout:
			t.Fatal("watch channel not closed after cancel")
		}
	}
}
