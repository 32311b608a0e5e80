package netx

import (
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

// fakeListener plays a scripted sequence of Accept results, then reports
// net.ErrClosed for ever.
type fakeListener struct {
	mu     sync.Mutex
	script []acceptResult
	extra  int // Accept calls after the script ran out
}

type acceptResult struct {
	c   net.Conn
	err error
}

func (l *fakeListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.script) == 0 {
		l.extra++
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: net.ErrClosed}
	}
	r := l.script[0]
	l.script = l.script[1:]
	return r.c, r.err
}

func (l *fakeListener) Close() error { return nil }

func (l *fakeListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9} }

func TestAcceptLoopSurvivesTemporaryErrors(t *testing.T) {
	emfile := &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	ln := &fakeListener{script: []acceptResult{{err: emfile}, {err: emfile}, {err: emfile}, {c: c1}}}
	var logs testutil.LogBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	var handled []net.Conn
	err := AcceptLoop(ln, log, func(c net.Conn) { handled = append(handled, c) })
	if err != nil {
		t.Fatalf("AcceptLoop returned %v on ErrClosed; want nil", err)
	}
	if len(handled) != 1 || handled[0] != c1 {
		t.Fatalf("handle got %v; want the one accepted conn", handled)
	}
	if ln.extra != 1 {
		t.Fatalf("Accept called %d times after ErrClosed; want 1", ln.extra)
	}
	out := logs.String()
	if n := strings.Count(out, `msg="accept failed; retrying"`); n != 3 {
		t.Fatalf("%d accept failure lines logged; want 3:\n%s", n, out)
	}
	for _, want := range []string{"level=WARN", "listener=127.0.0.1:9", "too many open files", "retry_in="} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}

func TestAcceptLoopRealListener(t *testing.T) {
	ln := testutil.Listen(t)
	got := make(chan net.Conn, 1)
	done := make(chan error, 1)
	go func() {
		done <- AcceptLoop(ln, testutil.Logger(t), func(c net.Conn) { got <- c })
	}()
	d, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	select {
	case c := <-got:
		if c.RemoteAddr().String() != d.LocalAddr().String() {
			t.Errorf("handled conn from %v; dialled from %v", c.RemoteAddr(), d.LocalAddr())
		}
		c.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("handle not called")
	}
	ln.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("AcceptLoop after Close: %v; want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("AcceptLoop did not return after the listener closed")
	}
}
