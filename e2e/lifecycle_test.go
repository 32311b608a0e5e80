package e2e

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/agent"
	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// echoOnce writes msg on c and expects it back.
func echoOnce(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo: got %q, %v", buf, err)
	}
	_ = c.SetDeadline(time.Time{})
}

// standaloneSocks runs a socks5d reading routes from a lookup API.
func standaloneSocks(t *testing.T, api string) string {
	cfg := socks.Config{Listen: "127.0.0.1:0", ConnectTimeout: 2 * time.Second}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	s := socks.New(cfg, registry.NewAPIClient("http://"+api, nil), testutil.Logger(t))
	ln := testutil.Listen(t)
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ln) }()
	t.Cleanup(func() { s.Close(); <-done })
	return ln.Addr().String()
}

func TestServerRestart(t *testing.T) {
	echo := testutil.EchoTarget(t)
	control := "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))
	api := "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))
	fixed := func(c *server.Config) { c.Control, c.API = control, api }
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil, fixed)
	startAgent(t, []string{control}, []string{echo}, nil)
	waitRoute(t, reg, echo, "")
	socksAddr := standaloneSocks(t, api)
	c, rep := socksConnect(t, socksAddr, echo)
	if rep != repSuccess {
		t.Fatalf("reply %d", rep)
	}
	echoOnce(t, c, "before")

	srv.Close()
	start := time.Now()
	if _, rep := socksConnect(t, socksAddr, echo); rep != repHostUnreachable {
		t.Fatalf("while the server is down: reply %d, want host unreachable", rep)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("while the server is down, the answer took %v; want <= 1 s", d)
	}

	reg2 := registry.NewMemory(nil) // a restarted single server starts empty
	startServer(t, reg2, nil, fixed)
	waitRoute(t, reg2, echo, "")
	c, rep = socksConnect(t, socksAddr, echo)
	if rep != repSuccess {
		t.Fatalf("after restart: reply %d", rep)
	}
	echoOnce(t, c, "after")
}

// An agent one protocol version behind (2: token in the hello) works with
// this server; two versions behind is refused with a reason by the
// default min_agent_version.
func TestOldProtocolVersionAgent(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil, withSocks())
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil,
		func(_ *agent.Config, a *agent.Agent) {
			if a != nil {
				a.MaxVersion = tunnel.Version2
			}
		})
	waitRoute(t, reg, echo, "")
	testutil.Eventually(t, 5*time.Second, "session listed", func() bool { return len(srv.Agents()) == 1 })
	if ag := srv.Agents(); len(ag) != 1 || ag[0].Version != tunnel.Version2 {
		t.Fatalf("agents %+v: want one session on protocol version 2", ag)
	}
	c, rep := socksConnect(t, srv.SocksAddr().String(), echo)
	if rep != repSuccess {
		t.Fatalf("reply %d", rep)
	}
	echoOnce(t, c, "old agent")

	conn := dialTCP(t, srv.ControlAddr().String())
	h := hello(testToken, echo)
	h.MinVersion, h.MaxVersion = tunnel.Version1, tunnel.Version1
	_, _, err := tunnel.ClientHandshake(conn, h, tunnel.Settings{})
	if ref, ok := tunnel.IsRefusal(err); !ok || ref.Code != tunnel.RefuseVersion || !strings.Contains(ref.Reason, "minimum") {
		t.Fatalf("a version 1 agent: %v; want a version refusal naming the minimum", err)
	}
}

func TestStreamsReturnToBaseline(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil, withSocks())
	a := startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil)
	route := waitRoute(t, reg, echo, "")
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", route.Proxy.String())
			if err != nil {
				t.Error(err)
				return
			}
			echoOnce(t, c, "x")
			if i%2 == 0 {
				c.(*net.TCPConn).SetLinger(0) // half of them reset
			}
			c.Close()
		}()
	}
	wg.Wait()
	testutil.Eventually(t, 10*time.Second, "streams back to the control stream only", func() bool {
		ag := srv.Agents()
		return len(ag) == 1 && ag[0].Yamux == 1 && ag[0].Streams == 0 && a.YamuxStreams() == 1 &&
			srv.Stats.StreamsOpen.Load() == 0 && a.Stats.StreamsOpen.Load() == 0
	})
}

func TestStreamCap(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	logs := &testutil.LogBuffer{}
	srv := startServer(t, reg, logger(logs), func(c *server.Config) { c.Tunnel.MaxStreams = 2 })
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil)
	route := waitRoute(t, reg, echo, "")
	for range 2 {
		c, err := net.Dial("tcp", route.Proxy.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		echoOnce(t, c, "held")
	}
	// The refusal is a reset; it may come so fast that the dial itself
	// reports it.
	c, err := net.Dial("tcp", route.Proxy.String())
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatal(err)
	}
	if err == nil {
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, _ = c.Write([]byte("third"))
		if _, err := c.Read(make([]byte, 8)); err == nil {
			t.Fatal("third connection got data; want it refused at the stream cap")
		}
	}
	testutil.Eventually(t, 5*time.Second, "streams_at_cap = 1", func() bool { return srv.Stats.StreamsAtCap.Load() == 1 })
	if !logs.Contains("stream limit reached") {
		t.Fatal("no log line for the stream cap")
	}
}

func TestAgentDrain(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil)
	a := startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil)
	route := waitRoute(t, reg, echo, "")
	c, err := net.Dial("tcp", route.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoOnce(t, c, "before drain")
	stopped := make(chan error, 1)
	go func() { stopped <- a.Stop() }()
	testutil.Eventually(t, 5*time.Second, "route withdrawn", func() bool {
		_, err := reg.Lookup(context.Background(), route.Key)
		return errors.Is(err, registry.ErrNotFound)
	})
	echoOnce(t, c, "during drain") // the open connection keeps working
	select {
	case err := <-stopped:
		t.Fatalf("agent stopped (%v) while a connection was open", err)
	default:
	}
	c.Close()
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("agent did not stop after its last connection closed")
	}
}

func TestMoveMakeBeforeBreak(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil) // shared by both members: an in-process cluster
	s1 := startServer(t, reg, nil, withSocks())
	s2 := startServer(t, reg, nil, withSocks())
	a := startAgent(t, []string{s1.ControlAddr().String(), s2.ControlAddr().String()}, []string{echo}, nil)
	r1 := waitRoute(t, reg, echo, "")
	// The route names the member holding the tunnel (its session may not
	// be listed yet: routes are written during the handshake).
	first, second := s1, s2
	if r1.Relay.String() != s1.RelayAddr().String() {
		first, second = s2, s1
	}
	c, err := net.Dial("tcp", r1.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoOnce(t, c, "before move")
	var drained atomic.Bool
	go func() { first.Shutdown(context.Background()); drained.Store(true) }()
	testutil.Eventually(t, 5*time.Second, "route moved to the other member", func() bool {
		r, err := reg.Lookup(context.Background(), r1.Key)
		return err == nil && r.Proxy != r1.Proxy
	})
	echoOnce(t, c, "after move") // the old session still carries the open connection
	c2, rep := socksConnect(t, second.SocksAddr().String(), echo)
	if rep != repSuccess {
		t.Fatalf("reply %d through the new member", rep)
	}
	echoOnce(t, c2, "new member")
	c.Close()
	testutil.Eventually(t, 10*time.Second, "old member drained", drained.Load)
	testutil.Eventually(t, 5*time.Second, "agent holds one session", func() bool { return a.Stats.Sessions.Load() == 1 })
}

// A second signal ends the agent at once, even while a session it moved
// away from still carries a connection and its grace period runs.
func TestAgentHardStopDuringMove(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	s1 := startServer(t, reg, nil)
	s2 := startServer(t, reg, nil)
	longGrace := func(c *agent.Config, _ *agent.Agent) {
		if c != nil {
			c.DrainGrace = time.Minute
		}
	}
	a := startAgent(t, []string{s1.ControlAddr().String(), s2.ControlAddr().String()}, []string{echo}, nil, longGrace)
	r1 := waitRoute(t, reg, echo, "")
	first := s1
	if r1.Relay.String() != s1.RelayAddr().String() {
		first = s2
	}
	c, err := net.Dial("tcp", r1.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoOnce(t, c, "before move")
	go first.Shutdown(context.Background())
	testutil.Eventually(t, 5*time.Second, "route moved to the other member", func() bool {
		r, err := reg.Lookup(context.Background(), r1.Key)
		return err == nil && r.Proxy != r1.Proxy
	})
	echoOnce(t, c, "after move") // the retired session still carries it
	a.stop()
	a.hard()
	select {
	case <-a.done:
	case <-time.After(3 * time.Second):
		t.Fatal("agent still running 3 s after the second signal: the retired session waits out its grace period")
	}
}
