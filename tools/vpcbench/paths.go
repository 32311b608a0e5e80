package main

import (
	"fmt"
)

// path is one way from the client to the targets.
type path struct {
	name  string
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

// setupPaths starts what the chosen paths need for targets: relay
// chains, forwarders, and one vpcreach stack (default tunnel settings)
// shared by proxy-port and socks5d+fwd.
func setupPaths(e *env, targets []string) (ps *pathSet, err error) {
	ps = &pathSet{}
	defer func() {
		if err != nil {
			ps.stop()
		}
	}()
	want := map[string]bool{}
	for _, p := range e.o.paths {
		want[p] = true
	}
	var st *stack
	if want[pProxy] || want[pSocks] {
		logf("starting proxyserver + agent%s", map[bool]string{true: " + socks5d", false: ""}[want[pSocks]])
		st, err = startStack(e.bins, e.dir, e.ports, stackOpts{name: "main", targets: targets, socks: want[pSocks]})
		if err != nil {
			return nil, err
		}
		ps.stops = append(ps.stops, st.stop)
	}
	for _, name := range e.o.paths {
		p := &path{name: name, addr: map[string]string{}, pids: map[string][]int{}, check: func() error { return nil }}
		for _, t := range targets {
			switch name {
			case pDirect:
				p.addr[t] = t
			case pFloor, pFloorFw:
				n := 2
				if name == pFloorFw {
					n = 3
				}
				ch, err := startChain(e.dir, e.ports, fmt.Sprintf("%s-%s", name, t), n, t)
				if err != nil {
					return nil, err
				}
				ps.stops = append(ps.stops, ch.stop)
				p.addr[t], p.pids[t] = ch.addr, ch.pids()
				if name == pFloorFw {
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
func rotate(list []*path, i int) []*path {
	n := len(list)
	out := make([]*path, 0, n)
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
