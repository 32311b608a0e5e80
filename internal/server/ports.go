package server

import (
	"errors"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/vpcreach/vpcreach/registry"
)

// ErrNoPort means the proxy port range has no port to give.
var (
	ErrNoPort    = errors.New("no free proxy port")
	ErrPortRange = errors.New("fixed proxy port outside the server's port range")
)

// Ports allocates proxy ports from a range. A released port stays
// reserved for its last target for the quarantine, so a stale route in a
// cache never reaches a different target on that port; the same target
// gets its old port back whenever it is free.
type Ports struct {
	lo, hi     int
	quarantine time.Duration
	now        func() time.Time

	mu    sync.Mutex
	inUse map[int]registry.Key
	freed map[int]freed        // released ports, by port
	last  map[registry.Key]int // the last port each key held
}

type freed struct {
	key registry.Key
	at  time.Time
}

// NewPorts returns an allocator for [lo, hi].
func NewPorts(lo, hi int, quarantine time.Duration, now func() time.Time) *Ports {
	if now == nil {
		now = time.Now
	}
	return &Ports{lo: lo, hi: hi, quarantine: quarantine, now: now,
		inUse: map[int]registry.Key{}, freed: map[int]freed{}, last: map[registry.Key]int{}}
}

// available reports whether port may go to k now. Called with mu held.
func (p *Ports) available(port int, k registry.Key) bool {
	if _, used := p.inUse[port]; used {
		return false
	}
	f, ok := p.freed[port]
	if !ok || f.key == k {
		return true
	}
	if p.now().Sub(f.at) >= p.quarantine {
		delete(p.freed, port)
		return true
	}
	return false
}

// Take reserves a port for k: fixed if nonzero, else k's last port if it
// is available, else a random available one. skip lists ports that failed
// to bind; they are not tried again.
func (p *Ports) Take(k registry.Key, fixed int, skip map[int]bool) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if fixed != 0 {
		if fixed < p.lo || fixed > p.hi {
			return 0, ErrPortRange
		}
		if !p.available(fixed, k) || skip[fixed] {
			return 0, ErrNoPort
		}
		return p.take(fixed, k), nil
	}
	if last, ok := p.last[k]; ok && p.available(last, k) && !skip[last] && last >= p.lo && last <= p.hi {
		return p.take(last, k), nil
	}
	n := p.hi - p.lo + 1
	start := rand.IntN(n)
	for i := range n {
		port := p.lo + (start+i)%n
		if p.available(port, k) && !skip[port] {
			return p.take(port, k), nil
		}
	}
	return 0, ErrNoPort
}

func (p *Ports) take(port int, k registry.Key) int {
	p.inUse[port] = k
	delete(p.freed, port)
	p.last[k] = port
	return port
}

// Release returns a port; it enters quarantine for its key.
func (p *Ports) Release(port int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	k, ok := p.inUse[port]
	if !ok {
		return
	}
	delete(p.inUse, port)
	p.freed[port] = freed{key: k, at: p.now()}
}

// Drop returns a port that was never handed out (it failed to bind),
// without quarantine.
func (p *Ports) Drop(port int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.inUse, port)
}
