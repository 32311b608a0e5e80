package main

import (
	"fmt"
	"strings"
	"time"
)

// The defaults of tunnel.Settings (tunnel/settings.go), around which the
// window test varies one setting at a time.
const (
	defWindow = 4 << 20
	defWBuf   = 256 << 10
)

// windowSettings lists the tunnel settings the window test tries.
func windowSettings(o *options) []tunnelSet {
	var out []tunnelSet
	seen := map[tunnelSet]bool{}
	addSet := func(w, b int64) {
		s := tunnelSet{window: uint32(w), wbuf: int(b)}
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	if o.grid {
		for _, w := range o.windows {
			for _, b := range o.wbufs {
				addSet(w, b)
			}
		}
		return out
	}
	for _, w := range o.windows {
		addSet(w, defWBuf)
	}
	for _, b := range o.wbufs {
		addSet(defWindow, b)
	}
	return out
}

// runWindow measures, through a delay relay between agent and server,
// the single-stream throughput on the proxy port path and the latency of
// small requests on the same tunnel while one bulk stream runs.
func runWindow(e *env) error {
	settings := windowSettings(e.o)
	targets := []string{e.iperfAddr, e.redisAddr}
	var rows []*winRow
	idle := map[time.Duration]*winRow{}
	// -tls both compares TLS on the core paths; this test varies the
	// tunnel settings, and runs with TLS only under -tls on.
	var certs *tlsFiles
	if e.o.tls == tlsOn {
		certs = e.certs
	}
	for si, set := range settings {
		logf("window: starting stack with window %s, write_buffer %s (through the delay relay)",
			sizeName(int64(set.window)), sizeName(int64(set.wbuf)))
		st, err := e.startStack(stackOpts{name: fmt.Sprintf("win%d", si), tunnel: set,
			targets: targets, viaDelay: true, tls: certs})
		if err != nil {
			return err
		}
		iperfAddr, redisAddr := st.proxy[e.iperfAddr], st.proxy[e.redisAddr]
		for _, rtt := range e.o.rtts {
			r := &winRow{set: set, rtt: rtt}
			rows = append(rows, r)
			st.delay.setRTT(rtt)
			time.Sleep(300 * time.Millisecond)
			if err := st.check(); err != nil {
				st.stop()
				return err
			}
			if res, err := runIperf(iperfAddr, e.o.winSecs, false); err != nil {
				r.note = join2(r.note, "bulk: "+err.Error())
				logf("window %s: bulk FAILED: %v", r.label(), err)
			} else {
				r.bulk = samples{res.bps / 1e9}
			}
			// Small requests with the tunnel idle: once per RTT.
			if idle[rtt] == nil {
				ir := &winRow{rtt: rtt}
				idle[rtt] = ir
				if p50, p99, n, err := timedGets(redisAddr, rtt, e.o.winBudget); err != nil {
					ir.note = err.Error()
				} else {
					ir.idleP50, ir.idleP99, ir.idleN = samples{p50}, samples{p99}, n
				}
			}
			bg, err := startBgIperf(iperfAddr, 600)
			if err != nil {
				st.stop()
				return err
			}
			// Let the stream ramp up (its setup takes a few RTTs).
			time.Sleep(time.Second + 4*rtt)
			p50, p99, n, gerr := timedGets(redisAddr, rtt, e.o.winBudget)
			bres, berr := bg.stop()
			if gerr != nil {
				r.note = join2(r.note, "GET: "+gerr.Error())
			} else {
				r.p50, r.p99, r.n = samples{p50}, samples{p99}, n
			}
			if berr == nil {
				r.bulkLoaded = samples{bres.bps / 1e9}
			} else {
				r.note = join2(r.note, "background bulk: "+berr.Error())
			}
			logf("window %s: bulk %s Gbit/s; GET under load p50 %s p99 %s ms (n=%d)%s", r.label(),
				r.bulk.cell(3), r.p50.cell(2), r.p99.cell(2), r.n, noteSuffix(r.note))
		}
		st.stop()
	}
	tb := &table{head: []string{"window", "write_buffer", "RTT ms", "window/RTT cap Gbit/s", "bulk Gbit/s",
		"GET p50 under load ms", "GET p99 under load ms", "GETs", "bulk during GETs Gbit/s", "note"}}
	for _, rtt := range e.o.rtts {
		ir := idle[rtt]
		if ir == nil {
			continue
		}
		tb.row("(tunnel idle)", "", fmtNum(float64(rtt)/1e6, 0), "", "", ir.idleP50.cell(2)+" (no load)",
			ir.idleP99.cell(2)+" (no load)", fmt.Sprint(ir.idleN), "", ir.note)
	}
	for _, r := range rows {
		capG := float64(r.set.window) * 8 / r.rtt.Seconds() / 1e9
		mark := ""
		if r.set.window == defWindow && r.set.wbuf == defWBuf {
			mark = " (defaults)"
		}
		tb.row(sizeName(int64(r.set.window))+mark, sizeName(int64(r.set.wbuf)), fmtNum(float64(r.rtt)/1e6, 0),
			fmtNum(capG, 2), r.bulk.cell(2), r.p50.cell(2), r.p99.cell(2), fmt.Sprint(r.n), r.bulkLoaded.cell(2), r.note)
	}
	var b strings.Builder
	tlsNote := ""
	switch {
	case certs != nil:
		tlsNote = ", tunnel with TLS"
	case e.o.tls != tlsOff:
		tlsNote = ", tunnel without TLS"
	}
	fmt.Fprintf(&b, "## Window: tunnel.window and tunnel.write_buffer under added RTT (proxy-port path%s, one run each)\n\n", tlsNote)
	fmt.Fprintf(&b, "The agent dials an in-tool delay relay that forwards to the proxyserver's control port, adding RTT/2 each way without limiting bandwidth (it queues rate × delay). bulk: iperf3 -t %d, client → target, one stream. GETs: redis-benchmark -c 1 -t get through the same tunnel while one iperf3 stream runs; -n is sized from a 20-request probe to last about %s (at most 5000, at least 100), so p99 at high RTT rests on few samples. The (tunnel idle) rows are the same GETs with no bulk stream.\n\n", e.o.winSecs, e.o.winBudget)
	b.WriteString(tb.String())
	b.WriteString("\nOne stream moves at most window/RTT; a window larger than the bandwidth-delay product only adds queueing in front of other streams on the tunnel (seen as GET latency under load). write_buffer bounds what the tunnel's write combiner queues ahead of the socket.\n")
	e.rep.add(b.String())
	return nil
}

// winRow is one line of the window table.
type winRow struct {
	set              tunnelSet
	rtt              time.Duration
	bulk, bulkLoaded samples
	p50, p99         samples
	n                int
	note             string
	idleP50, idleP99 samples
	idleN            int
}

func (r *winRow) label() string {
	return fmt.Sprintf("window %s wbuf %s RTT %v", sizeName(int64(r.set.window)), sizeName(int64(r.set.wbuf)), r.rtt)
}

func noteSuffix(s string) string {
	if s == "" {
		return ""
	}
	return " [" + s + "]"
}

// timedGets runs redis-benchmark -c 1 -t get against addr: a probe of 20
// requests sizes -n to last about budget (100..5000), then the real run.
// It returns p50 and p99 in ms and the -n used.
func timedGets(addr string, rtt time.Duration, budget time.Duration) (p50, p99 float64, n int, err error) {
	probe, err := runRedisBench(addr, "get", 20, 1)
	if err != nil {
		return 0, 0, 0, err
	}
	avg := rtt.Seconds() * 1000
	if len(probe) > 0 && probe[0].avg > 0 {
		avg = probe[0].avg
	}
	n = int(budget.Seconds() * 1000 / avg)
	n = min(max(n, 100), 5000)
	rows, err := runRedisBench(addr, "get", n, 1)
	if err != nil {
		return 0, 0, n, err
	}
	if len(rows) == 0 {
		return 0, 0, n, fmt.Errorf("no GET result")
	}
	return rows[0].p50, rows[0].p99, n, nil
}
