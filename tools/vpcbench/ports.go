package main

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

// ports hands out loopback ports below the ephemeral range (so that the
// thousands of outgoing connections of a run never take one), each
// checked free by binding it, and never the same one twice in a run.
type portAlloc struct {
	mu     sync.Mutex
	next   int
	lo, hi int
}

func newPortAlloc() *portAlloc {
	hi := 32767
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if v, err := strconv.Atoi(f[0]); err == nil && v > 12000 {
				hi = v - 1
			}
		}
	}
	lo := 10000
	// A random start keeps two concurrent runs apart.
	start := lo + rand.IntN((hi-lo)/2)
	return &portAlloc{next: start, lo: lo, hi: hi}
}

func portFree(p int) bool {
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

// take returns the first of n consecutive free ports.
func (a *portAlloc) take(n int) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	wrapped := false
	for {
		if a.next+n-1 > a.hi {
			if wrapped {
				return 0, fmt.Errorf("no %d consecutive free loopback ports in %d-%d", n, a.lo, a.hi)
			}
			a.next, wrapped = a.lo, true
		}
		ok := true
		for p := a.next; p < a.next+n; p++ {
			if !portFree(p) {
				a.next = p + 1
				ok = false
				break
			}
		}
		if ok {
			base := a.next
			a.next += n
			return base, nil
		}
	}
}

// addr returns a fresh 127.0.0.1:port.
func (a *portAlloc) addr() (string, error) {
	p, err := a.take(1)
	if err != nil {
		return "", err
	}
	return hostPort(p), nil
}

func hostPort(p int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)) }
