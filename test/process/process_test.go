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

	"github.com/vpcreach/vpcreach/internal/proctest"
	"github.com/vpcreach/vpcreach/internal/testutil"
)

const (
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
	bin := proctest.Build(t)

	t.Run("DemoEndToEnd", func(t *testing.T) {
		t.Parallel()
		testDemoEndToEnd(t, bin)
	})
	t.Run("FlagsAndReload", func(t *testing.T) {
		t.Parallel()
		testFlagsAndReload(t, bin)
	})
	t.Run("ExampleConfigs", func(t *testing.T) {
		t.Parallel()
		testExampleConfigs(t, bin)
	})
}

// testExampleConfigs: the annotated production examples in configs/ pass
// -check-config (with the token file pointed at a real one).
func testExampleConfigs(t *testing.T, bin string) {
	token := randomToken(t)
	tokFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range daemons {
		data, err := os.ReadFile(filepath.Join(proctest.ModuleRoot(t), "configs", name+".yaml"))
		if err != nil {
			t.Fatal(err)
		}
		cfg := filepath.Join(t.TempDir(), name+".yaml")
		patched := strings.ReplaceAll(string(data), "/etc/vpcreach/token", tokFile)
		if err := os.WriteFile(cfg, []byte(patched), 0o600); err != nil {
			t.Fatal(err)
		}
		stdout, stderr, code := proctest.Run(t, token, filepath.Join(bin, name), "-check-config", "-config", cfg)
		if code != 0 || !strings.Contains(stdout, "configuration OK") {
			t.Errorf("%s -check-config configs/%s.yaml: exit %d\n%s%s", name, name, code, stdout, stderr)
		}
	}
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
	s.agent.Terminate(t)
	if code := s.agent.WaitExit(t, stopTimeout); code != 0 {
		t.Fatalf("agent exited with code %d after SIGTERM, want 0", code)
	}
	if !s.agent.Log.Contains("msg=draining") {
		t.Errorf("agent log does not show it draining (msg=draining):\n%s", s.agent.Log)
	}
	if !s.proxyserver.Log.Contains("agent withdrew its routes") {
		t.Errorf("proxyserver log does not show the agent's withdrawal:\n%s", s.proxyserver.Log)
	}
	testutil.Eventually(t, 10*time.Second, "route withdrawn from the lookup API", func() bool {
		rs, err := s.routes()
		return err == nil && len(rs) == 0
	})

	for _, p := range []*proctest.Proc{s.proxyserver, s.socks5d} {
		p.Terminate(t)
		if code := p.WaitExit(t, stopTimeout); code != 0 {
			t.Fatalf("%s exited with code %d after SIGTERM, want 0", p.Name, code)
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
		stdout, stderr, code := proctest.Run(t, token, filepath.Join(bin, name), "-version")
		if code != 0 {
			t.Errorf("%s -version: exit code %d, stderr:\n%s", name, code, stderr)
		}
		if want := name + " " + proctest.Version; strings.TrimSpace(stdout) != want {
			t.Errorf("%s -version printed %q, want %q", name, stdout, want)
		}

		cfg := filepath.Join(cfgDir, name+".yaml")
		stdout, stderr, code = proctest.Run(t, token, filepath.Join(bin, name), "-check-config", "-config", cfg)
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
		stdout, stderr, code = proctest.Run(t, token, filepath.Join(bin, name), "-check-config", "-config", bad)
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
	s.proxyserver.Signal(t, syscall.SIGHUP)
	testutil.Eventually(t, 5*time.Second, "proxyserver logs the SIGHUP", func() bool {
		return s.proxyserver.Log.Contains("SIGHUP")
	})
	if s.proxyserver.Exited() {
		t.Fatalf("proxyserver exited after SIGHUP: %v", s.proxyserver.Err())
	}
	s.waitRoute(t)
	if out := curlSOCKS(t, ports.socks, ports.target); !strings.Contains(out, pageText) {
		t.Fatalf("curl through socks5d after SIGHUP: %s", out)
	}
	if s.proxyserver.Exited() {
		t.Fatalf("proxyserver exited after SIGHUP: %v", s.proxyserver.Err())
	}

	// The agent reloads its targets on SIGHUP; a broken file is refused
	// with a message naming the key, and the running configuration stays.
	agentCfg := filepath.Join(cfgDir, "agent.yaml")
	good, err := os.ReadFile(agentCfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(agentCfg, append(good, []byte("bogus_key: 1\n")...), 0o600); err != nil {
		t.Fatal(err)
	}
	s.agent.Signal(t, syscall.SIGHUP)
	testutil.Eventually(t, 5*time.Second, "agent refuses the broken reload", func() bool {
		return s.agent.Log.Contains("reload refused") && s.agent.Log.Contains("bogus_key")
	})
	if out := curlSOCKS(t, ports.socks, ports.target); !strings.Contains(out, pageText) {
		t.Fatalf("curl through socks5d after a refused reload: %s", out)
	}
	extra := testutil.FreePort(t)
	added := strings.Replace(string(good), "targets:\n", fmt.Sprintf("targets:\n  - addr: 127.0.0.1:%d\n", extra), 1)
	if added == string(good) {
		t.Fatal("configs/demo/agent.yaml has no targets: list to extend")
	}
	if err := os.WriteFile(agentCfg, []byte(added), 0o600); err != nil {
		t.Fatal(err)
	}
	s.agent.Signal(t, syscall.SIGHUP)
	want := fmt.Sprintf("127.0.0.1:%d", extra)
	testutil.Eventually(t, 10*time.Second, "the added target's route", func() bool {
		rs, err := s.routes()
		for _, r := range rs {
			if err == nil && r.Target == want {
				return true
			}
		}
		return false
	})
	if !s.agent.Log.Contains("configuration reloaded") || s.agent.Log.Contains("tunnel lost") {
		t.Fatalf("agent log after the reload:\n%s", s.agent.Log)
	}
	if out := curlSOCKS(t, ports.socks, ports.target); !strings.Contains(out, pageText) {
		t.Fatalf("curl through socks5d after the reload: %s", out)
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
	src := filepath.Join(proctest.ModuleRoot(t), "configs", "demo")
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

// --- the demo stack -------------------------------------------------------

type stack struct {
	ports                                   ports
	httptarget, proxyserver, agent, socks5d *proctest.Proc
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
	s.httptarget = proctest.Start(t, token, "httptarget", filepath.Join(bin, "httptarget"),
		"-listen", net.JoinHostPort("127.0.0.1", strconv.Itoa(p.target)))
	s.proxyserver = proctest.Start(t, token, "proxyserver", filepath.Join(bin, "proxyserver"), "-config", cfg("proxyserver"))
	s.agent = proctest.Start(t, token, "agent", filepath.Join(bin, "agent"), "-config", cfg("agent"))
	s.socks5d = proctest.Start(t, token, "socks5d", filepath.Join(bin, "socks5d"), "-config", cfg("socks5d"))

	for _, l := range []struct {
		p    *proctest.Proc
		port int
	}{{s.httptarget, p.target}, {s.proxyserver, p.api}, {s.socks5d, p.socks}} {
		testutil.Eventually(t, 10*time.Second, fmt.Sprintf("%s listening on port %d", l.p.Name, l.port), func() bool {
			if l.p.Exited() {
				t.Fatalf("%s exited during startup: %v", l.p.Name, l.p.Err())
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
		for _, p := range []*proctest.Proc{s.proxyserver, s.agent, s.socks5d} {
			if p.Exited() {
				t.Fatalf("%s exited: %v", p.Name, p.Err())
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
	cmd.Env = proctest.Env("")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("curl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}
