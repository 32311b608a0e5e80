package main

import (
	"fmt"
	"strings"
)

// path is one way from the client to the targets.
type path struct {
	name  string
	kind  string            // name without tlsSuffix: one of allPaths
	addr  map[string]string // target -> address the client connects to
	pids  map[string][]int  // target -> processes whose CPU the path costs
	check func() error      // nil, or why the path is broken
}

// paths is the set of paths of the bulk and rr sections, and what to stop.
type pathSet struct {
	list  []*path
	stops []func()
}

func (ps *pathSet) stop() {
	for i := len(ps.stops) - 1; i >= 0; i-- {
		ps.stops[i]()
	}
}

// tlsSuffix marks a path through the stack with TLS on its tunnel.
const tlsSuffix = "+tls"

// splitPath returns the kind of a path name and whether it has TLS.
func splitPath(name string) (kind string, tls bool) {
	kind, tls = strings.CutSuffix(name, tlsSuffix)
	return kind, tls
}

// runPaths are the paths bulk and rr run: -paths, with proxy-port and
// socks5d+fwd without TLS, with it, or both ways (-tls).
func runPaths(o *options) []string {
	var out []string
	for _, name := range o.paths {
		if name != pProxy && name != pSocks {
			out = append(out, name)
			continue
		}
		if o.tls != tlsOn {
			out = append(out, name)
		}
		if o.tls != tlsOff {
			out = append(out, name+tlsSuffix)
		}
	}
	return out
}

func pathNames(paths []*path) []string {
	out := make([]string, len(paths))
	for i, p := range paths {
		out[i] = p.name
	}
	return out
}

// setupPaths starts what the chosen paths need for targets: relay
// chains, forwarders, and a vpcreach stack (default tunnel settings)
// shared by proxy-port and socks5d+fwd, one without TLS and one with it
// as the paths need.
func setupPaths(e *env, targets []string) (ps *pathSet, err error) {
	ps = &pathSet{}
	defer func() {
		if err != nil {
			ps.stop()
		}
	}()
	names := runPaths(e.o)
	stacks := map[bool]*stack{} // by TLS on the tunnel
	for _, withTLS := range []bool{false, true} {
		need, socks := false, false
		for _, name := range names {
			if kind, t := splitPath(name); t == withTLS && (kind == pProxy || kind == pSocks) {
				need, socks = true, socks || kind == pSocks
			}
		}
		if !need {
			continue
		}
		o := stackOpts{name: "main", targets: targets, socks: socks}
		if withTLS {
			o.name, o.tls = "main-tls", e.certs
		}
		logf("starting proxyserver + agent%s%s", map[bool]string{true: " + socks5d", false: ""}[socks],
			map[bool]string{true: " with TLS", false: ""}[withTLS])
		st, err := e.startStack(o)
		if err != nil {
			return nil, err
		}
		ps.stops = append(ps.stops, st.stop)
		stacks[withTLS] = st
	}
	for _, name := range names {
		kind, withTLS := splitPath(name)
		st := stacks[withTLS]
		p := &path{name: name, kind: kind, addr: map[string]string{}, pids: map[string][]int{},
			check: func() error { return nil }}
		for _, t := range targets {
			switch kind {
			case pDirect:
				p.addr[t] = t
			case pFloor, pFloorCopy, pFloorYamux, pFloorFw:
				n := 2
				if kind == pFloorFw {
					n = 3
				}
				ch, err := startChain(e.dir, e.ports, fmt.Sprintf("%s-%s", name, t), n, t, kind)
				if err != nil {
					return nil, err
				}
				ps.stops = append(ps.stops, ch.stop)
				p.addr[t], p.pids[t] = ch.addr, ch.pids()
				if kind == pFloorFw {
					la, err := e.ports.addr()
					if err != nil {
						return nil, err
					}
					f, err := startForwarder(la, plainDialer(ch.addr))
					if err != nil {
						return nil, err
					}
					ps.stops = append(ps.stops, f.close)
					p.addr[t] = f.addr()
				}
				prev := p.check
				p.check = func() error {
					for _, pr := range ch.procs {
						if !pr.alive() {
							return pr.exitErr()
						}
					}
					return prev()
				}
			case pProxy:
				p.addr[t], p.pids[t] = st.proxy[t], st.pids(false)
				p.check = st.check
			case pSocks:
				la, err := e.ports.addr()
				if err != nil {
					return nil, err
				}
				f, err := startForwarder(la, socksDialer(st.socksAddr, t))
				if err != nil {
					return nil, err
				}
				ps.stops = append(ps.stops, f.close)
				p.addr[t], p.pids[t] = f.addr(), st.pids(true)
				p.check = st.check
			}
		}
		ps.list = append(ps.list, p)
	}
	return ps, nil
}

// rotate returns list starting at element i mod len, so that no path is
// always first (or always right after another) in a repetition.
func rotate[T any](list []T, i int) []T {
	n := len(list)
	out := make([]T, 0, n)
	for k := 0; k < n; k++ {
		out = append(out, list[(i+k)%n])
	}
	return out
}

// runPathSections runs bulk and rr over one set of paths.
func runPathSections(e *env) error {
	var targets []string
	if e.o.only["bulk"] {
		targets = append(targets, e.iperfAddr)
	}
	if e.o.only["rr"] {
		targets = append(targets, e.redisAddr)
	}
	ps, err := setupPaths(e, targets)
	if err != nil {
		return err
	}
	defer ps.stop()
	if e.o.only["bulk"] {
		if err := runBulk(e, ps.list); err != nil {
			return err
		}
	}
	if e.o.only["rr"] {
		if err := runRR(e, ps.list); err != nil {
			return err
		}
	}
	return nil
}
