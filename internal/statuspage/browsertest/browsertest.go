// Package browsertest runs a real headless Chromium against a page, for
// the status page's tests: it loads the page, lets its scripts run for a
// budget of virtual time (timers fire without waiting in real time, and
// the budget pauses while requests are in flight), then dumps the DOM or
// takes a screenshot. Tests skip when chromium is not on PATH (the Debian
// package "chromium"), or fail when VPCREACH_REQUIRE_ALL is set.
package browsertest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

// Budget is the virtual time the page's scripts get before the dump:
// long enough for the first fetches and two 2 s refreshes.
const Budget = 5 * time.Second

// deadline bounds one Chromium run in real time; a run takes under 1 s
// on a 2-CPU machine, start-up included.
const deadline = 30 * time.Second

// DumpDOM loads url and returns the DOM as serialized HTML after the
// page's scripts ran for Budget.
func DumpDOM(t testing.TB, url string) string {
	t.Helper()
	return string(run(t, "--dump-dom", url))
}

// Screenshot loads url in a width x height window and returns the path of
// a PNG of the page after its scripts ran for Budget.
func Screenshot(t testing.TB, url string, width, height int) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "status.png")
	run(t, "--screenshot="+p, "--window-size="+strconv.Itoa(width)+","+strconv.Itoa(height), "--hide-scrollbars", url)
	return p
}

// run starts chromium with the common flags and args, waits for it (at
// most deadline) and returns its standard output. Chromium and every
// process it started run in their own process group, killed when the run
// ends, so nothing outlives the test.
func run(t testing.TB, args ...string) []byte {
	t.Helper()
	bin := testutil.NeedBinary(t, "chromium")
	profile, err := os.MkdirTemp("", "vpcreach-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(profile)
	flags := []string{
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
		"--no-first-run", "--no-default-browser-check", "--disable-background-networking",
		"--disable-component-update", "--disable-sync", "--disable-extensions", "--disable-breakpad",
		"--disable-crash-reporter", "--mute-audio", "--password-store=basic", "--use-mock-keychain",
		"--user-data-dir=" + profile, "--virtual-time-budget=" + strconv.Itoa(int(Budget/time.Millisecond)),
	}
	ctx, cancel := context.WithTimeout(context.Background(), deadline)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append(flags, args...)...)
	cmd.Env = append(os.Environ(), "HOME="+profile, "XDG_CONFIG_HOME="+profile, "XDG_CACHE_HOME="+profile)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	t0 := time.Now()
	err = cmd.Run()
	if cmd.Process != nil {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // helpers left behind, if any
	}
	t.Logf("chromium %s: %v", args[0], time.Since(t0).Round(time.Millisecond))
	if err != nil {
		t.Fatalf("chromium %v: %v (after %v)\nstderr:\n%s", args, err, time.Since(t0).Round(time.Millisecond), tail(stderr.Bytes(), 4000))
	}
	return stdout.Bytes()
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
