package server

import (
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/registry"
)

func key(s string) registry.Key { return registry.Key{Addr: netip.MustParseAddrPort(s)} }

func TestPortsQuarantine(t *testing.T) {
	now := time.Unix(1000, 0)
	p := NewPorts(100, 101, 30*time.Second, func() time.Time { return now })
	a, b := key("10.0.0.1:80"), key("10.0.0.2:80")

	pa, err := p.Take(a, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := p.Take(b, 0, nil)
	if err != nil || pb == pa {
		t.Fatalf("second port %d, %v", pb, err)
	}
	if _, err := p.Take(key("10.0.0.3:80"), 0, nil); !errors.Is(err, ErrNoPort) {
		t.Fatalf("full range: %v, want ErrNoPort", err)
	}
	p.Release(pa)
	// Within the quarantine another target cannot have pa ...
	if _, err := p.Take(key("10.0.0.3:80"), 0, nil); !errors.Is(err, ErrNoPort) {
		t.Fatalf("quarantined port given away: %v", err)
	}
	if _, err := p.Take(key("10.0.0.3:80"), pa, nil); !errors.Is(err, ErrNoPort) {
		t.Fatalf("quarantined port given away on a fixed request: %v", err)
	}
	// ... but its own target gets it back at once.
	if got, err := p.Take(a, 0, nil); err != nil || got != pa {
		t.Fatalf("same target: got %d, %v; want its old port %d", got, err, pa)
	}
	p.Release(pa)
	now = now.Add(30 * time.Second)
	if got, err := p.Take(key("10.0.0.3:80"), 0, nil); err != nil || got != pa {
		t.Fatalf("after the quarantine: got %d, %v; want %d", got, err, pa)
	}
}

func TestPortsFixedAndSkip(t *testing.T) {
	p := NewPorts(100, 110, time.Minute, nil)
	a := key("10.0.0.1:80")
	if _, err := p.Take(a, 99, nil); !errors.Is(err, ErrPortRange) {
		t.Fatalf("fixed port outside the range: %v", err)
	}
	if got, err := p.Take(a, 105, nil); err != nil || got != 105 {
		t.Fatalf("fixed: %d, %v", got, err)
	}
	if _, err := p.Take(key("10.0.0.2:80"), 105, nil); !errors.Is(err, ErrNoPort) {
		t.Fatalf("fixed port in use: %v", err)
	}
	skip := map[int]bool{}
	for port := 100; port <= 110; port++ {
		if port != 107 {
			skip[port] = true
		}
	}
	if got, err := p.Take(key("10.0.0.3:80"), 0, skip); err != nil || got != 107 {
		t.Fatalf("with skips: %d, %v; want 107", got, err)
	}
	p.Drop(107) // a port that failed to bind is not quarantined
	if got, err := p.Take(key("10.0.0.4:80"), 107, nil); err != nil || got != 107 {
		t.Fatalf("dropped port: %d, %v", got, err)
	}
}
