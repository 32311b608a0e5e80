package main

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

// The test binary doubles as vpcreachctl: with this variable set it runs
// main, so the tests see the real process's exit code and output.
const beMain = "VPCREACHCTL_TEST_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(beMain) != "" {
		main()
		return
	}
	os.Exit(m.Run())
}

// runCtl runs vpcreachctl as a process.
func runCtl(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), beMain+"=1")
	var out, errOut strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatal(err)
	}
	t.Logf("$ vpcreachctl %s  (exit %d)\n%s%s", strings.Join(args, " "), code, out.String(), errOut.String())
	return code, out.String(), errOut.String()
}

func TestProcess(t *testing.T) {
	if code, out, _ := runCtl(t, "-version"); code != 0 || !strings.HasPrefix(out, "vpcreachctl ") {
		t.Errorf("-version: exit %d, %q", code, out)
	}
	if code, _, errOut := runCtl(t); code != 2 || !strings.Contains(errOut, "usage: vpcreachctl") {
		t.Errorf("no arguments: exit %d", code)
	}
	if code, _, _ := runCtl(t, "-api", "http://127.0.0.1:1", "explain", "not-an-address"); code != 2 {
		t.Errorf("bad target: exit %d, want 2", code)
	}
	// A Redis that is not there: exit 1, and only vpcreachctl's own line
	// (go-redis's log lines are silenced).
	port := strconv.Itoa(testutil.FreePort(t))
	code, _, errOut := runCtl(t, "-redis", "127.0.0.1:"+port, "-timeout", "300ms", "routes")
	if code != 1 {
		t.Errorf("redis down: exit %d, want 1", code)
	}
	if lines := strings.Split(strings.TrimSpace(errOut), "\n"); len(lines) != 1 || !strings.HasPrefix(lines[0], "vpcreachctl: ") {
		t.Errorf("redis down: stderr %q", errOut)
	}
}
