package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/agent"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/redistest"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// scrape reads a Prometheus text exposition into series -> value, where a
// series is the metric name with its labels as printed.
func scrape(t *testing.T, addr net.Addr) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad metrics line %q", line)
		}
		out[line[:i]] = v
	}
	return out
}

func getStatus(t *testing.T, addr net.Addr, path string) (int, string) {
	t.Helper()
	resp, err := http.Get("http://" + addr.String() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func withAdmin(c *agent.Config, _ *agent.Agent) {
	if c != nil {
		c.Admin = "127.0.0.1:0"
	}
}

// The admin listeners' metrics move with traffic, with bounded labels;
// /readyz and /healthz answer for the server and the agent.
func TestMetricsMoveWithTraffic(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil, withSocks())
	a := startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil, withAdmin)
	route := waitRoute(t, reg, echo, "")
	testutil.Eventually(t, 5*time.Second, "agent admin listener", func() bool { return a.AdminAddr() != nil })

	var before, abefore map[string]float64
	testutil.Eventually(t, 5*time.Second, "tunnels gauge 1 and agent tunnel_up 1", func() bool {
		before, abefore = scrape(t, srv.APIAddr()), scrape(t, a.AdminAddr())
		return before[`vpcreach_server_tunnels`] == 1 && abefore[`vpcreach_agent_tunnel_up`] == 1
	})
	for range 3 {
		c, err := net.Dial("tcp", route.Proxy.String())
		if err != nil {
			t.Fatal(err)
		}
		echoOnce(t, c, strings.Repeat("x", 1000))
		c.Close()
	}
	sc, rep := socksConnect(t, srv.SocksAddr().String(), echo)
	if rep != 0 {
		t.Fatalf("socks reply %d", rep)
	}
	echoOnce(t, sc, "via socks")
	sc.Close()
	// A refused handshake and a stream to a target that refuses.
	bad := dialTCP(t, srv.ControlAddr().String())
	ts, _, err := tunnel.ClientHandshake(bad, hello("wrong-token-0123456789", "127.0.0.1:9"), tunnel.Settings{})
	if err == nil {
		ts.Close()
		t.Fatal("handshake with a wrong token succeeded")
	}

	testutil.Eventually(t, 5*time.Second, "server and agent counters after traffic", func() bool {
		after, aafter := scrape(t, srv.APIAddr()), scrape(t, a.AdminAddr())
		return after[`vpcreach_server_streams_opened_total`] >= before[`vpcreach_server_streams_opened_total`]+4 &&
			after[`vpcreach_server_bytes_total{direction="to_target"}`] >= before[`vpcreach_server_bytes_total{direction="to_target"}`]+3000 &&
			after[`vpcreach_server_bytes_total{direction="from_target"}`] >= 3000 &&
			after[`vpcreach_server_handshake_refusals_total{reason="auth"}`] == before[`vpcreach_server_handshake_refusals_total{reason="auth"}`]+1 &&
			after[`vpcreach_server_socks_connects_total{result="ok"}`] >= 1 &&
			after[`vpcreach_server_streams_open`] == 0 &&
			aafter[`vpcreach_agent_streams_opened_total`] >= abefore[`vpcreach_agent_streams_opened_total`]+4 &&
			aafter[`vpcreach_agent_bytes_total{direction="to_target"}`] >= 3000
	})
	body := func() string {
		resp, err := http.Get("http://" + srv.APIAddr().String() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}()
	_, port, _ := net.SplitHostPort(echo)
	if strings.Contains(body, echo) || strings.Contains(body, ":"+port) {
		t.Fatal("a target address appears in the metrics: labels must be bounded")
	}

	for _, addr := range []net.Addr{srv.APIAddr(), a.AdminAddr()} {
		if code, b := getStatus(t, addr, "/readyz"); code != 200 {
			t.Fatalf("%v /readyz = %d %s, want 200", addr, code, b)
		}
	}
	code, b := getStatus(t, srv.APIAddr(), "/healthz")
	var h struct {
		Checks []struct {
			Name string `json:"name"`
			OK   bool   `json:"ok"`
		} `json:"checks"`
	}
	if err := json.Unmarshal([]byte(b), &h); err != nil || code != 200 || len(h.Checks) != 1 || !h.Checks[0].OK {
		t.Fatalf("server /healthz = %d %s", code, b)
	}
	// The lookup API lives on the same listener.
	if code, b := getStatus(t, srv.APIAddr(), "/v1/lookup?target="+echo); code != 200 || !strings.Contains(b, route.Proxy.String()) {
		t.Fatalf("/v1/lookup on the admin listener = %d %s", code, b)
	}
}

// An agent without a tunnel is not ready.
func TestAgentNotReadyWithoutTunnel(t *testing.T) {
	dead := testutil.FreePort(t)
	a := startAgent(t, []string{"127.0.0.1:" + strconv.Itoa(dead)}, []string{"127.0.0.1:9"}, nil, withAdmin)
	testutil.Eventually(t, 5*time.Second, "agent admin listener", func() bool { return a.AdminAddr() != nil })
	if code, b := getStatus(t, a.AdminAddr(), "/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(b, "no tunnel") {
		t.Fatalf("/readyz without a tunnel = %d %s, want 503 no tunnel", code, b)
	}
	if m := scrape(t, a.AdminAddr()); m[`vpcreach_agent_tunnel_up`] != 0 {
		t.Fatalf("tunnel_up = %v without a tunnel", m[`vpcreach_agent_tunnel_up`])
	}
}

// socks5d's admin listener: connects and cached lookups move with traffic.
func TestSocks5dMetrics(t *testing.T) {
	rs := redistest.Start(t)
	prefix := fmt.Sprintf("m%d:", clusterPrefixes.Add(1))
	reg := redisReg(t, rs, prefix)
	srv := startServer(t, reg, nil)
	echo := testutil.EchoTarget(t)
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil)
	waitRoute(t, reg, echo, "")

	cfg := socks.DaemonConfig{Config: socks.Config{Listen: "127.0.0.1:0"}, Admin: "127.0.0.1:0",
		Registry: config.Registry{Type: "redis", Redis: config.Redis{Addrs: []string{rs.Addr}, Prefix: prefix}}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	d, err := socks.NewDaemon(cfg, testutil.Logger(t))
	if err != nil {
		t.Fatal(err)
	}
	ready := make(chan net.Addr, 1)
	d.Bound = ready
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, context.Background()) }()
	t.Cleanup(func() { stop(); <-done })
	addr := <-ready

	for range 3 {
		c, rep := socksConnect(t, addr.String(), echo)
		if rep != 0 {
			t.Fatalf("socks reply %d", rep)
		}
		echoOnce(t, c, "metrics")
		c.Close()
	}
	testutil.Eventually(t, 5*time.Second, "socks5d counters after three CONNECTs", func() bool {
		m := scrape(t, d.AdminAddr())
		return m[`vpcreach_socks5d_socks_connects_total{result="ok"}`] == 3 &&
			m[`vpcreach_socks5d_route_lookups_total{result="miss"}`] >= 1 &&
			m[`vpcreach_socks5d_route_lookups_total{result="hit"}`] >= 1 &&
			m[`vpcreach_socks5d_socks_bytes_total{direction="to_target"}`] >= float64(3*len("metrics"))
	})
	if code, b := getStatus(t, d.AdminAddr(), "/readyz"); code != 200 {
		t.Fatalf("socks5d /readyz = %d %s", code, b)
	}
	if code, b := getStatus(t, d.AdminAddr(), "/healthz"); code != 200 || !strings.Contains(b, `"ok":true`) {
		t.Fatalf("socks5d /healthz = %d %s", code, b)
	}
}
