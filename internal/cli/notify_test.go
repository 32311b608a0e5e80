package cli

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/cli/notifytest"
	"github.com/vpcreach/vpcreach/internal/testutil"
)

// wait bounds every wait for an event; the watchdog interval in these
// tests is 50 ms (WATCHDOG_USEC=100000).
const wait = 5 * time.Second

// fakeDaemon is a Daemon whose readiness, Reload and liveness the test
// controls.
type fakeDaemon struct {
	ready    chan struct{} // Readier: the test closes it
	started  chan struct{} // closed when Run starts
	drained  chan struct{} // closed when ctx ends
	hardStop chan struct{} // closed when hard ends
	block    bool          // Run waits for hard after ctx
	runErr   error         // Run returns this after ctx ends
	failNow  error         // Run returns this at once
	reloads  atomic.Int32
	reload   chan struct{} // if set, Reload waits for it
	entered  chan struct{} // Reload signals here when it starts
}

func newFake() *fakeDaemon {
	return &fakeDaemon{ready: make(chan struct{}), started: make(chan struct{}),
		drained: make(chan struct{}), hardStop: make(chan struct{}), entered: make(chan struct{}, 8)}
}

func (d *fakeDaemon) Ready() <-chan struct{} { return d.ready }

func (d *fakeDaemon) Run(ctx, hard context.Context) error {
	close(d.started)
	if d.failNow != nil {
		return d.failNow
	}
	<-ctx.Done()
	close(d.drained)
	if d.block {
		<-hard.Done()
		close(d.hardStop)
	}
	return d.runErr
}

func (d *fakeDaemon) Reload() {
	d.entered <- struct{}{}
	if d.reload != nil {
		<-d.reload
	}
	d.reloads.Add(1)
}

// liveDaemon adds a Liveness check that fails while failing holds an error.
type liveDaemon struct {
	*fakeDaemon
	failing atomic.Pointer[error]
}

func (d *liveDaemon) Alive(context.Context) error {
	if e := d.failing.Load(); e != nil {
		return *e
	}
	return nil
}

// runner is runDaemon running on a fake daemon.
type runner struct {
	sock *notifytest.Socket
	sigs chan os.Signal
	logs *testutil.LogBuffer
	done chan struct{} // closed when runDaemon returned err
	err  error
}

// run starts runDaemon on d with a fake notify socket and, unless the
// test set WATCHDOG_USEC itself, a watchdog of 100 ms (a ping every 50 ms).
// If the test does not stop it, cleanup does, with two SIGTERMs.
func run(t *testing.T, d Daemon) *runner {
	t.Helper()
	r := &runner{sock: notifytest.Listen(t), sigs: make(chan os.Signal, 4), logs: &testutil.LogBuffer{},
		done: make(chan struct{})}
	if _, set := os.LookupEnv("WATCHDOG_USEC"); !set {
		t.Setenv("WATCHDOG_USEC", "100000")
		t.Setenv("WATCHDOG_PID", "")
	}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(r.logs, tlog{t}), &slog.HandlerOptions{Level: slog.LevelDebug}))
	go func() { defer close(r.done); r.err = runDaemon(d, log, r.sigs) }()
	t.Cleanup(func() {
		for range 2 {
			select {
			case r.sigs <- syscall.SIGTERM:
			default:
			}
		}
		select {
		case <-r.done:
		case <-time.After(wait):
			t.Error("RunDaemon did not return after two SIGTERMs")
		}
	})
	return r
}

// result waits for runDaemon's result.
func (r *runner) result(t *testing.T) error {
	t.Helper()
	select {
	case <-r.done:
		return r.err
	case <-time.After(wait):
		t.Fatal("RunDaemon did not return")
		return nil
	}
}

type tlog struct{ t *testing.T }

func (w tlog) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func TestNotifyLifecycle(t *testing.T) {
	d := newFake()
	r := run(t, d)
	sock, sigs := r.sock, r.sigs
	<-d.started
	if msg, _ := sock.Await(t, "STATUS=starting", wait); notifytest.Has(msg, "READY=1") {
		t.Fatalf("READY=1 before the daemon was ready: %q", msg)
	}

	// Not ready until the daemon says so, watchdog or not.
	sock.Await(t, "WATCHDOG=1", wait)
	if n := sock.Count("READY=1"); n != 0 {
		t.Fatalf("READY=1 sent %d times before the daemon was ready", n)
	}
	close(d.ready)
	if msg, _ := sock.Await(t, "READY=1", wait); !notifytest.Has(msg, "STATUS=running") {
		t.Errorf("READY=1 without STATUS=running: %q", msg)
	}
	for range 3 {
		sock.Await(t, "WATCHDOG=1", wait)
	}

	// SIGHUP: RELOADING=1 (with MONOTONIC_USEC), Reload, READY=1.
	sigs <- syscall.SIGHUP
	msg, _ := sock.Await(t, "RELOADING=1", wait)
	if !strings.Contains(msg, "\nMONOTONIC_USEC=") {
		t.Errorf("RELOADING=1 without MONOTONIC_USEC: %q", msg)
	}
	sock.Await(t, "READY=1", wait)
	if n := d.reloads.Load(); n != 1 {
		t.Errorf("Reload called %d times, want 1", n)
	}

	// First SIGTERM: STOPPING=1 and a drain; Run's nil is RunDaemon's.
	sigs <- syscall.SIGTERM
	sock.Await(t, "STOPPING=1", wait)
	if err := r.result(t); err != nil {
		t.Fatalf("RunDaemon: %v", err)
	}
	if n := sock.Count("READY=1"); n != 2 {
		t.Errorf("READY=1 sent %d times, want 2 (start, reload)", n)
	}
}

func TestNotifySecondSignalStopsAtOnce(t *testing.T) {
	d := newFake()
	d.block = true
	close(d.ready)
	r := run(t, d)
	sock, sigs := r.sock, r.sigs
	sock.Await(t, "READY=1", wait)
	sigs <- syscall.SIGTERM
	sock.Await(t, "STOPPING=1", wait)
	<-d.drained
	sigs <- syscall.SIGINT
	sock.Await(t, "STATUS=stopping at once", wait)
	<-d.hardStop
	if err := r.result(t); err != nil {
		t.Fatal(err)
	}
	if n := sock.Count("STOPPING=1"); n != 1 {
		t.Errorf("STOPPING=1 sent %d times, want 1", n)
	}
}

func TestNotifyNotReadyNoReloadingNoReady(t *testing.T) {
	// Signals before the daemon is ready must not claim readiness: no
	// RELOADING=1/READY=1 pair for a SIGHUP, and no READY=1 once the
	// daemon becomes ready during its drain.
	d := newFake()
	d.block = true
	r := run(t, d)
	sock, sigs := r.sock, r.sigs
	<-d.started
	sigs <- syscall.SIGHUP
	<-d.entered
	sigs <- syscall.SIGTERM
	sock.Await(t, "STOPPING=1", wait)
	close(d.ready)
	sigs <- syscall.SIGTERM
	if err := r.result(t); err != nil {
		t.Fatal(err)
	}
	for _, m := range sock.Messages() {
		if notifytest.Has(m, "READY=1") || notifytest.Has(m, "RELOADING=1") {
			t.Errorf("sent %q for a daemon never ready before its drain", m)
		}
	}
}

func TestNotifyRunError(t *testing.T) {
	d := newFake()
	d.failNow = errors.New("listen tcp 127.0.0.1:1: bind:\npermission denied")
	r := run(t, d)
	sock := r.sock
	if err := r.result(t); !errors.Is(err, d.failNow) {
		t.Fatalf("RunDaemon = %v, want %v", err, d.failNow)
	}
	msg, _ := sock.Await(t, "STATUS=failed: listen tcp 127.0.0.1:1: bind: permission denied", wait)
	if notifytest.Has(msg, "permission denied") {
		t.Errorf("a newline in the error became a line of its own: %q", msg)
	}
	if n := sock.Count("READY=1"); n != 0 {
		t.Errorf("READY=1 sent for a daemon that failed to start")
	}
}

func TestWatchdogStarvedByStuckLoop(t *testing.T) {
	// A Reload that hangs blocks RunDaemon's loop: the watchdog must stop
	// being fed, and start again once the loop runs.
	d := newFake()
	d.reload = make(chan struct{})
	close(d.ready)
	r := run(t, d)
	sock, sigs, logs := r.sock, r.sigs, r.logs
	var release sync.Once
	unblock := func() { release.Do(func() { close(d.reload) }) }
	t.Cleanup(unblock) // before run's cleanup stops the daemon
	sock.Await(t, "READY=1", wait)
	sock.Await(t, "WATCHDOG=1", wait)

	sigs <- syscall.SIGHUP
	<-d.entered
	// A round that got its proof just before Reload may still ping; from
	// the first starved round on, none may.
	starved := func(n int) func() bool {
		return func() bool { return strings.Count(logs.String(), "watchdog not fed") >= n }
	}
	testutil.Eventually(t, wait, "a starved watchdog round", starved(1))
	sock.Sync(t)
	before := sock.Count("WATCHDOG=1")
	testutil.Eventually(t, wait, "two more starved rounds", starved(3))
	sock.Sync(t)
	if n := sock.Count("WATCHDOG=1") - before; n != 0 {
		t.Fatalf("%d watchdog pings while the loop was stuck in Reload", n)
	}
	if !strings.Contains(logs.String(), "signal loop did not answer") {
		t.Errorf("the log does not say why the watchdog starved:\n%s", logs)
	}

	unblock()
	sock.Await(t, "READY=1", wait) // after RELOADING=1
	sock.Await(t, "WATCHDOG=1", wait)
	sock.Await(t, "WATCHDOG=1", wait)
}

func TestWatchdogStarvedByLivenessCheck(t *testing.T) {
	d := &liveDaemon{fakeDaemon: newFake()}
	close(d.ready)
	r := run(t, d)
	sock, logs := r.sock, r.logs
	sock.Await(t, "READY=1", wait)
	sock.Await(t, "WATCHDOG=1", wait)

	stuck := errors.New("accept loop stuck")
	d.failing.Store(&stuck)
	// From the first starved round on, no ping.
	testutil.Eventually(t, wait, "a starved watchdog round", func() bool {
		return strings.Contains(logs.String(), "accept loop stuck")
	})
	sock.Sync(t)
	before := sock.Count("WATCHDOG=1")
	testutil.Eventually(t, wait, "two more starved rounds", func() bool {
		return strings.Count(logs.String(), "accept loop stuck") >= 3
	})
	sock.Sync(t)
	if n := sock.Count("WATCHDOG=1") - before; n != 0 {
		t.Fatalf("%d watchdog pings while the liveness check failed", n)
	}

	d.failing.Store(nil)
	sock.Await(t, "WATCHDOG=1", wait)
}

func TestWatchdogOff(t *testing.T) {
	for name, env := range map[string][2]string{
		"no WATCHDOG_USEC":           {"", ""},
		"WATCHDOG_PID another's":     {"100000", "1"},
		"WATCHDOG_USEC not a number": {"soon", ""},
	} {
		t.Run(name, func(t *testing.T) {
			t.Setenv("WATCHDOG_USEC", env[0])
			t.Setenv("WATCHDOG_PID", env[1])
			d := newFake()
			close(d.ready)
			r := run(t, d)
			sock, sigs, logs := r.sock, r.sigs, r.logs
			sock.Await(t, "READY=1", wait)
			sigs <- syscall.SIGTERM
			if err := r.result(t); err != nil {
				t.Fatal(err)
			}
			// The watchdog goroutine starts, or not, before the loop runs.
			if strings.Contains(logs.String(), "systemd watchdog on") || sock.Count("WATCHDOG=1") > 0 {
				t.Errorf("watchdog on with WATCHDOG_USEC=%q WATCHDOG_PID=%q", env[0], env[1])
			}
		})
	}
}

func TestNoNotifySocket(t *testing.T) {
	// Outside systemd every notification is a no-op, watchdog included.
	t.Setenv("NOTIFY_SOCKET", "")
	t.Setenv("WATCHDOG_USEC", "20000")
	t.Setenv("WATCHDOG_PID", "")
	logs := &testutil.LogBuffer{}
	log := slog.New(slog.NewTextHandler(io.MultiWriter(logs, tlog{t}), &slog.HandlerOptions{Level: slog.LevelDebug}))
	d := newFake()
	close(d.ready)
	sigs := make(chan os.Signal, 4)
	res := make(chan error, 1)
	go func() { res <- runDaemon(d, log, sigs) }()
	<-d.started
	sigs <- syscall.SIGHUP
	<-d.entered
	testutil.Eventually(t, wait, "a reload", func() bool { return d.reloads.Load() == 1 })
	sigs <- syscall.SIGTERM
	select {
	case err := <-res:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(wait):
		t.Fatal("RunDaemon did not return")
	}
	if l := logs.String(); strings.Contains(l, "sd_notify failed") || strings.Contains(l, "systemd watchdog on") {
		t.Errorf("notifications without NOTIFY_SOCKET:\n%s", l)
	}
}
