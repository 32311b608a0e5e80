package e2e

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/vpcreach/vpcreach/internal/agent"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const testToken = "e2e-test-token-0123456789"

// tokenFile writes tok to a file and returns its Secret.
func tokenFile(t *testing.T, tok string) config.Secret {
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(tok+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return config.Secret{File: p}
}

// portRange returns a random 200-port range for proxy ports.
func portRange() string {
	lo := 20000 + rand.IntN(60)*200 // below the ephemeral range
	return fmt.Sprintf("%d-%d", lo, lo+199)
}

type serverOpt func(*server.Config)

func withSocks() serverOpt {
	// Every test client comes from 127.0.0.1: room for the concurrency
	// tests above the per-source cap's default.
	return func(c *server.Config) { c.Socks5 = &socks.Config{Listen: "127.0.0.1:0", MaxConnsPerSource: 2048} }
}

// startServer starts a proxy server on loopback over reg, closed at cleanup.
func startServer(t *testing.T, reg registry.Registry, log *slog.Logger, opts ...serverOpt) *server.Server {
	t.Helper()
	cfg := server.Config{ServerID: "s-" + strconv.Itoa(rand.IntN(1e6)), Control: "127.0.0.1:0",
		Advertise: "127.0.0.1", API: "127.0.0.1:0", Ports: portRange(), Token: tokenFile(t, testToken),
		DrainGrace: 5 * time.Second}
	for _, o := range opts {
		o(&cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if log == nil {
		log = testutil.Logger(t)
	}
	s, err := server.New(cfg, reg, log)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// runningAgent is an agent running in a goroutine.
type runningAgent struct {
	*agent.Agent
	stop context.CancelFunc // first signal: drain
	hard context.CancelFunc // second signal
	done chan struct{}      // closed when Run returned
	err  error
}

// Stop drains the agent and waits for Run to return.
func (r *runningAgent) Stop() error {
	r.stop()
	<-r.done
	return r.err
}

type agentOpt func(*agent.Config, *agent.Agent)

// startAgent runs an agent exposing targets against servers.
func startAgent(t *testing.T, servers []string, targets []string, log *slog.Logger, opts ...agentOpt) *runningAgent {
	t.Helper()
	cfg := agent.Config{AgentID: "agent-" + strconv.Itoa(rand.IntN(1e6)), Servers: servers,
		Token: tokenFile(t, testToken), DrainGrace: 5 * time.Second, BackoffMax: 500 * time.Millisecond}
	for _, tg := range targets {
		cfg.Targets = append(cfg.Targets, agent.TargetConfig{Addr: tg})
	}
	for _, o := range opts {
		o(&cfg, nil)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if log == nil {
		log = testutil.Logger(t)
	}
	a, err := agent.New(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range opts {
		o(nil, a)
	}
	ctx, stop := context.WithCancel(context.Background())
	hard, stopHard := context.WithCancel(context.Background())
	r := &runningAgent{Agent: a, stop: stop, hard: stopHard, done: make(chan struct{})}
	go func() { r.err = a.Run(ctx, hard); close(r.done) }()
	t.Cleanup(func() {
		stopHard()
		stop()
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			t.Error("agent did not stop within 10 s")
		}
	})
	return r
}

// waitRoute polls reg until target has a route (served by server if
// given), and returns it.
func waitRoute(t *testing.T, reg registry.Reader, target string, server string) registry.Route {
	t.Helper()
	k, err := registry.ParseKey(target)
	if err != nil {
		t.Fatal(err)
	}
	var r registry.Route
	testutil.Eventually(t, 10*time.Second, "route for "+target, func() bool {
		r, err = reg.Lookup(context.Background(), k)
		return err == nil && (server == "" || r.Server == server)
	})
	return r
}

// socksConnect performs a SOCKS5 no-auth CONNECT to target through the
// SOCKS5 server at addr and returns the connection and the reply code.
func socksConnect(t *testing.T, addr, target string) (net.Conn, byte) {
	t.Helper()
	ap := netip.MustParseAddrPort(target)
	req := []byte{5, 1, 0, 1}
	a4 := ap.Addr().As4()
	req = append(req, a4[:]...)
	req = binary.BigEndian.AppendUint16(req, ap.Port())
	return socksRaw(t, addr, req)
}

// socksRaw sends a no-auth greeting, then req, and reads the reply.
func socksRaw(t *testing.T, addr string, req []byte) (net.Conn, byte) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := c.Write([]byte{5, 1, 0}); err != nil {
		t.Fatal(err)
	}
	var m [2]byte
	if _, err := io.ReadFull(c, m[:]); err != nil || m != [2]byte{5, 0} {
		t.Fatalf("socks greeting: %v %v", m, err)
	}
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	var rep [4]byte
	if _, err := io.ReadFull(c, rep[:]); err != nil {
		t.Fatalf("socks reply: %v", err)
	}
	skip := 0
	switch rep[3] {
	case 1:
		skip = 4 + 2
	case 4:
		skip = 16 + 2
	case 3:
		var l [1]byte
		_, _ = io.ReadFull(c, l[:])
		skip = int(l[0]) + 2
	}
	if _, err := io.ReadFull(c, make([]byte, skip)); err != nil {
		t.Fatalf("socks reply address: %v", err)
	}
	_ = c.SetDeadline(time.Time{})
	if rep[1] != 0 {
		c.Close()
		return nil, rep[1]
	}
	t.Cleanup(func() { c.Close() })
	return c, rep[1]
}

// logger returns a logger writing to buf (info level).
func logger(buf io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}
