package netx

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// Prefixes is a set of address prefixes: trusted balancers, allowed
// sources. IPv4 peers match IPv4 prefixes only (IPv4-mapped peers are
// unmapped first), and zoned IPv6 peers never match.
type Prefixes []netip.Prefix

// ParsePrefixes parses single hosts ("10.0.0.1", "2001:db8::1", taken as
// /32 or /128) and CIDR prefixes ("10.0.0.0/24"; host bits are masked
// off). IPv4-mapped IPv6 entries ("::ffff:10.0.0.1", "::ffff:10.0.0.0/120")
// are turned into their IPv4 form; zones are refused. The error names the
// bad entry.
func ParsePrefixes(entries []string) (Prefixes, error) {
	out := make(Prefixes, 0, len(entries))
	for _, s := range entries {
		p, err := parsePrefix(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("%q: %v", s, err)
		}
		out = append(out, p)
	}
	return out, nil
}

func parsePrefix(s string) (netip.Prefix, error) {
	if s == "" {
		return netip.Prefix{}, errors.New("empty entry")
	}
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return netip.Prefix{}, fmt.Errorf("not an IP address or CIDR prefix: %v", err)
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("not an IP address or CIDR prefix: %v", err)
		}
		if a.Zone() != "" {
			return netip.Prefix{}, errors.New("IPv6 zones are not supported")
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p.Masked(), nil
}

// Contains reports whether a is in one of the prefixes. An IPv4-mapped
// IPv6 address is unmapped first.
func (ps Prefixes) Contains(a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}
