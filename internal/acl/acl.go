// Package acl matches targets (registry network, IP, port) against lists of
// rules: the proxy server's claim policy (what an agent identity may
// expose) and socks5d's per-user access lists.
//
// A rule is "[network/]CIDR:PORTS": network is a registry network name, or
// omitted for the default network, or "*" for any; CIDR is an IPv4 or IPv6
// prefix (a bare address is a /32 or /128; IPv6 in brackets when a port
// follows); PORTS is a port, a range "lo-hi", or "*". Examples:
//
//	10.1.0.0/16:6379
//	10.1.0.5:80-443
//	vpc-a/10.2.0.0/16:*
//	*/0.0.0.0/0:*
//	[2001:db8::/32]:443
package acl

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/vpcreach/vpcreach/registry"
)

// Rule allows one network, prefix and port range.
type Rule struct {
	Network string // "*" for any
	Prefix  netip.Prefix
	Lo, Hi  uint16
	text    string
}

// String is the rule as written.
func (r Rule) String() string { return r.text }

// Allows reports whether the rule covers k.
func (r Rule) Allows(k registry.Key) bool {
	if r.Network != "*" && r.Network != k.Network {
		return false
	}
	p := k.Addr.Port()
	return p >= r.Lo && p <= r.Hi && r.Prefix.Contains(k.Addr.Addr().Unmap())
}

// Parse parses one rule.
func Parse(s string) (Rule, error) {
	r := Rule{text: s}
	rest := strings.TrimSpace(s)
	bad := func(why string) (Rule, error) {
		return Rule{}, fmt.Errorf("acl rule %q: %s (want [network/]CIDR:PORTS, e.g. 10.1.0.0/16:6379 or vpc-a/10.2.0.0/16:80-443)", s, why)
	}
	// The network is what precedes the first '/' when that part is not
	// an address ("10.0.0.0/8:*" has no network).
	if i := strings.IndexByte(rest, '/'); i > 0 {
		head := rest[:i]
		if _, err := netip.ParseAddr(strings.Trim(head, "[]")); err != nil {
			if head != "*" {
				if err := registry.ValidNetwork(head); err != nil {
					return bad(err.Error())
				}
			}
			r.Network, rest = head, rest[i+1:]
		}
	}
	j := strings.LastIndexByte(rest, ':')
	if j < 0 {
		return bad("no port")
	}
	addr, ports := rest[:j], rest[j+1:]
	if strings.HasPrefix(addr, "[") {
		if !strings.HasSuffix(addr, "]") {
			return bad("unbalanced brackets")
		}
		addr = addr[1 : len(addr)-1]
	}
	if strings.Contains(addr, "/") {
		p, err := netip.ParsePrefix(addr)
		if err != nil {
			return bad(err.Error())
		}
		r.Prefix = p.Masked()
	} else {
		a, err := netip.ParseAddr(addr)
		if err != nil {
			return bad(err.Error())
		}
		r.Prefix = netip.PrefixFrom(a, a.BitLen())
	}
	if r.Prefix.Addr().Is4In6() {
		return bad("write IPv4 prefixes in IPv4 form")
	}
	switch lo, hi, ok := strings.Cut(ports, "-"); {
	case ports == "*":
		r.Lo, r.Hi = 1, 65535
	case ok:
		l, err1 := strconv.ParseUint(lo, 10, 16)
		h, err2 := strconv.ParseUint(hi, 10, 16)
		if err1 != nil || err2 != nil || l == 0 || l > h {
			return bad("bad port range")
		}
		r.Lo, r.Hi = uint16(l), uint16(h)
	default:
		p, err := strconv.ParseUint(ports, 10, 16)
		if err != nil || p == 0 {
			return bad("bad port")
		}
		r.Lo, r.Hi = uint16(p), uint16(p)
	}
	return r, nil
}

// List is a set of rules; it allows what any rule allows. The zero List
// allows nothing.
type List []Rule

// ParseList parses every rule, reporting the first error.
func ParseList(rules []string) (List, error) {
	l := make(List, 0, len(rules))
	for _, s := range rules {
		r, err := Parse(s)
		if err != nil {
			return nil, err
		}
		l = append(l, r)
	}
	return l, nil
}

// Allows reports whether some rule covers k.
func (l List) Allows(k registry.Key) bool {
	for _, r := range l {
		if r.Allows(k) {
			return true
		}
	}
	return false
}
