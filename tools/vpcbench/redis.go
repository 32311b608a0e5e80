package main

import (
	"bytes"
	"encoding/csv"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// startRedis starts a private redis-server on addr: no persistence, never
// the shared one on 6379.
func startRedis(dir, addr string) (*proc, error) {
	_, port, _ := net.SplitHostPort(addr)
	p, err := startProc(dir, "redis-server", nil, "redis-server",
		"--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--daemonize", "no", "--protected-mode", "no", "--dir", dir, "--maxclients", "4096")
	if err != nil {
		return nil, err
	}
	if err := waitTCP(addr, p, 10*time.Second); err != nil {
		p.stop()
		return nil, err
	}
	return p, nil
}

// rbRow is one test line of redis-benchmark --csv.
type rbRow struct {
	test          string
	rps           float64
	avg, p50, p99 float64 // ms
}

// runRedisBench runs redis-benchmark against addr and parses its CSV
// (redis-benchmark 7 prints latency percentiles there).
func runRedisBench(addr, tests string, n, clients int) ([]rbRow, error) {
	host, port, _ := net.SplitHostPort(addr)
	cmd := exec.Command("redis-benchmark", "-h", host, "-p", port, "-t", tests,
		"-n", strconv.Itoa(n), "-c", strconv.Itoa(clients), "--csv")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	p, err := launch("redis-benchmark", cmd)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.done:
	case <-time.After(15 * time.Minute):
		_ = p.cmd.Process.Kill()
		<-p.done
		return nil, fmt.Errorf("redis-benchmark to %s hung", addr)
	}
	if p.err != nil {
		return nil, fmt.Errorf("redis-benchmark: %v: %s %s", p.err, strings.TrimSpace(errb.String()), strings.TrimSpace(out.String()))
	}
	return parseRedisCSV(out.Bytes())
}

func parseRedisCSV(b []byte) ([]rbRow, error) {
	recs, err := csv.NewReader(bytes.NewReader(b)).ReadAll()
	if err != nil {
		return nil, fmt.Errorf("redis-benchmark --csv: %v: %.200s", err, b)
	}
	if len(recs) < 2 {
		return nil, fmt.Errorf("redis-benchmark --csv: no results: %.200s", b)
	}
	col := map[string]int{}
	for i, h := range recs[0] {
		col[h] = i
	}
	for _, h := range []string{"test", "rps", "avg_latency_ms", "p50_latency_ms", "p99_latency_ms"} {
		if _, ok := col[h]; !ok {
			return nil, fmt.Errorf("redis-benchmark --csv has no %q column (redis-benchmark 7 or newer is needed): header %v", h, recs[0])
		}
	}
	var rows []rbRow
	for _, r := range recs[1:] {
		if len(r) != len(recs[0]) {
			continue
		}
		f := func(h string) float64 { v, _ := strconv.ParseFloat(r[col[h]], 64); return v }
		rows = append(rows, rbRow{test: r[col["test"]], rps: f("rps"), avg: f("avg_latency_ms"),
			p50: f("p50_latency_ms"), p99: f("p99_latency_ms")})
	}
	return rows, nil
}
