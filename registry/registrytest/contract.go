// Package registrytest is the shared contract suite of registry backends.
// Every backend's tests call Run with a function that opens a fresh,
// empty registry; the suite checks the ownership rules, leases (with short
// real TTLs and polling, since a store such as Redis expires keys on its own
// clock), listing and watching.
package registrytest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/registry"
)

// Timing of the lease cases. The TTLs are short real durations; the suite
// polls with a deadline and never sleeps to synchronise.
const (
	leaseTTL     = 200 * time.Millisecond
	pollEvery    = 20 * time.Millisecond
	pollDeadline = 3 * time.Second
	eventWait    = 3 * time.Second
	// longTTL is the lease of routes that must not expire during a case.
	longTTL = time.Minute
	// clockSlack allows for a store whose clock has millisecond resolution
	// (Redis) when the suite checks that a lease did not end early.
	clockSlack = 5 * time.Millisecond
)

// Run runs the contract suite. open is called once per subtest and must
// return an empty registry of its own (a fresh store, or a unique key
// prefix); Run closes it when the subtest ends. Watch must be subscribed
// when it returns, so that changes made afterwards are delivered.
func Run(t *testing.T, open func(t *testing.T) registry.Registry) {
	t.Helper()
	cases := []struct {
		name string
		fn   func(t *testing.T, r registry.Registry)
	}{
		{"RoundTrip", testRoundTrip},
		{"LookupMissing", testLookupMissing},
		{"List", testList},
		{"NetworksSeparate", testNetworksSeparate},
		{"IPv6", testIPv6},
		{"NewerGenerationWins", testNewerGenerationWins},
		{"OlderGenerationStale", testOlderGenerationStale},
		{"EqualGenerationSessionTieBreak", testTieBreak},
		{"SameSessionRenews", testSameSessionRenews},
		{"OtherIdentityOwned", testOtherIdentityOwned},
		{"Deregister", testDeregister},
		{"RenewRecreates", testRenewRecreates},
		{"RenewAfterTakeover", testRenewAfterTakeover},
		{"LeaseExpires", testLeaseExpires},
		{"RenewedLeaseStays", testRenewedLeaseStays},
		{"Watch", testWatch},
		{"ConcurrentRegister", testConcurrentRegister},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := open(t)
			if r == nil {
				t.Fatal("open returned a nil registry")
			}
			t.Cleanup(func() {
				if err := r.Close(); err != nil {
					t.Errorf("Close: %v", err)
				}
			})
			c.fn(t, r)
		})
	}
}

// registeredAt is the fixed registration time of the fixtures; its
// sub-second part lets sameTime accept a store that truncates it.
var registeredAt = time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)

func key(network, target string) registry.Key {
	return registry.Key{Network: network, Addr: netip.MustParseAddrPort(target)}
}

// route returns a fully populated route of k.
func route(k registry.Key, identity, session string, gen uint64) registry.Route {
	return registry.Route{
		Key:        k,
		Proxy:      netip.MustParseAddrPort("192.0.2.10:31001"),
		Relay:      netip.MustParseAddrPort("192.0.2.10:7443"),
		Agent:      "agent-" + identity,
		Identity:   identity,
		Server:     "server-1",
		Session:    session,
		Generation: gen,
		Registered: registeredAt,
	}
}

// sameTime reports whether got is want, possibly truncated by the store to
// microseconds, milliseconds or seconds.
func sameTime(got, want time.Time) bool {
	for _, d := range []time.Duration{0, time.Microsecond, time.Millisecond, time.Second} {
		if got.Equal(want.Truncate(d)) {
			return true
		}
	}
	return false
}

// diff describes how got differs from want, or returns "".
func diff(got, want registry.Route) string {
	g, w := got, want
	g.Registered, w.Registered = time.Time{}, time.Time{}
	var s string
	if g != w {
		s = fmt.Sprintf("\n got  %+v\n want %+v", g, w)
	}
	if !sameTime(got.Registered, want.Registered) {
		s += fmt.Sprintf("\n Registered: got %v, want %v", got.Registered, want.Registered)
	}
	return s
}

func ctxOf(t *testing.T) context.Context { return t.Context() }

func mustRegister(t *testing.T, r registry.Registry, rt registry.Route, ttl time.Duration) {
	t.Helper()
	if err := r.Register(ctxOf(t), rt, ttl); err != nil {
		t.Fatalf("Register(%v, %s gen %d): %v", rt.Key, rt.Session, rt.Generation, err)
	}
}

// expectRoute checks that the live route of want.Key is want.
func expectRoute(t *testing.T, r registry.Registry, want registry.Route) {
	t.Helper()
	got, err := r.Lookup(ctxOf(t), want.Key)
	if err != nil {
		t.Fatalf("Lookup(%v): %v, want session %s gen %d", want.Key, err, want.Session, want.Generation)
	}
	if d := diff(got, want); d != "" {
		t.Fatalf("Lookup(%v):%s", want.Key, d)
	}
}

func expectMissing(t *testing.T, r registry.Registry, k registry.Key) {
	t.Helper()
	got, err := r.Lookup(ctxOf(t), k)
	if !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Lookup(%v) = %+v, %v; want ErrNotFound", k, got, err)
	}
}

// expectList checks that List returns exactly want (in any order).
func expectList(t *testing.T, r registry.Registry, want ...registry.Route) {
	t.Helper()
	got, err := r.List(ctxOf(t))
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if len(got) != len(want) {
		t.Fatalf("List returned %d routes, want %d: %+v", len(got), len(want), got)
	}
	byKey := map[registry.Key]registry.Route{}
	for _, g := range got {
		if _, dup := byKey[g.Key]; dup {
			t.Fatalf("List returned key %v twice: %+v", g.Key, got)
		}
		byKey[g.Key] = g
	}
	for _, w := range want {
		g, ok := byKey[w.Key]
		if !ok {
			t.Fatalf("List lacks %v: %+v", w.Key, got)
		}
		if d := diff(g, w); d != "" {
			t.Fatalf("List entry %v:%s", w.Key, d)
		}
	}
}

func testRoundTrip(t *testing.T, r registry.Registry) {
	want := route(key("", "10.1.2.3:5432"), "id-a", "sess-a", 7)
	mustRegister(t, r, want, longTTL)
	expectRoute(t, r, want)
}

func testLookupMissing(t *testing.T, r registry.Registry) {
	expectMissing(t, r, key("", "10.1.2.3:5432"))
	mustRegister(t, r, route(key("", "10.1.2.3:5432"), "id-a", "sess-a", 1), longTTL)
	// Neighbours of a live key are still missing.
	expectMissing(t, r, key("", "10.1.2.3:5433"))
	expectMissing(t, r, key("", "10.1.2.4:5432"))
	expectMissing(t, r, key("vpc-a", "10.1.2.3:5432"))
}

func testList(t *testing.T, r registry.Registry) {
	expectList(t, r)
	a := route(key("", "10.0.0.1:80"), "id-a", "sess-a", 1)
	b := route(key("vpc-b", "10.0.0.2:443"), "id-b", "sess-b", 2)
	c := route(key("", "[2001:db8::3]:22"), "id-c", "sess-c", 3)
	d := route(key("", "10.0.0.4:8080"), "id-d", "sess-d", 4)
	for _, rt := range []registry.Route{a, b, c, d} {
		mustRegister(t, r, rt, longTTL)
	}
	expectList(t, r, a, b, c, d)
	if err := r.Deregister(ctxOf(t), d.Key, d.Session); err != nil {
		t.Fatalf("Deregister: %v", err)
	}
	expectList(t, r, a, b, c)
}

func testNetworksSeparate(t *testing.T, r registry.Registry) {
	def := route(key("", "10.0.0.1:5432"), "id-a", "sess-a", 1)
	vpc := route(key("vpc-b", "10.0.0.1:5432"), "id-b", "sess-b", 1)
	vpc.Proxy = netip.MustParseAddrPort("192.0.2.11:31002")
	mustRegister(t, r, def, longTTL)
	// Another identity, same ip:port, other network: no ErrOwned.
	mustRegister(t, r, vpc, longTTL)
	expectRoute(t, r, def)
	expectRoute(t, r, vpc)
	expectList(t, r, def, vpc)
	if err := r.Deregister(ctxOf(t), vpc.Key, vpc.Session); err != nil {
		t.Fatalf("Deregister: %v", err)
	}
	expectMissing(t, r, vpc.Key)
	expectRoute(t, r, def)
}

func testIPv6(t *testing.T, r registry.Registry) {
	a := route(key("", "[2001:db8::1]:443"), "id-a", "sess-a", 1)
	b := route(key("vpc-6", "[2001:db8::1]:443"), "id-b", "sess-b", 1)
	a.Proxy = netip.MustParseAddrPort("[2001:db8:ffff::10]:31001")
	a.Relay = netip.MustParseAddrPort("[2001:db8:ffff::10]:7443")
	mustRegister(t, r, a, longTTL)
	mustRegister(t, r, b, longTTL)
	expectRoute(t, r, a)
	expectRoute(t, r, b)
	expectMissing(t, r, key("", "[2001:db8::1]:444"))
	expectMissing(t, r, key("", "[2001:db8::2]:443"))
	expectList(t, r, a, b)
}

func testNewerGenerationWins(t *testing.T, r registry.Registry) {
	k := key("", "10.0.0.1:5432")
	old := route(k, "id-a", "sess-old", 1)
	mustRegister(t, r, old, longTTL)
	nw := route(k, "id-a", "sess-new", 2)
	nw.Proxy = netip.MustParseAddrPort("192.0.2.20:31009")
	nw.Server = "server-2"
	// Takes over at once, without waiting for the old lease.
	mustRegister(t, r, nw, longTTL)
	expectRoute(t, r, nw)
	// The old session is fenced: its deregister does nothing.
	if err := r.Deregister(ctxOf(t), k, old.Session); err != nil {
		t.Fatalf("Deregister(old session): %v", err)
	}
	expectRoute(t, r, nw)
}

func testOlderGenerationStale(t *testing.T, r registry.Registry) {
	k := key("", "10.0.0.1:5432")
	cur := route(k, "id-a", "sess-5", 5)
	mustRegister(t, r, cur, longTTL)
	old := route(k, "id-a", "sess-4", 4)
	old.Proxy = netip.MustParseAddrPort("192.0.2.99:31099")
	if err := r.Register(ctxOf(t), old, longTTL); !errors.Is(err, registry.ErrStale) {
		t.Fatalf("Register(older generation) = %v, want ErrStale", err)
	}
	expectRoute(t, r, cur)
}

func testTieBreak(t *testing.T, r registry.Registry) {
	k := key("", "10.0.0.1:5432")
	a := route(k, "id-a", "sess-a", 5)
	b := route(k, "id-a", "sess-b", 5)
	b.Proxy = netip.MustParseAddrPort("192.0.2.20:31009")
	mustRegister(t, r, a, longTTL)
	// Same generation, higher session id: wins.
	mustRegister(t, r, b, longTTL)
	expectRoute(t, r, b)
	// Same generation, lower session id: stale.
	if err := r.Register(ctxOf(t), a, longTTL); !errors.Is(err, registry.ErrStale) {
		t.Fatalf("Register(same generation, lower session) = %v, want ErrStale", err)
	}
	expectRoute(t, r, b)
}

func testSameSessionRenews(t *testing.T, r registry.Registry) {
	k := key("", "10.0.0.1:5432")
	first := route(k, "id-a", "sess-a", 3)
	mustRegister(t, r, first, longTTL)
	again := first
	again.Proxy = netip.MustParseAddrPort("192.0.2.20:31009")
	again.Server = "server-2"
	again.Registered = registeredAt.Add(time.Minute)
	if err := r.Register(ctxOf(t), again, longTTL); err != nil {
		t.Fatalf("Register(same session) = %v, want a renewal", err)
	}
	expectRoute(t, r, again)
	expectList(t, r, again)
}

func testOtherIdentityOwned(t *testing.T, r registry.Registry) {
	k := key("", "10.0.0.1:5432")
	a := route(k, "id-a", "sess-a", 1)
	mustRegister(t, r, a, longTTL)
	// A newer generation does not help another identity.
	b := route(k, "id-b", "sess-b", 100)
	if err := r.Register(ctxOf(t), b, longTTL); !errors.Is(err, registry.ErrOwned) {
		t.Fatalf("Register(other identity) = %v, want ErrOwned", err)
	}
	if err := r.Renew(ctxOf(t), b, longTTL); !errors.Is(err, registry.ErrOwned) {
		t.Fatalf("Renew(other identity) = %v, want ErrOwned", err)
	}
	expectRoute(t, r, a)
}

func testDeregister(t *testing.T, r registry.Registry) {
	k := key("vpc-a", "10.0.0.1:5432")
	a := route(k, "id-a", "sess-a", 1)
	// Deregistering a key that is not there is not an error.
	if err := r.Deregister(ctxOf(t), k, a.Session); err != nil {
		t.Fatalf("Deregister(missing key): %v", err)
	}
	mustRegister(t, r, a, longTTL)
	if err := r.Deregister(ctxOf(t), k, "sess-other"); err != nil {
		t.Fatalf("Deregister(other session): %v", err)
	}
	expectRoute(t, r, a)
	if err := r.Deregister(ctxOf(t), k, a.Session); err != nil {
		t.Fatalf("Deregister(own session): %v", err)
	}
	expectMissing(t, r, k)
	expectList(t, r)
}

func testRenewRecreates(t *testing.T, r registry.Registry) {
	k := key("", "10.0.0.1:5432")
	a := route(k, "id-a", "sess-a", 1)
	mustRegister(t, r, a, longTTL)
	if err := r.Renew(ctxOf(t), a, longTTL); err != nil {
		t.Fatalf("Renew(live): %v", err)
	}
	expectRoute(t, r, a)
	// The record vanishes (as after a store restart); Renew brings it back.
	if err := r.Deregister(ctxOf(t), k, a.Session); err != nil {
		t.Fatalf("Deregister: %v", err)
	}
	expectMissing(t, r, k)
	if err := r.Renew(ctxOf(t), a, longTTL); err != nil {
		t.Fatalf("Renew(vanished): %v", err)
	}
	expectRoute(t, r, a)
}

func testRenewAfterTakeover(t *testing.T, r registry.Registry) {
	k := key("", "10.0.0.1:5432")
	old := route(k, "id-a", "sess-a", 1)
	mustRegister(t, r, old, longTTL)
	nw := route(k, "id-a", "sess-b", 2)
	mustRegister(t, r, nw, longTTL)
	if err := r.Renew(ctxOf(t), old, longTTL); !errors.Is(err, registry.ErrStale) {
		t.Fatalf("Renew(taken over) = %v, want ErrStale", err)
	}
	expectRoute(t, r, nw)
}

// lookupTimed looks k up and returns the result with the time the call
// ended.
func lookupTimed(t *testing.T, r registry.Registry, k registry.Key) (bool, time.Time) {
	t.Helper()
	_, err := r.Lookup(ctxOf(t), k)
	end := time.Now()
	switch {
	case err == nil:
		return true, end
	case errors.Is(err, registry.ErrNotFound):
		return false, end
	default:
		t.Fatalf("Lookup(%v): %v", k, err)
		return false, end
	}
}

func testLeaseExpires(t *testing.T, r registry.Registry) {
	k := key("", "10.0.0.1:5432")
	short := route(k, "id-a", "sess-a", 1)
	keep := route(key("", "10.0.0.2:5432"), "id-a", "sess-k", 1)
	mustRegister(t, r, keep, longTTL)
	start := time.Now() // the lease starts after this
	mustRegister(t, r, short, leaseTTL)
	deadline := start.Add(pollDeadline)
	for {
		live, end := lookupTimed(t, r, k)
		if !live {
			// A lookup that ended before start+TTL ran before the lease
			// could have ended.
			if early := end.Sub(start); early < leaseTTL-clockSlack {
				t.Fatalf("route vanished %v after Register, before its TTL %v", early, leaseTTL)
			}
			break
		}
		if end.After(deadline) {
			t.Fatalf("route with TTL %v still live after %v", leaseTTL, end.Sub(start))
		}
		time.Sleep(pollEvery)
	}
	expectMissing(t, r, k)
	expectList(t, r, keep)
	// An expired route no longer blocks another identity.
	other := route(k, "id-b", "sess-b", 1)
	mustRegister(t, r, other, longTTL)
	expectRoute(t, r, other)
}

func testRenewedLeaseStays(t *testing.T, r registry.Registry) {
	const ttl = 2 * leaseTTL
	k := key("", "10.0.0.1:5432")
	a := route(k, "id-a", "sess-a", 1)
	first := time.Now()
	mustRegister(t, r, a, ttl)
	renewStart := first
	// Renew every ttl/4; a lookup that ends within ttl of the last renew's
	// start must find the route. Require several such checks well past the
	// first lease, so that the case cannot pass vacuously.
	checked := 0
	deadline := first.Add(pollDeadline)
	for checked < 3 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d checks past the first lease before the deadline: machine too slow", checked)
		}
		time.Sleep(ttl / 4)
		live, end := lookupTimed(t, r, k)
		if end.Sub(renewStart) < ttl-clockSlack {
			if !live {
				t.Fatalf("renewed route vanished %v after its last renew (TTL %v)", end.Sub(renewStart), ttl)
			}
			if end.Sub(first) > ttl {
				checked++
			}
		}
		renewStart = time.Now()
		if err := r.Renew(ctxOf(t), a, ttl); err != nil {
			t.Fatalf("Renew: %v", err)
		}
	}
	expectRoute(t, r, a)
}

// nextEvent waits for the next event on ch about k, skipping others.
func nextEvent(t *testing.T, ch <-chan registry.Event, k registry.Key) registry.Event {
	t.Helper()
	timeout := time.NewTimer(eventWait)
	defer timeout.Stop()
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("watch channel closed while waiting for an event on %v", k)
			}
			if ev.Key == k {
				return ev
			}
		case <-timeout.C:
			t.Fatalf("no event on %v within %v", k, eventWait)
		}
	}
}

func testWatch(t *testing.T, r registry.Registry) {
	ctx, cancel := context.WithCancel(ctxOf(t))
	defer cancel()
	ch, err := r.Watch(ctx)
	if err != nil {
		t.Fatalf("Watch: %v", err)
	}
	k := key("vpc-w", "10.0.0.1:5432")
	a := route(k, "id-a", "sess-a", 1)
	mustRegister(t, r, a, longTTL)
	ev := nextEvent(t, ch, k)
	if ev.Type != registry.EventPut {
		t.Fatalf("event after Register: type %v, want EventPut", ev.Type)
	}
	if d := diff(ev.Route, a); d != "" {
		t.Fatalf("EventPut route:%s", d)
	}
	if err := r.Deregister(ctxOf(t), k, a.Session); err != nil {
		t.Fatalf("Deregister: %v", err)
	}
	ev = nextEvent(t, ch, k)
	if ev.Type != registry.EventDelete {
		t.Fatalf("event after Deregister: type %v, want EventDelete", ev.Type)
	}

	cancel()
	timeout := time.NewTimer(eventWait)
	defer timeout.Stop()
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-timeout.C:
			t.Fatalf("watch channel not closed %v after ctx was cancelled", eventWait)
		}
	}
}

func testConcurrentRegister(t *testing.T, r registry.Registry) {
	const n = 20
	k := key("", "10.0.0.1:5432")
	start := make(chan struct{})
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := 1; i <= n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rt := route(k, "id-a", fmt.Sprintf("sess-%02d", i), uint64(i))
			<-start
			if err := r.Register(context.Background(), rt, longTTL); err != nil && !errors.Is(err, registry.ErrStale) {
				errs <- fmt.Errorf("Register(gen %d): %w", i, err)
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	expectRoute(t, r, route(k, "id-a", fmt.Sprintf("sess-%02d", n), n))
	expectList(t, r, route(k, "id-a", fmt.Sprintf("sess-%02d", n), n))
}
