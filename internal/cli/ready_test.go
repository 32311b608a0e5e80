package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/internal/testutil"
)

// fakeServer has the proxy server's lifecycle: Run starts (binds), says
// Ready, serves until ctx ends, then drains.
type fakeServer struct {
	release  chan struct{} // start-up waits for it
	startErr error
	ready    chan struct{}
	shutdown atomic.Bool
}

func newFakeServer(startErr error) *fakeServer {
	return &fakeServer{release: make(chan struct{}), startErr: startErr, ready: make(chan struct{})}
}

func (s *fakeServer) Ready() <-chan struct{} { return s.ready }

func (s *fakeServer) Run(ctx, hard context.Context) error {
	<-s.release
	if s.startErr != nil {
		return s.startErr
	}
	close(s.ready)
	<-ctx.Done()
	s.shutdown.Store(true)
	return nil
}

func (s *fakeServer) Reload() {}

type closer struct{ closed atomic.Bool }

func (c *closer) Close() error { c.closed.Store(true); return nil }

func TestReadyAfterStart(t *testing.T) {
	s := newFakeServer(nil)
	c := &closer{}
	r := run(t, WithCloser(s, c))
	// The loop runs (it fed the watchdog) while start-up has not ended:
	// not ready yet.
	r.sock.Await(t, "WATCHDOG=1", wait)
	if n := r.sock.Count("READY=1"); n != 0 {
		t.Fatal("READY=1 before the daemon said it was ready")
	}
	close(s.release)
	r.sock.Await(t, "READY=1", wait)
	r.sigs <- syscall.SIGTERM
	if err := r.result(t); err != nil {
		t.Fatal(err)
	}
	if !s.shutdown.Load() || !c.closed.Load() {
		t.Errorf("shutdown %v, closer closed %v: want true, true", s.shutdown.Load(), c.closed.Load())
	}
}

func TestReadyStartFails(t *testing.T) {
	s := newFakeServer(errors.New("control listener: address in use"))
	close(s.release)
	c := &closer{}
	r := run(t, WithCloser(s, c))
	if err := r.result(t); !errors.Is(err, s.startErr) {
		t.Fatalf("RunDaemon = %v, want %v", err, s.startErr)
	}
	r.sock.Await(t, "STATUS=failed: control listener: address in use", wait)
	if r.sock.Count("READY=1") != 0 || !c.closed.Load() {
		t.Errorf("READY=1 sent %d times (want 0), closer closed %v (want true)", r.sock.Count("READY=1"), c.closed.Load())
	}
}

// plainDaemon has no readiness of its own, like the agent.
type plainDaemon struct{ started chan struct{} }

func (d plainDaemon) Run(ctx, hard context.Context) error { close(d.started); <-ctx.Done(); return nil }
func (plainDaemon) Reload()                               {}

func TestReadyWhenRunStarts(t *testing.T) {
	d := plainDaemon{started: make(chan struct{})}
	r := run(t, d)
	r.sock.Await(t, "READY=1", wait)
	r.sigs <- syscall.SIGTERM
	if err := r.result(t); err != nil {
		t.Fatal(err)
	}
}

func TestReadySocks5dListening(t *testing.T) {
	cfg := socks.DaemonConfig{Config: socks.Config{Listen: fmt.Sprintf("127.0.0.1:%d", testutil.FreePort(t))},
		LookupAPI: "http://127.0.0.1:1"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	logs := &testutil.LogBuffer{}
	d, err := socks.NewDaemon(cfg, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatal(err)
	}
	r := run(t, d)
	r.sock.Await(t, "READY=1", wait)
	// Ready means listening: the first attempt must connect.
	c, err := net.Dial("tcp", cfg.Listen)
	if err != nil {
		t.Fatalf("READY=1 but %s does not accept: %v", cfg.Listen, err)
	}
	c.Close()
	r.sigs <- syscall.SIGTERM
	if err := r.result(t); err != nil {
		t.Fatal(err)
	}
}
