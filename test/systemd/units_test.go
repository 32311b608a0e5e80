// Package systemd checks the units in configs/systemd with systemd's own
// tools (systemd-analyze verify and security), and that the binaries speak
// the notify protocol those units expect (Type=notify, WatchdogSec=).
package systemd

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/proctest"
	"github.com/vpcreach/vpcreach/internal/testutil"
)

// units returns the paths of the units in configs/systemd.
func units(t *testing.T) []string {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(proctest.ModuleRoot(t), "configs", "systemd", "*.service"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range paths {
		names = append(names, filepath.Base(p))
	}
	for _, want := range []string{"vpcreach-agent.service", "vpcreach-proxyserver.service", "vpcreach-socks5d.service"} {
		if !slices.Contains(names, want) {
			t.Fatalf("configs/systemd has no %s (found %v)", want, names)
		}
	}
	return paths
}

// analyze runs systemd-analyze and returns its combined output (and
// whether it exited 0), without colours or a pager.
func analyze(t *testing.T, args ...string) (string, bool) {
	t.Helper()
	sa := testutil.NeedBinary(t, "systemd-analyze")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, sa, args...)
	cmd.Env = append(os.Environ(), "SYSTEMD_COLORS=0", "SYSTEMD_PAGER=cat", "SYSTEMD_LOG_COLOR=0")
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("systemd-analyze %s: %v", strings.Join(args, " "), ctx.Err())
	}
	if _, isExit := err.(*exec.ExitError); err != nil && !isExit {
		t.Fatalf("systemd-analyze %s: %v", strings.Join(args, " "), err)
	}
	return string(out), err == nil
}

// ourBinary is an Exec*= line that runs one of our binaries from where the
// package installs them.
var ourBinary = regexp.MustCompile(`(?m)^(Exec[A-Za-z]+=[-@:+!]*)/usr/bin/(agent|proxyserver|socks5d)\b`)

// verify runs systemd-analyze verify on the unit text, with our binaries'
// paths pointed at an executable that exists (this test), so that the
// complaints left are all about the unit itself: every output line is
// one. (Unknown keys and sections are only warnings, so the exit status
// alone would miss them.)
func verify(t *testing.T, name, text string) (problems []string) {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(ourBinary.ReplaceAllString(text, "${1}"+exe)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, ok := analyze(t, "verify", "--man=no", path)
	for l := range strings.Lines(out) {
		if l = strings.TrimSpace(l); l != "" {
			problems = append(problems, l)
		}
	}
	if !ok && len(problems) == 0 {
		problems = append(problems, "systemd-analyze verify failed without a word")
	}
	return problems
}

func TestUnitsVerify(t *testing.T) {
	for _, path := range units(t) {
		name := filepath.Base(path)
		t.Run(name, func(t *testing.T) {
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			text := string(b)
			if n := len(ourBinary.FindAllString(text, -1)); n < 2 {
				t.Fatalf("want ExecStartPre= and ExecStart= running /usr/bin/<binary>; found %d such lines", n)
			}
			for _, p := range verify(t, name, text) {
				if strings.Contains(p, "Unknown key") || strings.Contains(p, "Unknown section") {
					t.Errorf("systemd does not know this: %s", p)
				} else {
					t.Errorf("systemd-analyze verify: %s", p)
				}
			}
		})
	}
}

// TestUnitsVerifyCatches proves the check above sees systemd's complaints:
// a unit with an unknown key and section must produce both.
func TestUnitsVerifyCatches(t *testing.T) {
	bad := "[Unit]\nDescription=bad\n[Service]\nExecStart=/usr/bin/agent\nRestartSteps=5\n[Sevrice]\nUser=nobody\n"
	problems := strings.Join(verify(t, "bad.service", bad), "\n")
	for _, want := range []string{"Unknown key", "RestartSteps", "Unknown section", "Sevrice"} {
		if !strings.Contains(problems, want) {
			t.Errorf("verify of a unit with a bad key and section does not mention %q:\n%s", want, problems)
		}
	}
}

// exposure levels of systemd-analyze security, best first.
var levels = []string{"SAFE", "OK", "MEDIUM", "EXPOSED", "UNSAFE"}

var (
	overall = regexp.MustCompile(`Overall exposure level for \S+: ([0-9.]+) (` + strings.Join(levels, "|") + `)`)
	// documented is the score in a unit's header comment.
	documented = regexp.MustCompile(`systemd-analyze security --offline=true: ([0-9.]+) ([A-Z]+) \(systemd (\d+)`)
	version    = regexp.MustCompile(`^systemd (\d+)`)
)

func TestUnitsSecurity(t *testing.T) {
	ver, _ := analyze(t, "--version")
	sysVersion := ""
	if m := version.FindStringSubmatch(ver); m != nil {
		sysVersion = m[1]
	}
	for _, path := range units(t) {
		name := filepath.Base(path)
		t.Run(name, func(t *testing.T) {
			start := time.Now()
			out, _ := analyze(t, "security", "--offline=true", "--no-pager", path)
			m := overall.FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("no overall exposure level in:\n%s", out)
			}
			score, level := m[1], m[2]
			t.Logf("%s: %s %s (systemd %s, %v)", name, score, level, sysVersion, time.Since(start).Round(time.Millisecond))
			if slices.Index(levels, level) > slices.Index(levels, "OK") {
				var open []string
				for l := range strings.Lines(out) {
					if strings.HasPrefix(l, "✗") {
						open = append(open, strings.TrimSpace(l))
					}
				}
				t.Errorf("%s rates %s %s, want OK or better; open items:\n%s", name, score, level, strings.Join(open, "\n"))
			}
			// The header comment states the score: keep it true where it
			// was measured (other systemd versions weigh differently).
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			d := documented.FindStringSubmatch(string(b))
			switch {
			case d == nil:
				t.Errorf("%s: no %q comment with the score", name, "systemd-analyze security --offline=true: N.N LEVEL (systemd NNN")
			case d[3] == sysVersion && (d[1] != score || d[2] != level):
				t.Errorf("%s: the comment says %s %s, systemd %s measures %s %s: update it (and README.md)",
					name, d[1], d[2], sysVersion, score, level)
			}
		})
	}
}
