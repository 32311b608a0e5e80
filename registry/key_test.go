package registry_test

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/vpcreach/vpcreach/registry"
)

func TestParseKey(t *testing.T) {
	ap := netip.MustParseAddrPort
	tests := []struct {
		in   string
		want registry.Key
		str  string // canonical String form; "" means in
	}{
		{in: "10.0.0.1:80", want: registry.Key{Addr: ap("10.0.0.1:80")}},
		{in: "0.0.0.0:0", want: registry.Key{Addr: ap("0.0.0.0:0")}},
		{in: "255.255.255.255:65535", want: registry.Key{Addr: ap("255.255.255.255:65535")}},
		{in: "[2001:db8::1]:443", want: registry.Key{Addr: ap("[2001:db8::1]:443")}},
		{in: "[::1]:22", want: registry.Key{Addr: ap("[::1]:22")}},
		{in: "[2001:0db8:0000::0001]:443", want: registry.Key{Addr: ap("[2001:db8::1]:443")}, str: "[2001:db8::1]:443"},
		{in: "vpc-a/10.0.0.1:80", want: registry.Key{Network: "vpc-a", Addr: ap("10.0.0.1:80")}},
		{in: "Prod.eu_1/[2001:db8::1]:443", want: registry.Key{Network: "Prod.eu_1", Addr: ap("[2001:db8::1]:443")}},
		{in: strings.Repeat("n", 32) + "/10.0.0.1:80", want: registry.Key{Network: strings.Repeat("n", 32), Addr: ap("10.0.0.1:80")}},
		// IPv4-mapped IPv6 is unmapped, so both spellings are one key.
		{in: "[::ffff:10.0.0.1]:80", want: registry.Key{Addr: ap("10.0.0.1:80")}, str: "10.0.0.1:80"},
		{in: "vpc/[::ffff:10.0.0.1]:80", want: registry.Key{Network: "vpc", Addr: ap("10.0.0.1:80")}, str: "vpc/10.0.0.1:80"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := registry.ParseKey(tt.in)
			if err != nil {
				t.Fatalf("ParseKey(%q): %v", tt.in, err)
			}
			if got != tt.want {
				t.Fatalf("ParseKey(%q) = %#v, want %#v", tt.in, got, tt.want)
			}
			str := tt.str
			if str == "" {
				str = tt.in
			}
			if s := got.String(); s != str {
				t.Fatalf("String() = %q, want %q", s, str)
			}
			again, err := registry.ParseKey(got.String())
			if err != nil || again != got {
				t.Fatalf("ParseKey(String()) = %#v, %v; want %#v", again, err, got)
			}
		})
	}
}

func TestParseKeyBad(t *testing.T) {
	bad := []string{
		"",
		"10.0.0.1",                               // missing port
		"10.0.0.1:",                              // empty port
		"[2001:db8::1]",                          // missing port
		"2001:db8::1:443",                        // IPv6 without brackets
		"10.0.0.1:65536",                         // port out of range
		"10.0.0.1:-1",                            // negative port
		"10.0.0.1:http",                          // named port
		"db.internal:5432",                       // host name, not an IP
		"10.0.0.256:80",                          // bad IPv4
		"/10.0.0.1:80",                           // empty network
		"vpc a/10.0.0.1:80",                      // space in network
		"vpc!/10.0.0.1:80",                       // bad network char
		"vpc:a/10.0.0.1:80",                      // bad network char
		"a/b/10.0.0.1:80",                        // '/' in network
		"vpc\u00e9/10.0.0.1:80",                  // non-ASCII network
		strings.Repeat("n", 33) + "/10.0.0.1:80", // network too long
		"vpc-a/",                                 // network without target
		"vpc-a/10.0.0.1",                         // network, missing port
	}
	for _, in := range bad {
		t.Run(in, func(t *testing.T) {
			if k, err := registry.ParseKey(in); err == nil {
				t.Fatalf("ParseKey(%q) = %#v, want an error", in, k)
			}
		})
	}
}

func TestValidNetwork(t *testing.T) {
	for _, n := range []string{"a", "vpc-1", "A.b_c-9", strings.Repeat("x", 32)} {
		if err := registry.ValidNetwork(n); err != nil {
			t.Errorf("ValidNetwork(%q) = %v, want nil", n, err)
		}
	}
	for _, n := range []string{"", strings.Repeat("x", 33), "a/b", "a b", "a:b", "a%b", "{tag}"} {
		if err := registry.ValidNetwork(n); err == nil {
			t.Errorf("ValidNetwork(%q) = nil, want an error", n)
		}
	}
}
