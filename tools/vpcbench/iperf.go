package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// startIperfServer starts "iperf3 -s" on addr.
func startIperfServer(dir, addr string) (*proc, error) {
	_, port, _ := net.SplitHostPort(addr)
	p, err := startProc(dir, "iperf3-server", nil, "iperf3", "-s", "-B", "127.0.0.1", "-p", port)
	if err != nil {
		return nil, err
	}
	if err := waitTCP(addr, p, 10*time.Second); err != nil {
		p.stop()
		return nil, err
	}
	return p, nil
}

type iperfResult struct {
	bps   float64 // receiver's bits per second
	bytes int64   // bytes received
}

// iperfArgs are the client arguments for addr.
func iperfArgs(addr string, secs int, reverse bool) []string {
	host, port, _ := net.SplitHostPort(addr)
	args := []string{"-c", host, "-p", port, "-t", strconv.Itoa(secs), "-J"}
	if reverse {
		args = append(args, "-R")
	}
	return args
}

// parseIperf reads the -J output of a client run.
func parseIperf(out []byte) (iperfResult, error) {
	var r struct {
		End struct {
			SumReceived struct {
				Bytes int64   `json:"bytes"`
				BPS   float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		return iperfResult{}, fmt.Errorf("iperf3 -J output: %v: %.200s", err, out)
	}
	if r.Error != "" {
		return iperfResult{}, fmt.Errorf("iperf3: %s", r.Error)
	}
	if r.End.SumReceived.Bytes == 0 {
		return iperfResult{}, fmt.Errorf("iperf3: nothing received")
	}
	return iperfResult{bps: r.End.SumReceived.BPS, bytes: r.End.SumReceived.Bytes}, nil
}

// runIperf runs one iperf3 client test against addr. A test that fails
// because the server is still busy with the previous one is retried.
func runIperf(addr string, secs int, reverse bool) (iperfResult, error) {
	var lastErr error
	for attempt := 0; attempt < 6; attempt++ {
		if attempt > 0 {
			time.Sleep(time.Second)
		}
		cmd := exec.Command("iperf3", iperfArgs(addr, secs, reverse)...)
		var out bytes.Buffer
		cmd.Stdout = &out
		p, err := launch("iperf3-client", cmd)
		if err != nil {
			return iperfResult{}, err
		}
		select {
		case <-p.done:
		case <-time.After(time.Duration(secs)*time.Second + 60*time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
			return iperfResult{}, fmt.Errorf("iperf3 client to %s hung", addr)
		}
		r, err := parseIperf(out.Bytes())
		if err == nil {
			return r, nil
		}
		lastErr = err
		if !strings.Contains(err.Error(), "busy") && !strings.Contains(err.Error(), "unable to") {
			break
		}
	}
	return iperfResult{}, lastErr
}

// bgIperf is an iperf3 client running in the background.
type bgIperf struct {
	p   *proc
	out bytes.Buffer
}

func startBgIperf(addr string, secs int) (*bgIperf, error) {
	b := &bgIperf{}
	cmd := exec.Command("iperf3", iperfArgs(addr, secs, false)...)
	cmd.Stdout = &b.out
	p, err := launch("iperf3-bg", cmd)
	if err != nil {
		return nil, err
	}
	b.p = p
	return b, nil
}

// stop interrupts the client (iperf3 reports and tells the server) and
// returns what it measured so far.
func (b *bgIperf) stop() (iperfResult, error) {
	b.p.signal(syscall.SIGINT, 10*time.Second)
	r, err := parseIperf(b.out.Bytes())
	if err != nil && strings.Contains(err.Error(), "interrupt") {
		// An interrupted run still reports what the sender sent.
		var s struct {
			End struct {
				SumSent struct {
					Bytes int64   `json:"bytes"`
					BPS   float64 `json:"bits_per_second"`
				} `json:"sum_sent"`
			} `json:"end"`
		}
		if json.Unmarshal(b.out.Bytes(), &s) == nil && s.End.SumSent.Bytes > 0 {
			return iperfResult{bps: s.End.SumSent.BPS, bytes: s.End.SumSent.Bytes}, nil
		}
	}
	return r, err
}
