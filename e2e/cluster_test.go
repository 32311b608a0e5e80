package e2e

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/internal/proxyproto"
	"github.com/vpcreach/vpcreach/internal/redistest"
	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

var clusterPrefixes atomic.Int64

// redisReg opens a registry on srv under a prefix of its own; several
// calls with the same prefix are the members of one cluster.
func redisReg(t *testing.T, srv *redistest.Server, prefix string) *registry.Redis {
	t.Helper()
	return redisRegAt(t, srv.Addr, prefix)
}

func withLease(d time.Duration) serverOpt { return func(c *server.Config) { c.Lease = d } }

// Two members share one Redis: a SOCKS5 front end on member B reaches a
// target whose tunnel ends on member A, through A's relay port; when A goes
// away the agent moves to B and B's front end follows the new route.
func TestClusterSharedRedis(t *testing.T) {
	srv := redistest.Start(t)
	prefix := fmt.Sprintf("cl%d:", clusterPrefixes.Add(1))
	regA, regB := redisReg(t, srv, prefix), redisReg(t, srv, prefix)
	a := startServer(t, regA, nil)
	b := startServer(t, regB, nil, withSocks())
	target := testutil.EchoTarget(t)
	startAgent(t, []string{a.ControlAddr().String(), b.ControlAddr().String()}, []string{target}, nil)
	rt := waitRoute(t, regB, target, "")
	if rt.Relay.String() != a.RelayAddr().String() {
		t.Fatalf("route names relay %v, want member A's %v", rt.Relay, a.RelayAddr())
	}
	c, rep := socksConnect(t, b.SocksAddr().String(), target)
	if rep != 0 {
		t.Fatalf("SOCKS5 via member B to a tunnel on member A: reply %d", rep)
	}
	echoOnce(t, c, "through A")
	c.Close()

	a.Close()
	testutil.Eventually(t, 10*time.Second, "the route moved to member B", func() bool {
		r, err := regB.Lookup(t.Context(), rt.Key)
		return err == nil && r.Relay.String() == b.RelayAddr().String()
	})
	testutil.Eventually(t, 10*time.Second, "a SOCKS5 connect through member B after the move", func() bool {
		c, rep := socksConnect(t, b.SocksAddr().String(), target)
		if rep != 0 {
			return false
		}
		defer c.Close()
		echoOnce(t, c, "through B")
		return true
	})
}

// balancer is an in-test L4 balancer in front of control listeners: it
// forwards each connection to the next backend that accepts, prefixed
// with a PROXY v2 header naming src as the client (haproxy send-proxy-v2).
type balancer struct {
	ln       net.Listener
	backends []string
	src      netip.AddrPort
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	next     int
}

func startBalancer(t *testing.T, src netip.AddrPort, backends ...string) *balancer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &balancer{ln: ln, backends: backends, src: src, conns: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.wg.Add(1)
			go func() { defer b.wg.Done(); b.forward(c) }()
		}
	}()
	t.Cleanup(b.Close)
	return b
}

func (b *balancer) Addr() string { return b.ln.Addr().String() }

func (b *balancer) track(c net.Conn) {
	b.mu.Lock()
	b.conns[c] = struct{}{}
	b.mu.Unlock()
}

func (b *balancer) forward(c net.Conn) {
	b.track(c)
	defer c.Close()
	var up net.Conn
	for range b.backends { // redispatch: try the next backend on failure
		b.mu.Lock()
		addr := b.backends[b.next%len(b.backends)]
		b.next++
		b.mu.Unlock()
		if u, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			up = u
			break
		}
	}
	if up == nil {
		return
	}
	b.track(up)
	defer up.Close()
	dst := netip.MustParseAddrPort(up.RemoteAddr().String())
	if _, err := up.Write(proxyproto.AppendV2(nil, b.src, dst)); err != nil {
		return
	}
	_, _, _ = netx.Join(c, c, up, time.Minute)
}

func (b *balancer) Close() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// Behind a balancer the control listener takes the agent's address from
// the PROXY v2 header; its LOCAL health checks are quiet; a connection from
// the balancer without a header is refused with a log line.
func TestProxyProtocolFromBalancer(t *testing.T) {
	var logs testutil.LogBuffer
	reg := registry.NewMemory(nil)
	s := startServer(t, reg, logger(&logs), func(c *server.Config) {
		c.ProxyProtocolFrom = []string{"127.0.0.1"}
		c.MaxTunnelsPerSource = 1
	})
	agentAddr := netip.MustParseAddrPort("198.51.100.7:4242")
	lb := startBalancer(t, agentAddr, s.ControlAddr().String())
	target := testutil.EchoTarget(t)
	startAgent(t, []string{lb.Addr()}, []string{target}, nil)
	waitRoute(t, reg, target, "")
	// The route is written during the handshake; the session is listed
	// once the handshake completes.
	testutil.Eventually(t, 5*time.Second, "the agent session listed", func() bool { return len(s.Agents()) == 1 })
	agents := s.Agents()
	if len(agents) != 1 || agents[0].Remote != agentAddr.String() {
		t.Fatalf("agents = %+v, want one with remote %v (from the PROXY header)", agents, agentAddr)
	}
	if !strings.Contains(logs.String(), "remote="+agentAddr.String()) {
		t.Errorf("log lines do not name the real agent address %v:\n%s", agentAddr, logs.String())
	}

	// The per-source cap counts the real address too: a second tunnel
	// "from" the agent's address through the balancer is refused.
	second, err := net.Dial("tcp", lb.Addr())
	if err != nil {
		t.Fatal(err)
	}
	expectClosed(t, second)
	second.Close()
	testutil.Eventually(t, 5*time.Second, "the per-source cap refusing the agent's address", func() bool {
		return s.Stats.SourceCapped.Load() == 1 &&
			strings.Contains(logs.String(), "too many control connections from this source")
	})
	if !strings.Contains(logs.String(), "remote="+agentAddr.String()+" limit=1") || len(s.Agents()) != 1 {
		t.Fatalf("cap log or live agent wrong:\n%s", logs.String())
	}

	refusals := s.Stats.Refusals.Load()
	hc := dialTCP(t, s.ControlAddr().String())
	if _, err := hc.Write(proxyproto.AppendLocal(nil)); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, hc)
	if got := s.Stats.Refusals.Load(); got != refusals {
		t.Fatalf("a LOCAL health check counted as a refusal (%d -> %d)", refusals, got)
	}

	bad := dialTCP(t, s.ControlAddr().String())
	if _, err := bad.Write(append([]byte(tunnel.Magic[:]), 0, 0, 0, 2, '{', '}')); err != nil {
		t.Fatal(err)
	}
	expectClosed(t, bad)
	testutil.Eventually(t, 5*time.Second, "log line for a header-less connection from the balancer", func() bool {
		return strings.Contains(logs.String(), "bad PROXY protocol header")
	})
	if len(s.Agents()) != 1 {
		t.Fatal("the live agent was harmed by the bad connection")
	}
}

// expectClosed reads c until the server closes it.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("server did not close the connection within 5 s")
	}
}

// A registry that hangs (its host gone: no RST, no answer) must not stall
// agents: a hello is answered within the claim budget, its route is served
// on the member's own port, and registered once the registry answers
// again; the renewal loop spends one timeout per round, not one per route.
func TestRegistryHangs(t *testing.T) {
	srv := redistest.Start(t)
	link := testutil.NewBlackhole(t, srv.Addr)
	prefix := fmt.Sprintf("cl%d:", clusterPrefixes.Add(1))
	reg := redisRegAt(t, link.Addr(), prefix)
	direct := redisReg(t, srv, prefix)
	var logs testutil.LogBuffer
	s := startServer(t, reg, logger(&logs), withLease(3*time.Second))
	first := testutil.EchoTarget(t)
	startAgent(t, []string{s.ControlAddr().String()}, []string{first}, nil)
	waitRoute(t, direct, first, "")

	link.Cut()
	// Several targets: a wait per route would add up past the handshake
	// deadline.
	var targets []string
	for range 4 {
		targets = append(targets, testutil.EchoTarget(t))
	}
	second := targets[0]
	started := time.Now()
	startAgent(t, []string{s.ControlAddr().String()}, targets, nil)
	var proxy string
	testutil.Eventually(t, 10*time.Second, "the second agent served while the registry hangs", func() bool {
		for _, a := range s.Agents() {
			for _, r := range a.Routes {
				if strings.HasPrefix(r, second+" -> ") {
					proxy = strings.TrimPrefix(r, second+" -> ")
					return true
				}
			}
		}
		return false
	})
	if d := time.Since(started); d > claimBound {
		t.Fatalf("hello answered %v after connecting while the registry hangs; want within %v", d, claimBound)
	}
	c, err := net.Dial("tcp", proxy)
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, c, "served locally")
	c.Close()
	if !logs.Contains("route registration failed; serving locally") {
		t.Fatal("no log line for the registration that timed out")
	}
	link.Restore()
	for _, tg := range append(targets, first) {
		waitRoute(t, direct, tg, "")
	}
}

// claimBound: the server's claim budget (2 s) plus the agent's connect
// and handshake on a loaded machine.
const claimBound = 5 * time.Second

func redisRegAt(t *testing.T, addr, prefix string) *registry.Redis {
	t.Helper()
	r, err := registry.NewRedis(registry.RedisOptions{Addrs: []string{addr}, Prefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// A member that dies mid-transfer must reach a SOCKS5 client as a reset,
// never as a clean end that makes a truncated reply look complete: the
// relay carries framed data, and a relay that ends without the end marker
// is an abort.
func TestMemberDeathMidTransferIsReset(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil)
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil)
	waitRoute(t, reg, echo, "")
	front := standaloneSocks(t, srv.APIAddr().String())
	c, rep := socksConnect(t, front, echo)
	if rep != 0 {
		t.Fatalf("socks reply %d", rep)
	}
	echoOnce(t, c, "before") // the path works; the next reply never comes
	srv.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := c.Read(make([]byte, 16))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("client read after the member died: %v; want a reset (ECONNRESET), not a clean end", err)
	}
}
