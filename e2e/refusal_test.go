package e2e

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// hello is a version-2 hello, which carries its token (raw tests play an
// agent by hand; version 3's challenge is in TestHelloV3Challenge).
func hello(token string, targets ...string) *tunnel.Hello {
	h := &tunnel.Hello{MinVersion: tunnel.Version2, MaxVersion: tunnel.Version2, AgentID: "raw-agent",
		Token: token, SessionID: "raw-session", Generation: uint64(time.Now().UnixNano())}
	for _, tg := range targets {
		h.Targets = append(h.Targets, tunnel.Target{Addr: netip.MustParseAddrPort(tg)})
	}
	return h
}

func TestWrongTokenRefused(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	logs := &testutil.LogBuffer{}
	srv := startServer(t, reg, logger(logs))
	conn := dialTCP(t, srv.ControlAddr().String())
	_, _, err := tunnel.ClientHandshake(conn, hello("wrong-token-wrong-token", echo), tunnel.Settings{})
	r, ok := tunnel.IsRefusal(err)
	if !ok || r.Code != tunnel.RefuseAuth {
		t.Fatalf("handshake: %v; want a refusal with code %q", err, tunnel.RefuseAuth)
	}
	if rs, _ := reg.List(context.Background()); len(rs) != 0 {
		t.Fatalf("routes %v after a refused hello; want none", rs)
	}
	testutil.Eventually(t, 2*time.Second, "refusal logged", func() bool {
		return logs.Contains("tunnel refused") && logs.Contains("code=auth")
	})
	if logs.Contains("wrong-token") {
		t.Fatal("the token appears in the log")
	}

	// The server closes the connection after the refusal.
	raw := dialTCP(t, srv.ControlAddr().String())
	_, _ = raw.Write(tunnel.Magic[:])
	_ = tunnel.WriteFrame(raw, hello("wrong-token-wrong-token", echo))
	_ = raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ans tunnel.Answer
	if err := tunnel.ReadFrame(raw, tunnel.MaxHelloSize, &ans); err != nil || ans.Refusal == nil {
		t.Fatalf("answer %+v, %v; want a refusal", ans, err)
	}
	if n, err := raw.Read(make([]byte, 1)); n != 0 || err != io.EOF {
		t.Fatalf("after the refusal: read %d, %v; want EOF", n, err)
	}
}

func TestSecondHelloIsProtocolError(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	logs := &testutil.LogBuffer{}
	srv := startServer(t, reg, logger(logs))
	conn := dialTCP(t, srv.ControlAddr().String())
	sess, w, err := tunnel.ClientHandshake(conn, hello(testToken, echo), tunnel.Settings{})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	if len(w.Routes) != 1 {
		t.Fatalf("welcome %+v", w)
	}
	// The server may answer and close before yamux reports the write done:
	// Send then says "session shutdown", and the refusal is lost with the
	// session. The log line and the closed session are what must hold.
	if err := sess.Send(&tunnel.Control{Type: tunnel.MsgHello}); err == nil {
		m, err := sess.Recv()
		if err == nil && (m.Type != tunnel.MsgRefusal || m.Code != tunnel.RefuseProtocol) {
			t.Fatalf("got %+v; want a protocol refusal", m)
		}
	}
	select {
	case <-sess.Mux.CloseChan():
	case <-time.After(5 * time.Second):
		t.Fatal("session still open after a second hello")
	}
	testutil.Eventually(t, 2*time.Second, "protocol error logged", func() bool { return logs.Contains("protocol error") })
	testutil.Eventually(t, 2*time.Second, "routes removed", func() bool {
		rs, _ := reg.List(context.Background())
		return len(rs) == 0
	})
}

func TestAgentRefusesUnexposedTarget(t *testing.T) {
	// A fake server asks a real agent for a target it does not expose.
	echo := testutil.EchoTarget(t)
	ln := testutil.Listen(t)
	logs := &testutil.LogBuffer{}
	startAgent(t, []string{ln.Addr().String()}, []string{echo}, logger(logs))
	conn, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	h, err := tunnel.ReadHello(conn, tunnel.Settings{})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := tunnel.Accept(conn, &tunnel.Welcome{Version: tunnel.MaxVersion, ServerID: "fake"}, tunnel.Settings{})
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close()
	ask := func(target string, gen uint64) tunnel.Status {
		st, err := sess.Mux.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		defer st.Close()
		hdr := tunnel.StreamHeader{Generation: gen, Target: tunnel.Target{Addr: netip.MustParseAddrPort(target)}}
		if _, err := st.Write(hdr.Append(nil, sess.Version)); err != nil {
			t.Fatal(err)
		}
		_ = st.SetReadDeadline(time.Now().Add(5 * time.Second))
		s, err := tunnel.ReadStatus(st)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	if st := ask("10.9.9.9:22", h.Generation); st != tunnel.StatusNotExposed {
		t.Fatalf("status %v, want %v", st, tunnel.StatusNotExposed)
	}
	if st := ask(echo, h.Generation+1); st != tunnel.StatusStale {
		t.Fatalf("wrong generation: status %v, want %v", st, tunnel.StatusStale)
	}
	if st := ask(echo, h.Generation); st != tunnel.StatusOK {
		t.Fatalf("exposed target: status %v, want ok", st)
	}
	if !logs.Contains("does not expose") {
		t.Fatal("no log line for the refused target")
	}
}

func TestRelayRefusesStaleGeneration(t *testing.T) {
	var accepted atomic.Int64
	ln := testutil.Listen(t)
	testutil.Serve(t, ln, func(c net.Conn) {
		accepted.Add(1)
		_, _ = io.Copy(io.Discard, c)
		c.Close()
	})
	target := ln.Addr().String()
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil)
	startAgent(t, []string{srv.ControlAddr().String()}, []string{target}, nil)
	route := waitRoute(t, reg, target, "")
	c, err := net.Dial("tcp", route.Relay.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p := tunnel.Preamble{Generation: route.Generation - 1, Target: tunnel.Target{Addr: route.Addr}}
	if _, err := c.Write(append(p.Append(nil), "payload that must not arrive"...)); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	st, err := tunnel.ReadStatus(c)
	if err != nil || st != tunnel.StatusStale {
		t.Fatalf("status %v, %v; want %v", st, err, tunnel.StatusStale)
	}
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("relay connection still open after a stale preamble")
	}
	if accepted.Load() != 0 {
		t.Fatalf("the target saw %d connections; want 0", accepted.Load())
	}
	// The right generation goes through.
	_, st, err = dialRelay(route)
	if err != nil || st != tunnel.StatusOK {
		t.Fatalf("current generation: %v, %v", st, err)
	}
	testutil.Eventually(t, 2*time.Second, "target reached", func() bool { return accepted.Load() == 1 })
}

func dialRelay(route registry.Route) (net.Conn, tunnel.Status, error) {
	c, err := net.Dial("tcp", route.Relay.String())
	if err != nil {
		return nil, 0, err
	}
	p := tunnel.Preamble{Generation: route.Generation, Target: tunnel.Target{Addr: route.Addr}}
	if _, err := c.Write(p.Append(nil)); err != nil {
		c.Close()
		return nil, 0, err
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	st, err := tunnel.ReadStatus(c)
	c.Close()
	return c, st, errors.Join(err)
}

// dialTCP connects to addr (a control listener, a proxy port); closed at cleanup.
func dialTCP(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
