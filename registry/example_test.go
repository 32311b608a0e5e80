package registry_test

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/vpcreach/vpcreach/registry"
)

// A program that needs the four-tuple of a target asks a Reader. Here the
// Reader is an in-memory registry filled by hand; a real program reads a
// proxy server's lookup API instead:
//
//	var rd registry.Reader = registry.NewAPIClient("http://10.0.0.2:7070", nil)
func Example() {
	ctx := context.Background()
	reg := registry.NewMemory(nil)
	defer reg.Close()

	// What a proxy server does when an agent exposes 10.1.2.3:5432 in the
	// network "vpc-a".
	err := reg.Register(ctx, registry.Route{
		Key:        registry.Key{Network: "vpc-a", Addr: netip.MustParseAddrPort("10.1.2.3:5432")},
		Proxy:      netip.MustParseAddrPort("192.0.2.10:31001"),
		Agent:      "db-agent",
		Identity:   "db-agent",
		Server:     "proxy-1",
		Session:    "s1",
		Generation: 1,
	}, 30*time.Second)
	if err != nil {
		fmt.Println(err)
		return
	}

	// The lookup side.
	var rd registry.Reader = reg
	k, err := registry.ParseKey("vpc-a/10.1.2.3:5432")
	if err != nil {
		fmt.Println(err)
		return
	}
	r, err := rd.Lookup(ctx, k)
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%s -> %s (network %s, agent %s)\n", r.Proxy, r.Addr, r.Network, r.Agent)

	_, err = rd.Lookup(ctx, registry.Key{Addr: netip.MustParseAddrPort("10.9.9.9:80")})
	fmt.Println(err)
	// Output:
	// 192.0.2.10:31001 -> 10.1.2.3:5432 (network vpc-a, agent db-agent)
	// registry: no route
}
