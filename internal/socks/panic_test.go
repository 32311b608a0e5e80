package socks_test

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
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/agent"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// A panic while serving one connection ends that connection, with a log
// line, and nothing else: a connection carrying data goes on, and new
// ones are served. The data path is real: proxy server, agent, echo.
func TestPanicEndsOneConnectionOnly(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	startTunnel(t, reg, echo)

	var logs testutil.LogBuffer
	cfg := socks.Config{Listen: "127.0.0.1:0"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	s := socks.New(cfg, reg, slog.New(slog.NewTextHandler(&logs, nil)))
	poison := net.IPv4(127, 0, 0, 3)
	socks.SetTestHook(s, func(c net.Conn) {
		if c.RemoteAddr().(*net.TCPAddr).IP.Equal(poison) {
			panic("test: poisoned connection")
		}
	})
	ln := testutil.Listen(t)
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ln) }()
	defer func() { s.Close(); <-done }()
	addr := ln.Addr().String()

	live := connect(t, addr, nil, echo)
	roundTrip(t, live, "before")

	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: poison}}
	bad, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	_ = bad.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := bad.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("poisoned connection: read %d, %v; want it closed", n, err)
	}
	testutil.Eventually(t, 2*time.Second, "panic log line", func() bool {
		return logs.Contains(`msg="panic serving connection"`) && logs.Contains("test: poisoned connection")
	})

	roundTrip(t, live, "after the panic")
	next := connect(t, addr, nil, echo)
	roundTrip(t, next, "a new connection")
	live.Close()
	next.Close()
	testutil.Eventually(t, 5*time.Second, "connections back to zero", func() bool { return socks.OpenConns(s) == 0 })
}

// startTunnel runs a proxy server over reg and an agent exposing target,
// and waits for the route.
func startTunnel(t *testing.T, reg registry.Registry, target string) {
	t.Helper()
	tok := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tok, []byte("socks-test-token-0123456789\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	lo := 20000 + rand.IntN(60)*200 + 100 // below the ephemeral range
	scfg := server.Config{ServerID: "s1", Control: "127.0.0.1:0", Advertise: "127.0.0.1", API: "127.0.0.1:0",
		Ports: fmt.Sprintf("%d-%d", lo, lo+199), Token: config.Secret{File: tok}, DrainGrace: time.Second}
	if err := scfg.Validate(); err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(scfg, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	acfg := agent.Config{AgentID: "a1", Servers: []string{srv.ControlAddr().String()}, Token: config.Secret{File: tok},
		Targets: []agent.TargetConfig{{Addr: target}}, DrainGrace: time.Second, BackoffMax: 500 * time.Millisecond}
	if err := acfg.Validate(); err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(acfg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	hard, stopHard := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = a.Run(ctx, hard) }()
	t.Cleanup(func() { stopHard(); stop(); <-done })
	k, err := registry.ParseKey(target)
	if err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 10*time.Second, "route for "+target, func() bool {
		_, err := reg.Lookup(context.Background(), k)
		return err == nil
	})
}

// connect opens a no-auth SOCKS5 CONNECT to target from local (nil: any).
func connect(t *testing.T, addr string, local net.Addr, target string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: local}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	ap := netip.MustParseAddrPort(target)
	a4 := ap.Addr().As4()
	req := append([]byte{5, 1, 0, 5, 1, 0, 1}, a4[:]...)
	req = binary.BigEndian.AppendUint16(req, ap.Port())
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	rep := make([]byte, 2+10)
	if _, err := io.ReadFull(c, rep); err != nil || rep[1] != 0 || rep[3] != 0 {
		t.Fatalf("socks5 CONNECT %s: %v %v", target, rep, err)
	}
	_ = c.SetDeadline(time.Time{})
	return c
}

func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, len(msg))
	if _, err := io.ReadFull(c, b); err != nil || string(b) != msg {
		t.Fatalf("echo %q: %q, %v", msg, b, err)
	}
	_ = c.SetDeadline(time.Time{})
}
