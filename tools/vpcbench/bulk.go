package main

import (
	"fmt"
	"strings"
)

// Reference figures measured elsewhere (2-core machine, port-forward
// path), printed beside the results for context.
const bulkReference = `Reference (measured elsewhere, 2-core machine, port-forward path, one stream): frp 0.70.1 0.21x direct at 3.2 CPU-s/GB; chisel 1.11.5 0.14x at 4.9 CPU-s/GB; the floor measured 0.33–0.36x there.`

const rrReference = `Reference (measured elsewhere, 2-core machine, port-forward path): 50-client GET at 0.26x / 0.33x of direct at 53 / 39 CPU-µs per request; the floor measured 0.33–0.36x there.`

type direction struct {
	name    string
	reverse bool
}

var directions = []direction{{"up (client→target)", false}, {"down (-R)", true}}

// runBulk: iperf3 -t secs each way on every path, reps times, alternated.
func runBulk(e *env, paths []*path) error {
	t := e.iperfAddr
	res := results{}
	vals := repValues{}
	failures := map[string]int{}
	for rep := 0; rep < e.o.reps; rep++ {
		for _, p := range rotate(paths, rep) {
			for _, d := range directions {
				if err := p.check(); err != nil {
					return fmt.Errorf("path %s: %w", p.name, err)
				}
				c0, err := cpuOf(p.pids[t])
				if err != nil {
					return err
				}
				r, err := runIperf(p.addr[t], e.o.secs, d.reverse)
				c1, cerr := cpuOf(p.pids[t])
				if err != nil {
					failures[p.name+"|"+d.name]++
					logf("bulk rep %d/%d %-15s %-18s FAILED: %v", rep+1, e.o.reps, p.name, d.name, err)
					continue
				}
				if cerr != nil {
					return cerr
				}
				gbps := r.bps / 1e9
				res.add(gbps, p.name, d.name, "gbps")
				vals.set(gbps, rep, p.name, d.name, "gbps")
				cpuGB := ""
				if len(p.pids[t]) > 0 {
					v := (c1 - c0) / (float64(r.bytes) / 1e9)
					res.add(v, p.name, d.name, "cpu")
					vals.set(v, rep, p.name, d.name, "cpu")
					cpuGB = fmt.Sprintf(", %.2f CPU-s/GB", v)
				}
				logf("bulk rep %d/%d %-15s %-18s %6.2f Gbit/s%s", rep+1, e.o.reps, p.name, d.name, gbps, cpuGB)
			}
		}
	}
	for rep := 0; rep < e.o.reps; rep++ {
		for _, p := range paths {
			for _, d := range directions {
				if r, ok := vals.ratio(rep, p.name, pDirect, d.name, "gbps"); ok {
					res.add(r, p.name, d.name, "ratio")
					vals.set(r, rep, p.name, d.name, "ratio")
				}
			}
		}
	}
	var keys [][]string
	for _, d := range directions {
		keys = append(keys, []string{d.name, "gbps"}, []string{d.name, "ratio"}, []string{d.name, "cpu"})
	}
	addPlainRatios(res, vals, pathNames(paths), e.o.reps, keys...)
	e.res["bulk"] = res
	tb := &table{head: []string{"path", "direction", "Gbit/s", "× direct", "CPU-s/GB", "note"}}
	for _, d := range directions {
		for _, p := range paths {
			note := ""
			if n := failures[p.name+"|"+d.name]; n > 0 {
				note = fmt.Sprintf("%d of %d runs failed", n, e.o.reps)
			}
			if p.kind == pSocks {
				note = join2(note, "extra in-tool forwarder hop: compare with floor+fwd")
			}
			tb.row(p.name, d.name, res.get(p.name, d.name, "gbps").cell(2),
				res.get(p.name, d.name, "ratio").cell(2), res.get(p.name, d.name, "cpu").cell(2), note)
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "## Bulk: one TCP stream (iperf3 -t %d, %d alternated repetitions per path and direction)\n\n", e.o.secs, e.o.reps)
	b.WriteString(tb.String())
	b.WriteString("\n× direct is taken per repetition (same repetition's direct run), then summarised. CPU-s/GB: utime+stime of the intermediate processes during the run, per 10^9 bytes received.\n\n")
	b.WriteString(bulkReference + "\n")
	e.rep.add(b.String())
	return nil
}

func join2(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}
