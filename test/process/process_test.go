// Package process tests the real binaries as processes, the way the demo
// and systemd run them: agent, proxyserver and socks5d built with go
// build, started from the demo configs (ports patched to free ones),
// driven with the real curl and stopped with signals.
package process

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

const (
	// testVersion is stamped into the binaries the way the Makefile does.
	testVersion = "process-test"
	pageText    = "hello from the private target"
	stopTimeout = 10 * time.Second
)

var daemons = []string{"agent", "proxyserver", "socks5d"}

// TestProcesses builds the binaries once and runs every process-level
// check against them.
func TestProcesses(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the real binaries; skipped with -short")
	}
	bin := buildBinaries(t)

	t.Run("DemoEndToEnd", func(t *testing.T) {
		t.Parallel()
		testDemoEndToEnd(t, bin)
	})
	t.Run("FlagsAndReload", func(t *testing.T) {
		t.Parallel()
		testFlagsAndReload(t, bin)
	})
}

// testDemoEndToEnd: the demo stack serves the page through socks5d and
// through the plain proxy port, then every daemon stops cleanly on
// SIGTERM, the agent withdrawing its route first.
func testDemoEndToEnd(t *testing.T, bin string) {
	s := startStack(t, bin)
	route := s.waitRoute(t)

	before := s.streamsOpened(t)
	out := curlSOCKS(t, s.ports.socks, s.ports.target)
	if !strings.Contains(out, pageText) {
		t.Fatalf("curl through socks5d: page does not contain %q:\n%s", pageText, out)
	}
	// Proof the request went through the tunnel, not straight to the
	// target (curl would do that if a proxy setting bypassed the SOCKS
	// proxy): the proxy server counted a stream.
	if after := s.streamsOpened(t); after <= before {
		t.Fatalf("proxyserver streams_opened %d -> %d: the SOCKS request did not go through the tunnel", before, after)
	}

	out = curlDirect(t, "http://"+route.Proxy+"/")
	if !strings.Contains(out, pageText) {
		t.Fatalf("curl to proxy port %s: page does not contain %q:\n%s", route.Proxy, pageText, out)
	}

	// The agent first: it withdraws its route and exits; then the server
	// (no agent left, so no grace period to wait out) and socks5d.
	s.agent.terminate(t)
	if code := s.agent.waitExit(t, stopTimeout); code != 0 {
		t.Fatalf("agent exited with code %d after SIGTERM, want 0", code)
	}
	if !s.agent.log.Contains("msg=draining") {
		t.Errorf("agent log does not show it draining (msg=draining):\n%s", s.agent.log)
	}
	if !s.proxyserver.log.Contains("agent withdrew its routes") {
		t.Errorf("proxyserver log does not show the agent's withdrawal:\n%s", s.proxyserver.log)
	}
	testutil.Eventually(t, 10*time.Second, "route withdrawn from the lookup API", func() bool {
		rs, err := s.routes()
		return err == nil && len(rs) == 0
	})

	for _, p := range []*proc{s.proxyserver, s.socks5d} {
		p.terminate(t)
		if code := p.waitExit(t, stopTimeout); code != 0 {
			t.Fatalf("%s exited with code %d after SIGTERM, want 0", p.name, code)
		}
	}
}

// testFlagsAndReload: -version, -check-config (good and bad configs) and
// SIGHUP on a running proxyserver.
func testFlagsAndReload(t *testing.T, bin string) {
	ports := pickPorts(t)
	cfgDir := writeConfigs(t, ports)
	token := randomToken(t)

	for _, name := range daemons {
		stdout, stderr, code := runOnce(t, token, filepath.Join(bin, name), "-version")
		if code != 0 {
			t.Errorf("%s -version: exit code %d, stderr:\n%s", name, code, stderr)
		}
		if want := name + " " + testVersion; strings.TrimSpace(stdout) != want {
			t.Errorf("%s -version printed %q, want %q", name, stdout, want)
		}

		cfg := filepath.Join(cfgDir, name+".yaml")
		stdout, stderr, code = runOnce(t, token, filepath.Join(bin, name), "-check-config", "-config", cfg)
		if code != 0 || !strings.Contains(stdout, "configuration OK") {
			t.Errorf("%s -check-config %s: exit code %d, stdout %q, stderr:\n%s", name, cfg, code, stdout, stderr)
		}

		bad := filepath.Join(t.TempDir(), name+".yaml")
		data, err := os.ReadFile(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(bad, append(data, []byte("\nbogus_key: 1\n")...), 0o600); err != nil {
			t.Fatal(err)
		}
		stdout, stderr, code = runOnce(t, token, filepath.Join(bin, name), "-check-config", "-config", bad)
		if code == 0 {
			t.Errorf("%s -check-config with an unknown key exited 0; stdout %q", name, stdout)
		}
		if !strings.Contains(stderr, "bogus_key") {
			t.Errorf("%s -check-config with an unknown key: stderr does not name bogus_key:\n%s", name, stderr)
		}
	}

	s := startStackWith(t, bin, ports, cfgDir, token)
	s.waitRoute(t)
	if out := curlSOCKS(t, ports.socks, ports.target); !strings.Contains(out, pageText) {
		t.Fatalf("curl through socks5d before SIGHUP: %s", out)
	}
	if err := s.proxyserver.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	testutil.Eventually(t, 5*time.Second, "proxyserver logs the SIGHUP", func() bool {
		return s.proxyserver.log.Contains("SIGHUP")
	})
	if s.proxyserver.exited() {
		t.Fatalf("proxyserver exited after SIGHUP: %v", s.proxyserver.err)
	}
	s.waitRoute(t)
	if out := curlSOCKS(t, ports.socks, ports.target); !strings.Contains(out, pageText) {
		t.Fatalf("curl through socks5d after SIGHUP: %s", out)
	}
	if s.proxyserver.exited() {
		t.Fatalf("proxyserver exited after SIGHUP: %v", s.proxyserver.err)
	}
}

// --- building -------------------------------------------------------------

// buildBinaries builds the three daemons and the demo target into a temp
// dir and returns it.
func buildBinaries(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	start := time.Now()
	cmd := exec.Command("go", "build", "-buildvcs=false",
		"-ldflags", "-X github.com/vpcreach/vpcreach/internal/cli.Version="+testVersion,
		"-o", dir+string(filepath.Separator),
		"./cmd/agent", "./cmd/proxyserver", "./cmd/socks5d", "./internal/demo/httptarget")
	cmd.Dir = moduleRoot(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	t.Logf("built binaries in %v", time.Since(start).Round(time.Millisecond))
	return dir
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("go.mod not found above the test directory")
		}
		dir = parent
	}
}

// --- configs --------------------------------------------------------------

type ports struct {
	control, relay, api, socks, target int
	rangeLo, rangeHi                   int
}

// pickPorts returns distinct free loopback ports and a random 100-port
// proxy range in 40000-59999 that none of them falls into.
func pickPorts(t *testing.T) ports {
	t.Helper()
	var p ports
	for {
		n, err := rand.Int(rand.Reader, big.NewInt(200))
		if err != nil {
			t.Fatal(err)
		}
		p.rangeLo = 40000 + int(n.Int64())*100
		p.rangeHi = p.rangeLo + 99
		seen := map[int]bool{}
		fixed := []*int{&p.control, &p.relay, &p.api, &p.socks, &p.target}
		for _, f := range fixed {
			for {
				*f = testutil.FreePort(t)
				if !seen[*f] {
					break
				}
			}
			seen[*f] = true
		}
		clash := false
		for port := range seen {
			if port >= p.rangeLo && port <= p.rangeHi {
				clash = true
			}
		}
		if !clash {
			return p
		}
	}
}

// writeConfigs copies configs/demo/*.yaml into a temp dir with every demo
// port replaced by one of p's, and returns the dir.
func writeConfigs(t *testing.T, p ports) string {
	t.Helper()
	src := filepath.Join(moduleRoot(t), "configs", "demo")
	pairs := []string{
		"21000-21099", fmt.Sprintf("%d-%d", p.rangeLo, p.rangeHi),
		"17000", strconv.Itoa(p.control),
		"17001", strconv.Itoa(p.relay),
		"17070", strconv.Itoa(p.api),
		"11080", strconv.Itoa(p.socks),
		"18080", strconv.Itoa(p.target),
	}
	r := strings.NewReplacer(pairs...)
	dir := t.TempDir()
	var all strings.Builder
	for _, name := range daemons {
		data, err := os.ReadFile(filepath.Join(src, name+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		all.Write(data)
		if err := os.WriteFile(filepath.Join(dir, name+".yaml"), []byte(r.Replace(string(data))), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// If the demo configs stop using a port, patching silently does
	// nothing and the test would run on the fixed demo ports: fail instead.
	for i := 0; i < len(pairs); i += 2 {
		if !strings.Contains(all.String(), pairs[i]) {
			t.Fatalf("configs/demo no longer mentions %s; update the port patching in this test", pairs[i])
		}
	}
	return dir
}

func randomToken(t *testing.T) string {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// childEnv is the environment of every child process: ours without proxy
// settings (which could route curl around the SOCKS proxy), plus the token.
func childEnv(token string) []string {
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

// --- processes ------------------------------------------------------------

type proc struct {
	name string
	cmd  *exec.Cmd
	log  *testutil.LogBuffer // stdout and stderr
	done chan struct{}
	err  error // Wait's result, valid once done is closed
}

// startProc starts a process that is killed (if still running) when t
// ends; its output is logged if t failed.
func startProc(t *testing.T, token, name, path string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, log: &testutil.LogBuffer{}, done: make(chan struct{})}
	p.cmd = exec.CommandContext(t.Context(), path, args...)
	p.cmd.Env = childEnv(token)
	p.cmd.Stdout = p.log
	p.cmd.Stderr = p.log
	p.cmd.WaitDelay = 5 * time.Second
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.exited() {
			_ = p.cmd.Process.Kill()
		}
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Errorf("%s (pid %d) did not exit after SIGKILL", name, p.cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("----- %s output -----\n%s", name, p.log)
		}
	})
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

func (p *proc) terminate(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM %s: %v", p.name, err)
	}
}

// waitExit waits for p to exit and returns its exit code; it fails the
// test if p takes longer than timeout or was killed by a signal.
func (p *proc) waitExit(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("%s did not exit within %v of SIGTERM", p.name, timeout)
	}
	var ee *exec.ExitError
	switch {
	case p.err == nil:
		return 0
	case errors.As(p.err, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			t.Fatalf("%s was killed by %v", p.name, ws.Signal())
		}
		return ee.ExitCode()
	default:
		t.Fatalf("%s: %v", p.name, p.err)
		return -1
	}
}

// runOnce runs a binary to completion and returns its output and exit code.
func runOnce(t *testing.T, token, path string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = childEnv(token)
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

// --- the demo stack -------------------------------------------------------

type stack struct {
	ports                                   ports
	httptarget, proxyserver, agent, socks5d *proc
	api                                     *http.Client
}

func startStack(t *testing.T, bin string) *stack {
	t.Helper()
	p := pickPorts(t)
	return startStackWith(t, bin, p, writeConfigs(t, p), randomToken(t))
}

// startStackWith starts httptarget, proxyserver, agent and socks5d from
// the configs in cfgDir and waits until every listener is up.
func startStackWith(t *testing.T, bin string, p ports, cfgDir, token string) *stack {
	t.Helper()
	s := &stack{ports: p, api: &http.Client{
		Timeout:   2 * time.Second,
		Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true},
	}}
	cfg := func(name string) string { return filepath.Join(cfgDir, name+".yaml") }
	s.httptarget = startProc(t, token, "httptarget", filepath.Join(bin, "httptarget"),
		"-listen", net.JoinHostPort("127.0.0.1", strconv.Itoa(p.target)))
	s.proxyserver = startProc(t, token, "proxyserver", filepath.Join(bin, "proxyserver"), "-config", cfg("proxyserver"))
	s.agent = startProc(t, token, "agent", filepath.Join(bin, "agent"), "-config", cfg("agent"))
	s.socks5d = startProc(t, token, "socks5d", filepath.Join(bin, "socks5d"), "-config", cfg("socks5d"))

	for _, l := range []struct {
		p    *proc
		port int
	}{{s.httptarget, p.target}, {s.proxyserver, p.api}, {s.socks5d, p.socks}} {
		testutil.Eventually(t, 10*time.Second, fmt.Sprintf("%s listening on port %d", l.p.name, l.port), func() bool {
			if l.p.exited() {
				t.Fatalf("%s exited during startup: %v", l.p.name, l.p.err)
			}
			c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(l.port)), time.Second)
			if err != nil {
				return false
			}
			c.Close()
			return true
		})
	}
	return s
}

type apiRoute struct {
	Target string `json:"target"`
	Proxy  string `json:"proxy"`
	Relay  string `json:"relay"`
	Agent  string `json:"agent"`
}

func (s *stack) getJSON(path string, v any) error {
	resp, err := s.api.Get(fmt.Sprintf("http://127.0.0.1:%d%s", s.ports.api, path))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

func (s *stack) routes() ([]apiRoute, error) {
	var rs []apiRoute
	err := s.getJSON("/v1/routes", &rs)
	return rs, err
}

// waitRoute waits until the lookup API lists the demo target's route.
func (s *stack) waitRoute(t *testing.T) apiRoute {
	t.Helper()
	want := net.JoinHostPort("127.0.0.1", strconv.Itoa(s.ports.target))
	var found apiRoute
	testutil.Eventually(t, 10*time.Second, "the lookup API lists the route to "+want, func() bool {
		for _, p := range []*proc{s.proxyserver, s.agent, s.socks5d} {
			if p.exited() {
				t.Fatalf("%s exited: %v", p.name, p.err)
			}
		}
		rs, err := s.routes()
		if err != nil {
			return false
		}
		for _, r := range rs {
			if r.Target == want && r.Proxy != "" {
				found = r
				return true
			}
		}
		return false
	})
	host, port, err := net.SplitHostPort(found.Proxy)
	if err != nil {
		t.Fatalf("route proxy %q: %v", found.Proxy, err)
	}
	if n, _ := strconv.Atoi(port); host != "127.0.0.1" || n < s.ports.rangeLo || n > s.ports.rangeHi {
		t.Fatalf("route proxy %s is not 127.0.0.1 in port_range %d-%d", found.Proxy, s.ports.rangeLo, s.ports.rangeHi)
	}
	t.Logf("route: %s -> %s (relay %s, agent %s)", found.Target, found.Proxy, found.Relay, found.Agent)
	return found
}

// streamsOpened reads the proxyserver's streams_opened counter.
func (s *stack) streamsOpened(t *testing.T) int64 {
	t.Helper()
	var stats map[string]int64
	if err := s.getJSON("/v1/stats", &stats); err != nil {
		t.Fatalf("stats: %v", err)
	}
	n, ok := stats["streams_opened"]
	if !ok {
		t.Fatalf("/v1/stats has no streams_opened: %v", stats)
	}
	return n
}

// --- curl -----------------------------------------------------------------

// curlSOCKS fetches the target's page through socks5d with the real curl.
// --noproxy "" makes curl use the SOCKS proxy even for 127.0.0.1, whatever
// NO_PROXY says.
func curlSOCKS(t *testing.T, socksPort, targetPort int) string {
	t.Helper()
	return runCurl(t, "--noproxy", "", "--socks5-hostname", net.JoinHostPort("127.0.0.1", strconv.Itoa(socksPort)),
		fmt.Sprintf("http://127.0.0.1:%d/", targetPort))
}

// curlDirect fetches url with no proxy at all.
func curlDirect(t *testing.T, url string) string {
	t.Helper()
	return runCurl(t, "--noproxy", "*", url)
}

func runCurl(t *testing.T, args ...string) string {
	t.Helper()
	curl := testutil.NeedBinary(t, "curl")
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer cancel()
	args = append([]string{"-sS", "--max-time", "10"}, args...)
	cmd := exec.CommandContext(ctx, curl, args...)
	cmd.Env = childEnv("")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("curl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}
