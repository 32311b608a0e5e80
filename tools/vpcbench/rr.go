package main

import (
	"fmt"
	"strings"
)

// runRR: redis-benchmark -t get,set with 50 clients and with 1 client on
// every path, rrReps times, alternated.
func runRR(e *env, paths []*path) error {
	t := e.redisAddr
	res := results{}
	vals := repValues{}
	failures := map[string]int{}
	clients := []int{50, 1}
	nFor := func(c int) int {
		if c == 1 {
			return e.o.rrN1
		}
		return e.o.rrN50
	}
	tests := []string{"GET", "SET"}
	for rep := 0; rep < e.o.rrReps; rep++ {
		for _, p := range rotate(paths, rep) {
			for _, c := range clients {
				if err := p.check(); err != nil {
					return fmt.Errorf("path %s: %w", p.name, err)
				}
				n := nFor(c)
				c0, err := cpuOf(p.pids[t])
				if err != nil {
					return err
				}
				s0, err := rwSyscallsOf(p.pids[t])
				if err != nil {
					return err
				}
				rows, err := runRedisBench(p.addr[t], "get,set", n, c)
				c1, cerr := cpuOf(p.pids[t])
				s1, serr := rwSyscallsOf(p.pids[t])
				if cerr == nil {
					cerr = serr
				}
				if err != nil {
					failures[fmt.Sprint(p.name, c)]++
					logf("rr rep %d/%d %-15s -c %-2d FAILED: %v", rep+1, e.o.rrReps, p.name, c, err)
					continue
				}
				if cerr != nil {
					return cerr
				}
				cs := fmt.Sprint(c)
				var parts []string
				for _, r := range rows {
					res.add(r.rps, p.name, cs, r.test, "rps")
					res.add(r.p50, p.name, cs, r.test, "p50")
					res.add(r.p99, p.name, cs, r.test, "p99")
					vals.set(r.rps, rep, p.name, cs, r.test, "rps")
					vals.set(r.p50, rep, p.name, cs, r.test, "p50")
					parts = append(parts, fmt.Sprintf("%s %.0f/s p99 %.3f ms", r.test, r.rps, r.p99))
				}
				cpu := ""
				if len(p.pids[t]) > 0 {
					v := (c1 - c0) * 1e6 / float64(len(rows)*n)
					res.add(v, p.name, cs, "cpu")
					vals.set(v, rep, p.name, cs, "cpu")
					cpu = fmt.Sprintf(", %.1f CPU-µs/req", v)
					if p.kind != pFloor && p.kind != pFloorFw { // the floor relays splice(2): not counted
						sc := (s1 - s0) / float64(len(rows)*n)
						res.add(sc, p.name, cs, "syscalls")
						cpu += fmt.Sprintf(", %.2f read+write syscalls/req", sc)
					}
				}
				logf("rr rep %d/%d %-15s -c %-2d %s%s", rep+1, e.o.rrReps, p.name, c, strings.Join(parts, ", "), cpu)
			}
		}
	}
	for rep := 0; rep < e.o.rrReps; rep++ {
		for _, p := range paths {
			for _, c := range clients {
				for _, test := range tests {
					if r, ok := vals.ratio(rep, p.name, pDirect, fmt.Sprint(c), test, "rps"); ok {
						res.add(r, p.name, fmt.Sprint(c), test, "ratio")
						vals.set(r, rep, p.name, fmt.Sprint(c), test, "ratio")
					}
				}
			}
		}
	}
	var keys [][]string
	for _, c := range clients {
		cs := fmt.Sprint(c)
		for _, test := range tests {
			for _, m := range []string{"rps", "ratio", "p50"} {
				keys = append(keys, []string{cs, test, m})
			}
		}
		keys = append(keys, []string{cs, "cpu"})
	}
	addPlainRatios(res, vals, pathNames(paths), e.o.rrReps, keys...)
	e.res["rr"] = res
	tb := &table{head: []string{"path", "clients", "test", "req/s", "× direct", "p50 ms", "p99 ms", "CPU-µs/req", "syscalls/req", "note"}}
	for _, c := range clients {
		cs := fmt.Sprint(c)
		for _, test := range tests {
			for _, p := range paths {
				note := ""
				if n := failures[fmt.Sprint(p.name, c)]; n > 0 {
					note = fmt.Sprintf("%d of %d runs failed", n, e.o.rrReps)
				}
				if p.kind == pSocks {
					note = join2(note, "extra in-tool forwarder hop")
				}
				tb.row(p.name, cs, test, res.get(p.name, cs, test, "rps").cell(0),
					res.get(p.name, cs, test, "ratio").cell(2), res.get(p.name, cs, test, "p50").cell(3),
					res.get(p.name, cs, test, "p99").cell(3), res.get(p.name, cs, "cpu").cell(1),
					res.get(p.name, cs, "syscalls").cell(2), note)
			}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## Small requests: redis-benchmark -t get,set (%d alternated repetitions per path)\n\n", e.o.rrReps)
	fmt.Fprintf(&b, "-c 50 runs -n %d, -c 1 runs -n %d (each per test), against a private redis-server.\n\n", e.o.rrN50, e.o.rrN1)
	b.WriteString(tb.String())
	b.WriteString("\nCPU-µs/req: CPU of the intermediate processes over the whole redis-benchmark run (GET and SET together, including connection setup) divided by all its requests; the same value shows on the GET and SET rows. syscalls/req: read- and write-family system calls of those processes (syscr + syscw in /proc/PID/io), counted the same way; not shown for the floor, whose relays move data with splice(2), which those counters leave out.\n\n")
	b.WriteString(rrReference + "\n")
	e.rep.add(b.String())
	return nil
}
