package ctl

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/vpcreach/vpcreach/internal/agent"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const testToken = "ctl-test-token-0123456789"

func tokenFile(t *testing.T) config.Secret {
	p := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(p, []byte(testToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return config.Secret{File: p}
}

// startServer starts a proxy server on loopback over reg, with its admin
// listener unless noAdmin; closed at cleanup.
func startServer(t *testing.T, reg registry.Registry, noAdmin bool) *server.Server {
	t.Helper()
	lo := 20000 + rand.IntN(60)*200 // below the ephemeral range
	cfg := server.Config{ServerID: "member-" + strconv.Itoa(rand.IntN(1e6)), Control: "127.0.0.1:0",
		Advertise: "127.0.0.1", Admin: "127.0.0.1:0", Ports: fmt.Sprintf("%d-%d", lo, lo+199),
		Token: tokenFile(t), DrainGrace: 2 * time.Second}
	if noAdmin {
		cfg.Admin = ""
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	s, err := server.New(cfg, reg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// apiURLOf is the admin listener URL of s.
func apiURLOf(s *server.Server) string { return "http://" + s.APIAddr().String() }

// runningAgent is an agent running in a goroutine.
type runningAgent struct {
	id   string
	stop context.CancelFunc
	done chan struct{}
}

// Stop drains the agent (its routes are withdrawn) and waits for Run.
func (r *runningAgent) Stop() {
	r.stop()
	<-r.done
}

// startAgent runs an agent exposing targets through srv; stopped at
// cleanup.
func startAgent(t *testing.T, srv *server.Server, targets ...string) *runningAgent {
	t.Helper()
	cfg := agent.Config{AgentID: "agent-" + strconv.Itoa(rand.IntN(1e6)), Servers: []string{srv.ControlAddr().String()},
		Token: tokenFile(t), DrainGrace: 2 * time.Second, BackoffMax: 300 * time.Millisecond}
	for _, tg := range targets {
		cfg.Targets = append(cfg.Targets, agent.TargetConfig{Addr: tg})
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(cfg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	hard, stopHard := context.WithCancel(context.Background())
	r := &runningAgent{id: cfg.AgentID, stop: stop, done: make(chan struct{})}
	go func() { _ = a.Run(ctx, hard); close(r.done) }()
	t.Cleanup(func() {
		stopHard()
		stop()
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			t.Error("agent did not stop within 10 s")
		}
	})
	// Before the agent drains (cleanups run last-in first-out), let the
	// streams explain opened end: the proxy-port check of step 3 reaches
	// the agent asynchronously, and internal/agent's acceptLoop calls
	// active.Add while drain may already wait on it (a WaitGroup race the
	// race detector reports; a bug of that package).
	t.Cleanup(func() {
		testutil.Eventually(t, 5*time.Second, "explain's streams ended", func() bool {
			for _, ai := range srv.Agents() {
				if ai.Streams != 0 || ai.Yamux > 1 {
					return false
				}
			}
			return true
		})
	})
	return r
}

// waitRoute polls reg until target has a route and returns it.
func waitRoute(t *testing.T, reg registry.Reader, target string) registry.Route {
	t.Helper()
	k, err := registry.ParseKey(target)
	if err != nil {
		t.Fatal(err)
	}
	var r registry.Route
	testutil.Eventually(t, 10*time.Second, "route for "+target, func() bool {
		r, err = reg.Lookup(context.Background(), k)
		return err == nil
	})
	return r
}

// fixture is one member with its admin listener over an in-memory
// registry, an echo target and a port where nothing listens, both
// exposed by one agent.
type fixture struct {
	reg     *registry.Memory
	srv     *server.Server
	api     string
	agent   *runningAgent
	echo    string // live target
	refused string // exposed, nothing listens
	route   registry.Route
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{reg: registry.NewMemory(nil)}
	t.Cleanup(func() { f.reg.Close() })
	f.srv = startServer(t, f.reg, false)
	f.api = apiURLOf(f.srv)
	f.echo = testutil.EchoTarget(t)
	f.refused = "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))
	f.agent = startAgent(t, f.srv, f.echo, f.refused)
	f.route = waitRoute(t, f.reg, f.echo)
	waitRoute(t, f.reg, f.refused)
	return f
}

// result is one run of the CLI.
type result struct {
	code           int
	stdout, stderr string
}

// run runs vpcreachctl with args and logs what it printed.
func run(t *testing.T, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	code := Run(args, &out, &errOut)
	r := result{code: code, stdout: out.String(), stderr: errOut.String()}
	t.Logf("$ vpcreachctl %s  (exit %d)\n%s%s", strings.Join(args, " "), code, r.stdout, r.stderr)
	return r
}

// mustContain fails unless s holds every want.
func mustContain(t *testing.T, what, s string, wants ...string) {
	t.Helper()
	for _, w := range wants {
		if !strings.Contains(s, w) {
			t.Errorf("%s does not contain %q:\n%s", what, w, s)
		}
	}
}

// stepLine returns the table line of explain step n.
func stepLine(t *testing.T, out string, n int) string {
	t.Helper()
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, strconv.Itoa(n)+" ") {
			return l
		}
	}
	t.Fatalf("no line for step %d in:\n%s", n, out)
	return ""
}

// stepResult returns the RESULT column of explain step n.
func stepResult(t *testing.T, out string, n int) string {
	t.Helper()
	f := strings.Fields(stepLine(t, out, n))
	// "1 route ok ...", "2 member alive ok ...": the result follows the name.
	for _, w := range f[1:] {
		if w == "ok" || w == "FAIL" || w == "-" {
			return w
		}
	}
	t.Fatalf("no result in step %d line %q", n, stepLine(t, out, n))
	return ""
}
