package agent

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

func TestBackoff(t *testing.T) {
	const samples = 2000
	for _, tc := range []struct {
		max   time.Duration
		ceils []time.Duration // ceiling for n = 0, 1, ...; the last repeats
	}{
		{15 * time.Second, []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second,
			2 * time.Second, 4 * time.Second, 8 * time.Second, 15 * time.Second}},
		{time.Second, []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second}},
		{100 * time.Millisecond, []time.Duration{100 * time.Millisecond}},
	} {
		a := &Agent{}
		a.live.Store(&liveConfig{Config: Config{BackoffMax: tc.max}})
		for n := 0; n < len(tc.ceils)+3; n++ {
			ceil := tc.ceils[min(n, len(tc.ceils)-1)]
			lo, hi := time.Duration(1<<62), time.Duration(-1)
			seen := map[time.Duration]bool{}
			for range samples {
				d := a.backoff(n)
				if d < 0 || d > ceil {
					t.Fatalf("max %v: backoff(%d) = %v; want within [0, %v]", tc.max, n, d, ceil)
				}
				lo, hi = min(lo, d), max(hi, d)
				seen[d] = true
			}
			// Full jitter: spread over the whole range, not a constant.
			// (All samples in one quarter has probability 4^-2000.)
			if lo > ceil/4 || hi < ceil*3/4 || len(seen) < samples/2 {
				t.Fatalf("max %v: backoff(%d) over %d samples: min %v, max %v, %d distinct; want spread over [0, %v]",
					tc.max, n, samples, lo, hi, len(seen), ceil)
			}
		}
	}
	// A huge attempt count neither overflows nor exceeds the cap.
	a := &Agent{}
	a.live.Store(&liveConfig{Config: Config{BackoffMax: 15 * time.Second}})
	for range 100 {
		if d := a.backoff(1 << 30); d < 0 || d > 15*time.Second {
			t.Fatalf("backoff(1<<30) = %v", d)
		}
	}
}

func TestNextGenMonotonic(t *testing.T) {
	a := &Agent{}
	var prev uint64
	for i := range 10000 {
		before := uint64(time.Now().UnixNano())
		g := a.nextGen()
		if g <= prev {
			t.Fatalf("call %d: generation %d after %d; want strictly increasing", i, g, prev)
		}
		if g < before {
			t.Fatalf("call %d: generation %d is before the clock at the call (%d)", i, g, before)
		}
		prev = g
	}
}

func TestNextGenClockStepsBack(t *testing.T) {
	a := &Agent{}
	future := uint64(time.Now().Add(time.Hour).UnixNano())
	a.lastGen = future // as if the wall clock had since stepped back an hour
	if g := a.nextGen(); g != future+1 {
		t.Fatalf("generation %d after %d with the clock behind; want %d", g, future, future+1)
	}
}

func TestNextGenConcurrentUnique(t *testing.T) {
	a := &Agent{}
	const workers, each = 8, 2000
	gens := make([][]uint64, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				gens[w] = append(gens[w], a.nextGen())
			}
		}()
	}
	wg.Wait()
	seen := map[uint64]bool{}
	for _, gs := range gens {
		for i, g := range gs {
			if i > 0 && g <= gs[i-1] {
				t.Fatalf("one goroutine saw %d after %d", g, gs[i-1])
			}
			if seen[g] {
				t.Fatalf("generation %d minted twice", g)
			}
			seen[g] = true
		}
	}
}

// dialLoopback returns a TCP connection from a fresh listener on addr
// (e.g. "127.0.0.1:0"), closed at cleanup.
func dialLoopback(t *testing.T, addr string) net.Conn {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		testutil.Skip(t, "no "+addr+" listener: "+err.Error())
	}
	testutil.Serve(t, ln, func(c net.Conn) { _, _ = io.Copy(io.Discard, c); c.Close() })
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestResolveTargetsFillsLocalIP(t *testing.T) {
	yaml := validYAML(t) + `targets:
  - addr: ":8080"
    proxy_port: 20080
  - addr: 10.0.0.5:22
  - addr: ":8080"
    network: lab
  - addr: "[::ffff:10.0.0.6]:23"
`
	for _, tc := range []struct {
		listen string
		local  netip.Addr
	}{
		{"127.0.0.1:0", netip.MustParseAddr("127.0.0.1")},
		{"[::1]:0", netip.MustParseAddr("::1")},
	} {
		t.Run(tc.listen, func(t *testing.T) {
			conn := dialLoopback(t, tc.listen)
			var cfg Config
			if err := config.Parse([]byte(yaml), &cfg); err != nil {
				t.Fatal(err)
			}
			exposed, targets := resolveTargets(cfg.Targets, localAddr(conn))
			want := []struct {
				network string
				addr    netip.AddrPort
				port    uint16
			}{
				{"", netip.AddrPortFrom(tc.local, 8080), 20080},
				{"", netip.MustParseAddrPort("10.0.0.5:22"), 0},
				{"lab", netip.AddrPortFrom(tc.local, 8080), 0},
				{"", netip.MustParseAddrPort("10.0.0.6:23"), 0},
			}
			if len(targets) != len(want) || len(exposed) != len(want) {
				t.Fatalf("%d targets, %d exposed; want %d each: %v", len(targets), len(exposed), len(want), targets)
			}
			for i, w := range want {
				got := targets[i]
				if got.Network != w.network || got.Addr != w.addr || got.Port != w.port {
					t.Errorf("target %d = %+v; want network %q addr %v proxy port %d", i, got, w.network, w.addr, w.port)
				}
				if e, ok := exposed[registry.Key{Network: w.network, Addr: w.addr}]; !ok || e.Target != got {
					t.Errorf("exposed[%s/%v] = %+v, %v; want %+v", w.network, w.addr, e, ok, got)
				}
			}
		})
	}
}

func TestDialGuard(t *testing.T) {
	tg := func(s string) tunnel.Target { return tunnel.Target{Addr: netip.MustParseAddrPort(s)} }
	for _, tc := range []struct {
		target, dial string
		explicit     bool
		ok           bool
	}{
		{"10.1.0.5:6379", "10.1.0.5:6379", false, true},
		{"10.1.0.5:6379", "10.1.0.6:6379", false, false},           // not the exposed target
		{"10.1.0.5:6379", "10.1.0.5:6380", false, false},           // another port
		{"127.0.0.1:22", "127.0.0.1:22", false, false},             // loopback, resolved from ":22"
		{"127.0.0.1:22", "127.0.0.1:22", true, true},               // named explicitly
		{"169.254.169.254:80", "169.254.169.254:80", false, false}, // metadata
		{"169.254.169.254:80", "[::ffff:169.254.169.254]:80", false, false},
		{"[fd00:ec2::254]:80", "[fd00:ec2::254]:80", false, false},
		{"[fe80::1]:80", "[fe80::1]:80", false, false},
		{"[::1]:80", "[::1]:80", true, true},
	} {
		err := dialGuard(tg(tc.target), tc.explicit)("tcp", tc.dial, nil)
		if (err == nil) != tc.ok {
			t.Errorf("target %s explicit %v, dial %s: %v; want ok=%v", tc.target, tc.explicit, tc.dial, err, tc.ok)
		}
		if err != nil && !errors.Is(err, errDestination) {
			t.Errorf("error %v is not errDestination", err)
		}
	}
}
