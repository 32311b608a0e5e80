// Package proctest runs vpcreach's real binaries as processes in tests:
// build them once, start them with a clean environment, signal them, and
// show their output when a test fails.
package proctest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

// Version is stamped into the binaries Build makes, as the Makefile does.
const Version = "process-test"

// Build builds the three daemons and the demo HTTP target into a temp dir
// and returns it.
func Build(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	start := time.Now()
	if err := BuildDir(dir); err != nil {
		t.Fatal(err)
	}
	t.Logf("built binaries in %v", time.Since(start).Round(time.Millisecond))
	return dir
}

// BuildDir builds the binaries into dir (for a TestMain that builds once).
func BuildDir(dir string) error {
	root, err := findModuleRoot()
	if err != nil {
		return err
	}
	cmd := exec.Command("go", "build", "-buildvcs=false",
		"-ldflags", "-X github.com/vpcreach/vpcreach/internal/cli.Version="+Version,
		"-o", dir+string(filepath.Separator),
		"./cmd/agent", "./cmd/proxyserver", "./cmd/socks5d", "./internal/demo/httptarget")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	return nil
}

// ModuleRoot is the directory holding go.mod.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	dir, err := findModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func findModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("go.mod not found above the test directory")
		}
		dir = parent
	}
}

// Env is the environment of every child process: ours without proxy
// settings (which could route curl around the SOCKS proxy), plus the token
// in VPCREACH_TOKEN.
func Env(token string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasSuffix(strings.ToLower(k), "_proxy") || k == "VPCREACH_TOKEN" {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "VPCREACH_TOKEN="+token)
}

// Proc is a running child process.
type Proc struct {
	Name string
	Cmd  *exec.Cmd
	Log  *testutil.LogBuffer // stdout and stderr
	done chan struct{}
	err  error // Wait's result, valid once done is closed
}

// Start starts a process that is killed (if still running) when t ends;
// its output is logged if t failed.
func Start(t testing.TB, token, name, path string, args ...string) *Proc {
	t.Helper()
	p := &Proc{Name: name, Log: &testutil.LogBuffer{}, done: make(chan struct{})}
	p.Cmd = exec.CommandContext(context.Background(), path, args...)
	p.Cmd.Env = Env(token)
	p.Cmd.Stdout = p.Log
	p.Cmd.Stderr = p.Log
	p.Cmd.WaitDelay = 5 * time.Second
	if err := p.Cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = p.Cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.Exited() {
			_ = p.Cmd.Process.Kill()
		}
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Errorf("%s (pid %d) did not exit after SIGKILL", name, p.Cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("----- %s output -----\n%s", name, p.Log)
		}
	})
	return p
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is Wait's result once the process has exited.
func (p *Proc) Err() error {
	<-p.done
	return p.err
}

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Signal sends sig, failing the test if it cannot.
func (p *Proc) Signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := p.Cmd.Process.Signal(sig); err != nil {
		t.Fatalf("%v to %s: %v", sig, p.Name, err)
	}
}

// Terminate sends SIGTERM.
func (p *Proc) Terminate(t testing.TB) { t.Helper(); p.Signal(t, syscall.SIGTERM) }

// Kill sends SIGKILL and waits for the exit.
func (p *Proc) Kill(t testing.TB) {
	t.Helper()
	p.Signal(t, syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not exit after SIGKILL", p.Name)
	}
}

// WaitExit waits for p to exit and returns its exit code; it fails the
// test if p takes longer than timeout or was killed by a signal.
func (p *Proc) WaitExit(t testing.TB, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("%s did not exit within %v", p.Name, timeout)
	}
	var ee *exec.ExitError
	switch {
	case p.err == nil:
		return 0
	case errors.As(p.err, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			t.Fatalf("%s was killed by %v", p.Name, ws.Signal())
		}
		return ee.ExitCode()
	default:
		t.Fatalf("%s: %v", p.Name, p.err)
		return -1
	}
}

// Run runs a binary to completion and returns its output and exit code.
func Run(t testing.TB, token, path string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = Env(token)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.ExitCode() >= 0:
		code = ee.ExitCode()
	default:
		t.Fatalf("%s %s: %v", filepath.Base(path), strings.Join(args, " "), err)
	}
	return out.String(), errb.String(), code
}

// RunWithBinaries is a TestMain body for packages that run the daemons:
// it builds them once into a temp dir, sets *dir, runs the tests, removes
// the dir, and returns the exit code.
func RunWithBinaries(m *testing.M, dir *string) int {
	d, err := os.MkdirTemp("", "vpcreach-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(d)
	if err := BuildDir(d); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	*dir = d
	return m.Run()
}
