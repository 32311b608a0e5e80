package main

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"
)

// memProc is one process whose RSS the memory test follows.
type memProc struct {
	role string
	pid  int
}

// memPaths are the paths of the memory test: proxy-port without TLS,
// with it, or both ways (-tls), and the floor.
func memPaths(o *options) []string {
	var out []string
	if o.tls != tlsOn {
		out = append(out, pProxy)
	}
	if o.tls != tlsOff {
		out = append(out, pProxy+tlsSuffix)
	}
	return append(out, pFloor)
}

// runMem holds e.o.conns idle connections open end to end through the
// proxy port path (and, for comparison, through the two-relay floor) and
// reports the RSS they cost. Every repetition uses fresh processes, and
// the paths alternate.
func runMem(e *env) error {
	res := results{}
	vals := repValues{}
	names := memPaths(e.o)
	for rep := 0; rep < e.o.memReps; rep++ {
		for _, name := range rotate(names, rep) {
			per, err := memPath(e, res, name, rep)
			if err != nil {
				return err
			}
			vals.set(per, rep, name, "both", "per")
		}
	}
	addPlainRatios(res, vals, names, e.o.memReps, []string{"both", "per"})
	e.res["mem"] = res
	tb := &table{head: []string{"path", "process", "RSS before (MiB)", fmt.Sprintf("RSS with %d conns (MiB)", e.o.conns), "KiB per conn"}}
	for _, name := range names {
		roles := []string{"proxyserver", "agent", "both"}
		if name == pFloor {
			roles = []string{"relay1", "relay2", "both"}
		}
		for _, role := range roles {
			label := role
			if role == "both" {
				label = "**both ends**"
			}
			tb.row(name, label, res.get(name, role, "before").cell(1),
				res.get(name, role, "after").cell(1), res.get(name, role, "per").cell(1))
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## Memory: %d idle connections held open (%d repetitions, fresh processes each)\n\n", e.o.conns, e.o.memReps)
	b.WriteString(tb.String())
	fmt.Fprintf(&b, "\nEach connection is established end to end (an echo target returns 32 bytes on each) and then left idle. VmRSS is read once it has settled; \"before\" is after a warm-up of 10 connections (opened and closed) so one-time costs are not counted per connection. KiB per conn = (after − before) / %d.\n", e.o.conns)
	e.rep.add(b.String())
	return nil
}

// memPath starts fresh processes for one path of the memory test,
// measures it and stops them. It returns the KiB per connection of both
// ends.
func memPath(e *env, res results, name string, rep int) (float64, error) {
	if name == pFloor {
		ch, err := startChain(e.dir, e.ports, fmt.Sprintf("mem%d-floor", rep), 2, e.echo.addr(), pFloor)
		if err != nil {
			return 0, err
		}
		defer ch.stop()
		// The chain starts from the target end: procs[1] is relay1.
		return memOnce(e, res, name, ch.addr,
			[]memProc{{"relay1", ch.procs[1].pid()}, {"relay2", ch.procs[0].pid()}}, rep)
	}
	o := stackOpts{name: fmt.Sprintf("mem%d", rep), targets: []string{e.echo.addr()}}
	if _, withTLS := splitPath(name); withTLS {
		o.name, o.tls = o.name+"-tls", e.certs
	}
	st, err := e.startStack(o)
	if err != nil {
		return 0, err
	}
	defer st.stop()
	per, err := memOnce(e, res, name, st.proxy[e.echo.addr()],
		[]memProc{{"proxyserver", st.server.pid()}, {"agent", st.agent.pid()}}, rep)
	if err == nil {
		err = st.check()
	}
	return per, err
}

// memOnce measures one path: baseline, conns open, settled RSS. It
// returns the KiB per connection of all ps together.
func memOnce(e *env, res results, pathName, addr string, ps []memProc, rep int) (float64, error) {
	// Warm-up: pools, first stream, first dial.
	warm, err := openEcho(addr, 10)
	closeAll(warm)
	if err != nil {
		return 0, fmt.Errorf("memory warm-up through %s: %w", pathName, err)
	}
	time.Sleep(500 * time.Millisecond)
	before, err := settledRSS(ps)
	if err != nil {
		return 0, err
	}
	conns, err := openEcho(addr, e.o.conns)
	defer closeAll(conns)
	if err != nil {
		return 0, fmt.Errorf("memory test through %s: %w", pathName, err)
	}
	after, err := settledRSS(ps)
	if err != nil {
		return 0, err
	}
	var tb, ta int64
	var parts []string
	for i, p := range ps {
		res.add(float64(before[i])/1024, pathName, p.role, "before")
		res.add(float64(after[i])/1024, pathName, p.role, "after")
		per := float64(after[i]-before[i]) / float64(e.o.conns)
		res.add(per, pathName, p.role, "per")
		parts = append(parts, fmt.Sprintf("%s %.1f KiB/conn", p.role, per))
		tb += before[i]
		ta += after[i]
	}
	res.add(float64(tb)/1024, pathName, "both", "before")
	res.add(float64(ta)/1024, pathName, "both", "after")
	both := float64(ta-tb) / float64(e.o.conns)
	res.add(both, pathName, "both", "per")
	logf("mem rep %d/%d %-14s %s, both %.1f KiB/conn", rep+1, e.o.memReps, pathName, strings.Join(parts, ", "), both)
	return both, nil
}

// openEcho opens n connections to addr, 64 at a time, and checks a
// 32-byte echo on each. It returns the open connections.
func openEcho(addr string, n int) ([]net.Conn, error) {
	conns := make([]net.Conn, n)
	errs := make(chan error, n)
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := net.DialTimeout("tcp", addr, 10*time.Second)
			if err != nil {
				errs <- err
				return
			}
			msg := []byte(fmt.Sprintf("vpcbench-echo-%017d", i))[:32]
			_ = c.SetDeadline(time.Now().Add(20 * time.Second))
			got := make([]byte, len(msg))
			if _, err := c.Write(msg); err != nil {
				c.Close()
				errs <- err
				return
			}
			if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
				c.Close()
				errs <- fmt.Errorf("echo %d: %v (got %q)", i, err, got)
				return
			}
			_ = c.SetDeadline(time.Time{})
			conns[i] = c
		}()
	}
	wg.Wait()
	close(errs)
	var open []net.Conn
	for _, c := range conns {
		if c != nil {
			open = append(open, c)
		}
	}
	failed := 0
	var first error
	for err := range errs {
		if first == nil {
			first = err
		}
		failed++
	}
	if failed > 0 {
		return open, fmt.Errorf("%d of %d connections failed; first: %v", failed, n, first)
	}
	return open, nil
}

func closeAll(cs []net.Conn) {
	for _, c := range cs {
		c.Close()
	}
}

// settledRSS polls the processes' VmRSS every 500 ms until the total
// moves by less than max(64 KiB, 0.5 %) twice in a row (at most 15 s).
func settledRSS(ps []memProc) ([]int64, error) {
	read := func() ([]int64, int64, error) {
		out := make([]int64, len(ps))
		var sum int64
		for i, p := range ps {
			v, err := rssKiB(p.pid)
			if err != nil {
				return nil, 0, fmt.Errorf("%s: %w", p.role, err)
			}
			out[i] = v
			sum += v
		}
		return out, sum, nil
	}
	cur, sum, err := read()
	if err != nil {
		return nil, err
	}
	stable := 0
	deadline := time.Now().Add(15 * time.Second)
	for stable < 2 && time.Now().Before(deadline) {
		time.Sleep(500 * time.Millisecond)
		next, nsum, err := read()
		if err != nil {
			return nil, err
		}
		d := nsum - sum
		if d < 0 {
			d = -d
		}
		if d <= max(64, sum/200) {
			stable++
		} else {
			stable = 0
		}
		cur, sum = next, nsum
	}
	return cur, nil
}
