package registry_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/registry"
)

func newAPI(t *testing.T) (*registry.Memory, *registry.APIClient, *httptest.Server) {
	t.Helper()
	m := registry.NewMemory(nil)
	srv := httptest.NewServer(registry.NewHandler(m))
	t.Cleanup(srv.Close)
	return m, registry.NewAPIClient(srv.URL, nil), srv
}

func apiRoute(network, target, session string) registry.Route {
	return registry.Route{
		Key:        registry.Key{Network: network, Addr: netip.MustParseAddrPort(target)},
		Proxy:      netip.MustParseAddrPort("192.0.2.10:31001"),
		Relay:      netip.MustParseAddrPort("[2001:db8::10]:7443"),
		Agent:      "agent-1",
		Identity:   "id-a",
		Server:     "server-1",
		Session:    session,
		Generation: 42,
		Registered: time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC),
	}
}

func sameRoute(a, b registry.Route) bool {
	ra, rb := a.Registered, b.Registered
	a.Registered, b.Registered = time.Time{}, time.Time{}
	return a == b && ra.Equal(rb)
}

func TestAPILookup(t *testing.T) {
	m, c, _ := newAPI(t)
	ctx := context.Background()
	want := []registry.Route{
		apiRoute("", "10.1.2.3:5432", "sess-a"),
		apiRoute("vpc-b", "[2001:db8::1]:443", "sess-b"),
		apiRoute("", "[2001:db8::1]:443", "sess-c"),
	}
	for _, r := range want {
		if err := m.Register(ctx, r, time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	for _, w := range want {
		got, err := c.Lookup(ctx, w.Key)
		if err != nil {
			t.Fatalf("Lookup(%v): %v", w.Key, err)
		}
		if !sameRoute(got, w) {
			t.Fatalf("Lookup(%v) = %+v, want %+v", w.Key, got, w)
		}
	}
}

func TestAPILookupMiss(t *testing.T) {
	m, c, _ := newAPI(t)
	ctx := context.Background()
	if err := m.Register(ctx, apiRoute("", "10.1.2.3:5432", "sess-a"), time.Minute); err != nil {
		t.Fatal(err)
	}
	for _, k := range []registry.Key{
		{Addr: netip.MustParseAddrPort("10.1.2.3:5433")},
		{Network: "vpc-b", Addr: netip.MustParseAddrPort("10.1.2.3:5432")},
	} {
		if r, err := c.Lookup(ctx, k); !errors.Is(err, registry.ErrNotFound) {
			t.Fatalf("Lookup(%v) = %+v, %v; want ErrNotFound", k, r, err)
		}
	}
}

func TestAPILookupBadTarget(t *testing.T) {
	_, c, srv := newAPI(t)
	ctx := context.Background()
	for _, k := range []registry.Key{
		{}, // no address
		{Network: "bad net!", Addr: netip.MustParseAddrPort("10.0.0.1:80")},
	} {
		_, err := c.Lookup(ctx, k)
		if err == nil || errors.Is(err, registry.ErrNotFound) {
			t.Fatalf("Lookup(%#v) = %v, want an error other than ErrNotFound", k, err)
		}
	}
	// The raw API answers 400 with a JSON error.
	resp, err := http.Get(srv.URL + "/v1/lookup?target=" + url.QueryEscape("10.0.0.1"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Fatalf("GET /v1/lookup?target=10.0.0.1: %s, want 400", resp.Status)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("Content-Type = %q, want application/json", ct)
	}
}

func TestAPIList(t *testing.T) {
	m, c, _ := newAPI(t)
	ctx := context.Background()
	rs, err := c.List(ctx)
	if err != nil {
		t.Fatalf("List(empty): %v", err)
	}
	if len(rs) != 0 {
		t.Fatalf("List(empty) = %+v, want none", rs)
	}
	want := map[registry.Key]registry.Route{}
	for _, r := range []registry.Route{
		apiRoute("", "10.1.2.3:5432", "sess-a"),
		apiRoute("vpc-b", "10.1.2.3:5432", "sess-b"),
		apiRoute("", "[2001:db8::1]:443", "sess-c"),
	} {
		if err := m.Register(ctx, r, time.Minute); err != nil {
			t.Fatal(err)
		}
		want[r.Key] = r
	}
	rs, err = c.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	if len(rs) != len(want) {
		t.Fatalf("List returned %d routes, want %d: %+v", len(rs), len(want), rs)
	}
	for _, got := range rs {
		w, ok := want[got.Key]
		if !ok || !sameRoute(got, w) {
			t.Fatalf("List entry %+v, want %+v", got, w)
		}
		delete(want, got.Key)
	}
}

func TestAPIServerDown(t *testing.T) {
	_, c, srv := newAPI(t)
	srv.Close()
	_, err := c.Lookup(context.Background(), registry.Key{Addr: netip.MustParseAddrPort("10.0.0.1:80")})
	if err == nil || errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("Lookup against a closed server = %v, want a transport error", err)
	}
}
