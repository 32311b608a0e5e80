package tunnel

import (
	"bytes"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// Session is an established tunnel: the yamux session and its control
// stream. The agent is the yamux client, the server the yamux server; the
// server opens data streams, the agent opens only the control stream.
type Session struct {
	Mux      *yamux.Session
	Version  int
	Settings Settings

	ctl    net.Conn
	sendMu sync.Mutex
	comb   *combiner
}

// Spliced reports whether the session carries bulk transfers as spliced
// frames (spliced.go).
func (s *Session) Spliced() bool { return s.comb != nil && s.comb.splices != nil }

// Send writes one control message. It is safe for concurrent use.
func (s *Session) Send(m *Control) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	_ = s.ctl.SetWriteDeadline(time.Now().Add(s.Settings.WriteTimeout))
	err := WriteFrame(s.ctl, m)
	if err != nil {
		_ = s.Mux.Close() // a control stream that cannot be written is a dead session
	}
	return err
}

// Recv reads the next control message. Only one goroutine may call it.
// A hello after the handshake is a protocol error.
func (s *Session) Recv() (*Control, error) {
	var m Control
	if err := ReadFrame(s.ctl, MaxControlSize, &m); err != nil {
		return nil, err
	}
	if m.Type == MsgHello || m.Type == "" {
		return &m, fmt.Errorf("%w: unexpected %q message after the handshake", ErrProtocol, m.Type)
	}
	return &m, nil
}

// Close closes the session and its connection.
func (s *Session) Close() error { return s.Mux.Close() }

// ClientHandshake runs the agent side of the handshake on a fresh
// connection: magic and hello out, the answer in, then yamux and the
// control stream. On a refusal it returns a *Refusal and closes conn.
func ClientHandshake(conn net.Conn, h *Hello, set Settings) (*Session, *Welcome, error) {
	set = set.WithDefaults()
	set.prepareSocket(conn)
	h.SpliceWindow = 0
	if set.canSplice(conn) {
		h.SpliceWindow = set.streamWindow()
	}
	_ = conn.SetDeadline(time.Now().Add(set.HelloTimeout))
	var buf bytes.Buffer
	buf.Write(Magic[:])
	if err := WriteFrame(&buf, h); err != nil {
		conn.Close()
		return nil, nil, err
	}
	if _, err := conn.Write(buf.Bytes()); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("send hello: %w", err)
	}
	var ans Answer
	if err := ReadFrame(conn, MaxHelloSize, &ans); err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("read answer: %w", err)
	}
	if ans.Challenge != nil { // version 3: prove the token, then the answer
		if err := answerChallenge(conn, h, ans.Challenge, set.HelloTimeout); err != nil {
			conn.Close()
			return nil, nil, err
		}
		ans = Answer{}
		if err := ReadFrame(conn, MaxHelloSize, &ans); err != nil {
			conn.Close()
			return nil, nil, fmt.Errorf("read answer: %w", err)
		}
		if ans.Challenge != nil {
			conn.Close()
			return nil, nil, fmt.Errorf("%w: a second challenge", ErrProtocol)
		}
	}
	if ans.Refusal != nil {
		conn.Close()
		return nil, nil, ans.Refusal
	}
	if ans.Welcome == nil || ans.Welcome.Version < h.MinVersion || ans.Welcome.Version > h.MaxVersion {
		conn.Close()
		return nil, nil, fmt.Errorf("%w: bad answer to hello", ErrProtocol)
	}
	_ = conn.SetDeadline(time.Time{})
	comb := set.newCombiner(conn, h.SpliceWindow, ans.Welcome.SpliceWindow)
	mux, err := yamux.Client(comb, set.yamux())
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	ctl, err := mux.OpenStream()
	if err != nil {
		mux.Close()
		return nil, nil, err
	}
	return &Session{Mux: mux, Version: ans.Welcome.Version, Settings: set, ctl: ctl, comb: comb}, ans.Welcome, nil
}

// ErrNoHello is ReadHello's error for a connection closed before its
// first byte: a balancer's TCP health check or a port scan, not an agent.
var ErrNoHello = fmt.Errorf("tunnel: connection closed before the hello: %w", io.EOF)

// ReadHello runs the first half of the server side of the handshake: it
// reads the magic and the hello within the hello deadline and size limit.
// The caller authenticates and answers with Refuse or Accept.
func ReadHello(conn net.Conn, set Settings) (*Hello, error) {
	set = set.WithDefaults()
	set.prepareSocket(conn)
	_ = conn.SetDeadline(time.Now().Add(set.HelloTimeout))
	var magic [len(Magic)]byte
	if _, err := io.ReadFull(conn, magic[:]); err != nil {
		if err == io.EOF {
			return nil, ErrNoHello
		}
		return nil, fmt.Errorf("read magic: %w", err)
	}
	if magic != Magic {
		return nil, ErrBadMagic
	}
	var h Hello
	if err := ReadFrame(conn, MaxHelloSize, &h); err != nil {
		return nil, fmt.Errorf("read hello: %w", err)
	}
	if err := h.Validate(); err != nil {
		return &h, err
	}
	return &h, nil
}

// Refuse answers a hello with a refusal and closes conn.
func Refuse(conn net.Conn, r *Refusal) {
	_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
	_ = WriteFrame(conn, &Answer{Refusal: r})
	_ = conn.Close()
}

// Accept answers a hello with w and starts the yamux server session; it
// waits, within the hello deadline, for the agent's control stream.
// w.SpliceWindow, set from the hello's (the agent's window), is replaced
// by this side's window if it splices too, else 0.
func Accept(conn net.Conn, w *Welcome, set Settings) (*Session, error) {
	set = set.WithDefaults()
	peer := w.SpliceWindow
	w.SpliceWindow = 0
	if peer != 0 && set.canSplice(conn) {
		w.SpliceWindow = set.streamWindow()
	}
	if err := WriteFrame(conn, &Answer{Welcome: w}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send welcome: %w", err)
	}
	_ = conn.SetDeadline(time.Time{})
	comb := set.newCombiner(conn, w.SpliceWindow, peer)
	mux, err := yamux.Server(comb, set.yamux())
	if err != nil {
		conn.Close()
		return nil, err
	}
	type result struct {
		s   *yamux.Stream
		err error
	}
	ch := make(chan result, 1)
	go func() { s, err := mux.AcceptStream(); ch <- result{s, err} }()
	t := time.NewTimer(set.HelloTimeout)
	defer t.Stop()
	select {
	case r := <-ch:
		if r.err != nil {
			mux.Close()
			return nil, fmt.Errorf("accept control stream: %w", r.err)
		}
		return &Session{Mux: mux, Version: w.Version, Settings: set, ctl: r.s, comb: comb}, nil
	case <-t.C:
		mux.Close() // unblocks the goroutine above
		<-ch
		return nil, fmt.Errorf("%w: no control stream within %v", ErrProtocol, set.HelloTimeout)
	}
}

// TokenEqual compares two tokens in constant time.
func TokenEqual(got, want string) bool {
	return subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}

// IsRefusal reports whether err is a server's refusal, and returns it.
func IsRefusal(err error) (*Refusal, bool) {
	var r *Refusal
	ok := errors.As(err, &r)
	return r, ok
}
