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

// runMem holds e.o.conns idle connections open end to end through the
// proxy port path (and, for comparison, through the two-relay floor) and
// reports the RSS they cost. Every repetition uses fresh processes.
func runMem(e *env) error {
	res := results{}
	for rep := 0; rep < e.o.memReps; rep++ {
		st, err := startStack(e.bins, e.dir, e.ports, stackOpts{name: fmt.Sprintf("mem%d", rep), targets: []string{e.echo.addr()}})
		if err != nil {
			return err
		}
		err = memOnce(e, res, "proxy-port", st.proxy[e.echo.addr()],
			[]memProc{{"proxyserver", st.server.pid()}, {"agent", st.agent.pid()}}, rep)
		if err == nil {
			err = st.check()
		}
		st.stop()
		if err != nil {
			return err
		}
		ch, err := startChain(e.dir, e.ports, fmt.Sprintf("mem%d-floor", rep), 2, e.echo.addr())
		if err != nil {
			return err
		}
		// The chain starts from the target end: procs[1] is relay1.
		err = memOnce(e, res, "floor", ch.addr,
			[]memProc{{"relay1", ch.procs[1].pid()}, {"relay2", ch.procs[0].pid()}}, rep)
		ch.stop()
		if err != nil {
			return err
		}
	}
	tb := &table{head: []string{"path", "process", "RSS before (MiB)", fmt.Sprintf("RSS with %d conns (MiB)", e.o.conns), "KiB per conn"}}
	for _, row := range []struct{ path, roles string }{
		{"proxy-port", "proxyserver,agent,both"}, {"floor", "relay1,relay2,both"}} {
		for _, role := range strings.Split(row.roles, ",") {
			name := role
			if role == "both" {
				name = "**both ends**"
			}
			tb.row(row.path, name, res.get(row.path, role, "before").cell(1),
				res.get(row.path, role, "after").cell(1), res.get(row.path, role, "per").cell(1))
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## Memory: %d idle connections held open (%d repetitions, fresh processes each)\n\n", e.o.conns, e.o.memReps)
	b.WriteString(tb.String())
	fmt.Fprintf(&b, "\nEach connection is established end to end (an echo target returns 32 bytes on each) and then left idle. VmRSS is read once it has settled; \"before\" is after a warm-up of 10 connections (opened and closed) so one-time costs are not counted per connection. KiB per conn = (after − before) / %d.\n", e.o.conns)
	e.rep.add(b.String())
	return nil
}

// memOnce measures one path: baseline, conns open, settled RSS.
func memOnce(e *env, res results, pathName, addr string, ps []memProc, rep int) error {
	// Warm-up: pools, first stream, first dial.
	warm, err := openEcho(addr, 10)
	closeAll(warm)
	if err != nil {
		return fmt.Errorf("memory warm-up through %s: %w", pathName, err)
	}
	time.Sleep(500 * time.Millisecond)
	before, err := settledRSS(ps)
	if err != nil {
		return err
	}
	conns, err := openEcho(addr, e.o.conns)
	defer closeAll(conns)
	if err != nil {
		return fmt.Errorf("memory test through %s: %w", pathName, err)
	}
	after, err := settledRSS(ps)
	if err != nil {
		return err
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
	res.add(float64(ta-tb)/float64(e.o.conns), pathName, "both", "per")
	logf("mem rep %d/%d %-10s %s, both %.1f KiB/conn", rep+1, e.o.memReps, pathName, strings.Join(parts, ", "),
		float64(ta-tb)/float64(e.o.conns))
	return nil
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
