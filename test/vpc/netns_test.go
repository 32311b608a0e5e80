package vpc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vpcreach/vpcreach/internal/proctest"
	"github.com/vpcreach/vpcreach/internal/testutil"
)

// nsPrefix starts every namespace these tests make. A name is
// nsPrefix<pid>-<random>-<role>: the pid tells a later run whether the
// run that made it is gone (its namespaces are then stale), the random
// part keeps two tests of one run apart.
const nsPrefix = "vpcr-"

// netnsDir is where `ip netns` keeps its named namespaces.
const netnsDir = "/var/run/netns"

var staleOnce sync.Once

// removeStaleNamespaces deletes namespaces left by earlier runs of these
// tests that died before their cleanup (go test -timeout, a signal),
// killing what still runs in them. Namespaces of a live process are left
// alone: they may belong to a concurrent run.
func removeStaleNamespaces(t *testing.T) {
	staleOnce.Do(func() {
		entries, err := os.ReadDir(netnsDir)
		if err != nil {
			return // no namespaces at all
		}
		for _, e := range entries {
			rest, ok := strings.CutPrefix(e.Name(), nsPrefix)
			if !ok {
				continue
			}
			pidText, _, _ := strings.Cut(rest, "-")
			pid, err := strconv.Atoi(pidText)
			if err != nil || pid == os.Getpid() {
				continue
			}
			if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
				continue // its run is still alive
			}
			killAllIn(e.Name())
			if out, err := exec.Command("ip", "netns", "del", e.Name()).CombinedOutput(); err != nil {
				t.Logf("removing stale namespace %s: %v %s", e.Name(), err, out)
				continue
			}
			t.Logf("removed stale namespace %s", e.Name())
		}
	})
}

// killAllIn SIGKILLs every process in namespace ns.
func killAllIn(ns string) {
	out, err := exec.Command("ip", "netns", "pids", ns).Output()
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// nsStem returns a fresh, unique namespace name stem for one test.
func nsStem(t *testing.T) string {
	var b [3]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%s%d-%s-", nsPrefix, os.Getpid(), hex.EncodeToString(b[:]))
}

// addNamespace creates namespace name with its loopback up; cleanup
// kills whatever still runs in it and deletes it, also when t failed.
func addNamespace(t *testing.T, name string) {
	t.Helper()
	ipCmd(t, "netns", "add", name)
	t.Cleanup(func() {
		killAllIn(name)
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v %s", name, err, out)
		}
	})
	ipCmd(t, "-n", name, "link", "set", "lo", "up")
}

// ipCmd runs `ip args...` and fails t if it fails.
func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// cmdResult is the outcome of a short command run inside a namespace.
type cmdResult struct {
	stdout, stderr string
	code           int // exit code; -1 when killed at its timeout
	timedOut       bool
	took           time.Duration
}

func (r cmdResult) String() string {
	return fmt.Sprintf("exit %d after %v, stdout %q, stderr %q", r.code, r.took.Round(time.Millisecond),
		strings.TrimSpace(r.stdout), strings.TrimSpace(r.stderr))
}

// runIn runs args inside namespace ns (`ip netns exec`, which execs the
// program) with the children's clean environment, killed at timeout.
// A program that cannot be started fails t.
func runIn(t *testing.T, ns string, timeout time.Duration, args ...string) cmdResult {
	t.Helper()
	r, err := execIn(ns, timeout, args...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// execIn is runIn for any goroutine: it returns what runIn fails on.
func execIn(ns string, timeout time.Duration, args ...string) (cmdResult, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.Env = proctest.Env("")
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.WaitDelay = time.Second
	start := time.Now()
	err := cmd.Run()
	r := cmdResult{stdout: out.String(), stderr: errb.String(), took: time.Since(start)}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case ctx.Err() != nil:
		r.code, r.timedOut = -1, true
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
		if strings.Contains(r.stderr, "exec of \"") { // ip netns exec could not run it
			return r, fmt.Errorf("ip netns exec %s %s: %s", ns, strings.Join(args, " "), r.stderr)
		}
	default:
		return r, fmt.Errorf("ip netns exec %s %s: %v", ns, strings.Join(args, " "), err)
	}
	return r, nil
}

// mustRunIn is runIn that fails t unless the command exits 0.
func mustRunIn(t *testing.T, ns string, args ...string) string {
	t.Helper()
	r := runIn(t, ns, 10*time.Second, args...)
	if r.code != 0 {
		t.Fatalf("ip netns exec %s %s: %v", ns, strings.Join(args, " "), r)
	}
	return r.stdout
}

// dialIn opens a TCP connection from inside namespace ns, so that the
// test process itself (which stays in the host's namespace) can talk to
// the daemons: the socket is created by a thread that has entered ns and
// keeps that namespace for its life. The thread returns to the original
// namespace before it is handed back to the Go scheduler; if it cannot,
// it stays locked and dies with its goroutine.
func dialIn(ctx context.Context, ns, addr string) (net.Conn, error) {
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		c, err, restored := dialInLocked(ctx, ns, addr)
		if restored {
			runtime.UnlockOSThread()
		}
		ch <- result{c, err}
	}()
	r := <-ch
	return r.c, r.err
}

func dialInLocked(ctx context.Context, ns, addr string) (c net.Conn, err error, restored bool) {
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, err, true
	}
	defer orig.Close()
	target, err := os.Open(filepath.Join(netnsDir, ns))
	if err != nil {
		return nil, err, true
	}
	defer target.Close()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		return nil, fmt.Errorf("setns %s: %w", ns, err), true
	}
	var d net.Dialer
	c, err = d.DialContext(ctx, "tcp", addr)
	if serr := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); serr != nil {
		return c, err, false
	}
	return c, err, true
}

// dialInTimeout is dialIn with a timeout.
func dialInTimeout(ns, addr string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return dialIn(ctx, ns, addr)
}

// waitListeningIn waits until addr accepts connections from inside ns;
// p exiting first fails t at once.
func waitListeningIn(t *testing.T, p *proctest.Proc, ns, addr string) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, addr+" listening in "+ns, func() bool {
		if p.Exited() {
			t.Fatalf("%s exited before listening on %s:\n%s", p.Name, addr, p.Log)
		}
		c, err := dialInTimeout(ns, addr, time.Second)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}
