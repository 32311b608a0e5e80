package registry_test

import (
	"context"
	"errors"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/registry"
)

// outage wraps a real store and fails every call while down is set, the
// way a Reader over an unreachable Redis does. Redis itself going away is
// tested in redis_test.go; this drives the cache's clock by hand.
type outage struct {
	registry.Reader
	down    atomic.Bool
	lookups atomic.Int64
}

var errDown = errors.New("store down")

func (o *outage) Lookup(ctx context.Context, k registry.Key) (registry.Route, error) {
	o.lookups.Add(1)
	if o.down.Load() {
		return registry.Route{}, errDown
	}
	return o.Reader.Lookup(ctx, k)
}

// cacheFixture: a memory store and a cache over it, both on one fake clock
// (5 s fresh, 1 min max-stale).
func cacheFixture(t *testing.T) (*registry.Memory, *outage, *fakeClock, *registry.Cache) {
	t.Helper()
	mem, clk := newFake(t)
	src := &outage{Reader: mem}
	c := registry.NewCache(src, registry.CacheOptions{Fresh: 5 * time.Second, MaxStale: time.Minute, Now: clk.Now})
	return mem, src, clk, c
}

func (c *fakeClock) add(d time.Duration) { c.Set(c.Now().Add(d)) }

const cacheTarget = "10.1.0.5:6379"

func TestCacheFreshThenRefetch(t *testing.T) {
	mem, src, clk, c := cacheFixture(t)
	r := testRoute(cacheTarget, "a", "s1", 1)
	if err := mem.Register(t.Context(), r, time.Hour); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if got, err := c.Lookup(t.Context(), r.Key); err != nil || got.Session != "s1" {
			t.Fatalf("Lookup = %v, %v", got, err)
		}
	}
	if n := src.lookups.Load(); n != 1 {
		t.Fatalf("store asked %d times for three lookups within the fresh TTL, want 1", n)
	}
	r2 := testRoute(cacheTarget, "a", "s2", 2)
	if err := mem.Register(t.Context(), r2, time.Hour); err != nil {
		t.Fatal(err)
	}
	clk.add(5 * time.Second)
	if got, _ := c.Lookup(t.Context(), r.Key); got.Session != "s2" {
		t.Fatalf("after the fresh TTL the cache served %s, want the new session s2", got.Session)
	}
}

func TestCacheServesStaleWhileStoreErrors(t *testing.T) {
	mem, src, clk, c := cacheFixture(t)
	r := testRoute(cacheTarget, "a", "s1", 1)
	if err := mem.Register(t.Context(), r, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Lookup(t.Context(), r.Key); err != nil {
		t.Fatal(err)
	}
	src.down.Store(true)
	clk.add(30 * time.Second) // past fresh, within fresh+max-stale
	got, err := c.Lookup(t.Context(), r.Key)
	if err != nil || got.Session != "s1" {
		t.Fatalf("stale lookup = %v, %v; want the cached route", got, err)
	}
	if c.Stats.Stale.Load() != 1 {
		t.Fatalf("stale counter %d, want 1", c.Stats.Stale.Load())
	}
	clk.add(36 * time.Second) // now past fresh+max-stale
	if _, err := c.Lookup(t.Context(), r.Key); !errors.Is(err, errDown) {
		t.Fatalf("lookup past max-stale = %v, want the store's error", err)
	}
	other := registry.Key{Addr: netip.MustParseAddrPort("10.9.9.9:1")}
	if _, err := c.Lookup(t.Context(), other); !errors.Is(err, errDown) {
		t.Fatalf("uncached lookup while down = %v, want the store's error", err)
	}
}

func TestCacheMissIsNotCached(t *testing.T) {
	mem, src, _, c := cacheFixture(t)
	r := testRoute(cacheTarget, "a", "s1", 1)
	if _, err := c.Lookup(t.Context(), r.Key); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Lookup = %v, want ErrNotFound", err)
	}
	if err := mem.Register(t.Context(), r, time.Hour); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Lookup(t.Context(), r.Key); err != nil {
		t.Fatalf("route registered after a miss: %v", err)
	}
	if n := src.lookups.Load(); n != 2 {
		t.Fatalf("store asked %d times, want 2", n)
	}
}

func TestCacheInvalidate(t *testing.T) {
	mem, src, _, c := cacheFixture(t)
	r := testRoute(cacheTarget, "a", "s1", 1)
	if err := mem.Register(t.Context(), r, time.Hour); err != nil {
		t.Fatal(err)
	}
	got, _ := c.Lookup(t.Context(), r.Key)
	c.Invalidate(r.Key, testRoute(cacheTarget, "a", "other", 9)) // not the cached route: kept
	c.Lookup(t.Context(), r.Key)
	if n := src.lookups.Load(); n != 1 {
		t.Fatalf("invalidating another route dropped the entry (%d store lookups)", n)
	}
	c.Invalidate(r.Key, got)
	c.Lookup(t.Context(), r.Key)
	if n := src.lookups.Load(); n != 2 {
		t.Fatalf("after Invalidate the store was asked %d times in all, want 2", n)
	}
}

func TestCacheEvents(t *testing.T) {
	_, src, _, c := cacheFixture(t)
	r := testRoute(cacheTarget, "a", "s1", 1)
	c.Apply(registry.Event{Type: registry.EventPut, Key: r.Key, Route: r})
	if got, err := c.Lookup(t.Context(), r.Key); err != nil || got != r {
		t.Fatalf("after a put event Lookup = %v, %v", got, err)
	}
	if src.lookups.Load() != 0 {
		t.Fatal("a route announced by an event was fetched from the store")
	}
	c.Apply(registry.Event{Type: registry.EventDelete, Key: r.Key})
	if _, err := c.Lookup(t.Context(), r.Key); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("after a delete event Lookup = %v, want ErrNotFound from the store", err)
	}
	if c.Len() != 0 {
		t.Fatalf("Len = %d after delete, want 0", c.Len())
	}
}

func TestCacheResetRevalidatesButMayServeStale(t *testing.T) {
	mem, src, _, c := cacheFixture(t)
	r := testRoute(cacheTarget, "a", "s1", 1)
	if err := mem.Register(t.Context(), r, time.Hour); err != nil {
		t.Fatal(err)
	}
	c.Lookup(t.Context(), r.Key)
	c.Apply(registry.Event{Type: registry.EventReset})
	c.Lookup(t.Context(), r.Key)
	if n := src.lookups.Load(); n != 2 {
		t.Fatalf("after a reset the entry was not re-checked (%d store lookups, want 2)", n)
	}
	c.Apply(registry.Event{Type: registry.EventReset})
	src.down.Store(true)
	if got, err := c.Lookup(t.Context(), r.Key); err != nil || got.Session != "s1" {
		t.Fatalf("unverified entry with the store down = %v, %v; want it served stale", got, err)
	}
}

// A lookup that read the store before a delete event must not bring the
// deleted route back.
func TestCacheLookupRacingDelete(t *testing.T) {
	mem, _, _, _ := cacheFixture(t)
	r := testRoute(cacheTarget, "a", "s1", 1)
	if err := mem.Register(t.Context(), r, time.Hour); err != nil {
		t.Fatal(err)
	}
	var c *registry.Cache
	hook := &hookReader{Reader: mem, after: func() {
		c.Apply(registry.Event{Type: registry.EventDelete, Key: r.Key})
	}}
	c = registry.NewCache(hook, registry.CacheOptions{})
	c.Lookup(t.Context(), r.Key) // returns the old route; the delete came in meanwhile
	hook.after = nil
	if c.Len() != 0 {
		t.Fatal("a lookup in flight across a delete event cached the deleted route")
	}
}

type hookReader struct {
	registry.Reader
	after func()
}

func (h *hookReader) Lookup(ctx context.Context, k registry.Key) (registry.Route, error) {
	r, err := h.Reader.Lookup(ctx, k)
	if h.after != nil {
		h.after()
	}
	return r, err
}
