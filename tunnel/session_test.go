package tunnel

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// testSettings shrinks the handshake timeout so that failures are quick.
func testSettings() Settings {
	return Settings{HelloTimeout: 5 * time.Second}
}

type serverResult struct {
	sess  *Session
	hello *Hello
	err   error
}

// serveOne runs the server side of one handshake on conn: read the hello,
// negotiate, accept.
func serveOne(conn net.Conn, set Settings, routes []RouteInfo) <-chan serverResult {
	ch := make(chan serverResult, 1)
	go func() {
		h, err := ReadHello(conn, set)
		if err != nil {
			conn.Close()
			ch <- serverResult{hello: h, err: err}
			return
		}
		v, err := Negotiate(h.MinVersion, h.MaxVersion)
		if err != nil {
			Refuse(conn, &Refusal{Code: RefuseVersion, Reason: err.Error()})
			ch <- serverResult{hello: h, err: err}
			return
		}
		s, err := Accept(conn, &Welcome{Version: v, ServerID: "srv-1", Routes: routes, SpliceWindow: h.SpliceWindow}, set)
		ch <- serverResult{s, h, err}
	}()
	return ch
}

// sessionPair runs a full handshake over a loopback TCP connection and
// returns the agent's and the server's sessions, closed at the end of the
// test.
func sessionPair(t testing.TB, set Settings) (agent, server *Session) {
	t.Helper()
	a, s := tcpPair(t)
	srv := serveOne(s, set, nil)
	h := validHello()
	ag, _, err := ClientHandshake(a, &h, set)
	r := <-srv
	if err != nil || r.err != nil {
		if ag != nil {
			ag.Close()
		}
		if r.sess != nil {
			r.sess.Close()
		}
		t.Fatalf("handshake: client %v, server %v", err, r.err)
	}
	t.Cleanup(func() { ag.Close(); r.sess.Close() })
	return ag, r.sess
}

func TestHandshake(t *testing.T) {
	routes := []RouteInfo{{Target: validHello().Targets[0], Proxy: netip.MustParseAddrPort("192.0.2.1:20000")}}
	for _, tc := range []struct {
		name     string
		min, max int
		want     int
	}{
		{"both versions", 1, 2, 2},
		{"v1 only", 1, 1, 1},
		{"v2 only", 2, 2, 2},
		{"v3 only", 3, 3, 3},
		{"newer agent", 1, 5, 3},
	} {
		for _, transport := range []string{"tcp", "pipe"} {
			t.Run(tc.name+"/"+transport, func(t *testing.T) {
				var a, s net.Conn
				if transport == "tcp" {
					a, s = tcpPair(t)
				} else {
					a, s = net.Pipe()
					t.Cleanup(func() { a.Close(); s.Close() })
				}
				srv := serveOne(s, testSettings(), routes)
				h := validHello()
				h.MinVersion, h.MaxVersion = tc.min, tc.max
				ag, wel, err := ClientHandshake(a, &h, testSettings())
				r := <-srv
				if err != nil {
					t.Fatalf("client: %v", err)
				}
				defer ag.Close()
				if r.err != nil {
					t.Fatalf("server: %v", r.err)
				}
				defer r.sess.Close()
				if ag.Version != tc.want || r.sess.Version != tc.want || wel.Version != tc.want {
					t.Fatalf("versions: agent %d, server %d, welcome %d; want %d", ag.Version, r.sess.Version, wel.Version, tc.want)
				}
				if wel.ServerID != "srv-1" || len(wel.Routes) != 1 || wel.Routes[0] != routes[0] {
					t.Errorf("welcome %+v", wel)
				}
				if r.hello.AgentID != h.AgentID || r.hello.Token != h.Token || len(r.hello.Targets) != len(h.Targets) {
					t.Errorf("server got hello %+v", r.hello)
				}
				if ag.Settings != testSettings().WithDefaults() {
					t.Errorf("session settings %+v not filled with defaults", ag.Settings)
				}
				// Control messages both ways.
				if err := ag.Send(&Control{Type: MsgAdd, Targets: h.Targets[:1]}); err != nil {
					t.Fatal(err)
				}
				m, err := r.sess.Recv()
				if err != nil || m.Type != MsgAdd || len(m.Targets) != 1 || m.Targets[0] != h.Targets[0] {
					t.Fatalf("server Recv = %+v, %v", m, err)
				}
				if err := r.sess.Send(&Control{Type: MsgMove, Reason: "rebalance"}); err != nil {
					t.Fatal(err)
				}
				m, err = ag.Recv()
				if err != nil || m.Type != MsgMove || m.Reason != "rebalance" {
					t.Fatalf("agent Recv = %+v, %v", m, err)
				}
			})
		}
	}
}

func TestHandshakeNoCommonVersion(t *testing.T) {
	a, s := tcpPair(t)
	srv := serveOne(s, testSettings(), nil)
	h := validHello()
	h.MinVersion, h.MaxVersion = MaxVersion+1, MaxVersion+2
	sess, _, err := ClientHandshake(a, &h, testSettings())
	r := <-srv
	if sess != nil {
		sess.Close()
		t.Fatal("client got a session")
	}
	if !errors.Is(r.err, ErrNoVersion) {
		t.Errorf("server: %v, want ErrNoVersion", r.err)
	}
	ref, ok := IsRefusal(err)
	if !ok || ref.Code != RefuseVersion {
		t.Fatalf("client: %v, want a version refusal", err)
	}
}

func TestHandshakeRefused(t *testing.T) {
	a, s := tcpPair(t)
	srv := make(chan error, 1)
	go func() {
		h, err := ReadHello(s, testSettings())
		if err == nil && !TokenEqual(h.Token, "other") {
			Refuse(s, &Refusal{Code: RefuseAuth, Reason: "bad token"})
		}
		srv <- err
	}()
	h := validHello()
	sess, wel, err := ClientHandshake(a, &h, testSettings())
	if serr := <-srv; serr != nil {
		t.Fatalf("server: %v", serr)
	}
	if sess != nil || wel != nil {
		t.Fatal("refused client got a session")
	}
	ref, ok := IsRefusal(err)
	if !ok || ref.Code != RefuseAuth || ref.Reason != "bad token" {
		t.Fatalf("client: %v, want the auth refusal", err)
	}
	// Refuse closed the server end and ClientHandshake the client end.
	if _, err := s.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("server conn after Refuse: %v", err)
	}
	if _, err := a.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("client conn after refusal: %v", err)
	}
}

func TestReadHelloBadMagic(t *testing.T) {
	a, s := tcpPair(t)
	if _, err := a.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	_, err := ReadHello(s, testSettings())
	if !errors.Is(err, ErrBadMagic) || !errors.Is(err, ErrProtocol) {
		t.Fatalf("got %v, want ErrBadMagic", err)
	}
}

func TestReadHelloStalled(t *testing.T) {
	_, s := tcpPair(t) // the client connects and sends nothing
	set := Settings{HelloTimeout: 200 * time.Millisecond}
	start := time.Now()
	_, err := ReadHello(s, set)
	took := time.Since(start)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("got %v, want a timeout", err)
	}
	if took < 150*time.Millisecond || took > 2*time.Second {
		t.Fatalf("ReadHello returned after %v, HelloTimeout 200ms", took)
	}
}

func TestReadHelloStalledMidFrame(t *testing.T) {
	a, s := tcpPair(t)
	// Magic and a length, then silence.
	if _, err := a.Write(append(Magic[:], 0, 0, 1, 0, '{')); err != nil {
		t.Fatal(err)
	}
	set := Settings{HelloTimeout: 200 * time.Millisecond}
	start := time.Now()
	_, err := ReadHello(s, set)
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("ReadHello returned after %v", took)
	}
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("got %v, want a timeout", err)
	}
}

func TestReadHelloOversized(t *testing.T) {
	a, s := tcpPair(t)
	// Only the length is sent: the server must refuse it without waiting
	// for (or allocating) the body.
	msg := binary.BigEndian.AppendUint32(Magic[:], MaxHelloSize+1)
	if _, err := a.Write(msg); err != nil {
		t.Fatal(err)
	}
	_, err := ReadHello(s, testSettings())
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("got %v, want ErrTooLarge", err)
	}
}

func TestReadHelloInvalid(t *testing.T) {
	a, s := tcpPair(t)
	h := validHello()
	h.Generation = 0
	if _, err := a.Write(helloBytes(t, &h)); err != nil {
		t.Fatal(err)
	}
	got, err := ReadHello(s, testSettings())
	if !errors.Is(err, ErrProtocol) {
		t.Fatalf("got %v, want ErrProtocol", err)
	}
	if got == nil || got.AgentID != h.AgentID {
		t.Fatalf("the invalid hello is not returned for logging: %+v", got)
	}
}

// The client refuses a welcome for a version it did not offer.
func TestClientHandshakeBadWelcome(t *testing.T) {
	for _, ans := range []*Answer{
		{Welcome: &Welcome{Version: 2}},
		{Welcome: &Welcome{Version: 0}},
		{},
	} {
		a, s := tcpPair(t)
		go func() {
			if _, err := ReadHello(s, testSettings()); err == nil {
				_ = WriteFrame(s, ans)
			}
		}()
		h := validHello()
		h.MinVersion, h.MaxVersion = 1, 1
		sess, _, err := ClientHandshake(a, &h, testSettings())
		if sess != nil {
			sess.Close()
		}
		if !errors.Is(err, ErrProtocol) {
			t.Errorf("answer %+v: got %v, want ErrProtocol", ans, err)
		}
	}
}

// A client that is welcomed but never opens its control stream is dropped
// after HelloTimeout.
func TestAcceptNoControlStream(t *testing.T) {
	a, s := tcpPair(t)
	set := Settings{HelloTimeout: 300 * time.Millisecond}
	h := validHello()
	if _, err := a.Write(helloBytes(t, &h)); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadHello(s, set); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	sess, err := Accept(s, &Welcome{Version: 2}, set)
	if sess != nil {
		sess.Close()
	}
	if !errors.Is(err, ErrProtocol) {
		t.Fatalf("got %v, want ErrProtocol", err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Fatalf("Accept returned after %v", took)
	}
	// The server closed the connection.
	_ = a.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, a); err != nil {
		t.Fatalf("client end: %v, want EOF", err)
	}
}

func TestRecvUnexpected(t *testing.T) {
	agent, server := sessionPair(t, testSettings())
	for _, typ := range []string{MsgHello, ""} {
		if err := agent.Send(&Control{Type: typ}); err != nil {
			t.Fatal(err)
		}
		m, err := server.Recv()
		if !errors.Is(err, ErrProtocol) {
			t.Fatalf("Recv of %q: %v, want ErrProtocol", typ, err)
		}
		if m == nil || m.Type != typ {
			t.Fatalf("Recv of %q returned %+v", typ, m)
		}
	}
	// A well-formed message still goes through afterwards.
	if err := server.Send(&Control{Type: MsgWithdrawn}); err != nil {
		t.Fatal(err)
	}
	if m, err := agent.Recv(); err != nil || m.Type != MsgWithdrawn {
		t.Fatalf("Recv = %+v, %v", m, err)
	}
}

func TestRecvOversizedControl(t *testing.T) {
	agent, server := sessionPair(t, testSettings())
	big := Control{Type: MsgRefusal, Reason: string(make([]byte, MaxControlSize))}
	errc := make(chan error, 1)
	go func() { errc <- agent.Send(&big) }()
	if _, err := server.Recv(); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("got %v, want ErrTooLarge", err)
	}
	server.Close()
	<-errc // the send may or may not complete; it must return
}

// Closing one end of a session ends Recv on the other.
func TestSessionClose(t *testing.T) {
	agent, server := sessionPair(t, testSettings())
	errc := make(chan error, 1)
	go func() { _, err := agent.Recv(); errc <- err }()
	if err := server.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("Recv returned a message from a closed session")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Recv did not return after the peer closed")
	}
	select {
	case <-agent.Mux.CloseChan():
	case <-time.After(5 * time.Second):
		t.Fatal("agent session still open")
	}
	if err := agent.Send(&Control{Type: MsgWithdraw}); err == nil {
		t.Fatal("Send on a closed session succeeded")
	}
}
