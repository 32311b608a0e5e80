package ctl

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/cli"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

func TestRoutes(t *testing.T) {
	f := newFixture(t)
	r := run(t, "-api", f.api, "routes")
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	// The four-tuple, and who owns it.
	mustContain(t, "routes", r.stdout, "TARGET", "PROXY", "RELAY", "AGENT", "SERVER", "SESSION", "GENERATION", "AGE",
		f.echo+"  ->  "+f.route.Proxy.String(), f.route.Relay.String(), f.agent.id, f.route.Server,
		f.route.Session[:8], strconv.FormatUint(f.route.Generation, 10), f.refused)
	if strings.Contains(r.stdout, f.route.Session) {
		t.Errorf("session not shortened:\n%s", r.stdout)
	}
	if n := strings.Count(strings.TrimSpace(r.stdout), "\n"); n != 2 {
		t.Errorf("want a header and 2 routes, got %d lines", n+1)
	}

	// -o json, flags after the command.
	r = run(t, "routes", "-o", "json", "-api", f.api)
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	var raw []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &raw); err != nil {
		t.Fatal(err)
	}
	if len(raw) != 2 {
		t.Fatalf("want 2 routes, got %d", len(raw))
	}
	for _, k := range []string{"key", "network", "target", "proxy", "relay", "agent", "identity", "server",
		"session", "generation", "registered", "age_seconds"} {
		if _, ok := raw[0][k]; !ok {
			t.Errorf("json route has no %q: %v", k, raw[0])
		}
	}
	var rs []routeJSON
	if err := json.Unmarshal([]byte(r.stdout), &rs); err != nil {
		t.Fatal(err)
	}
	var got *routeJSON
	for i := range rs {
		if rs[i].Target == f.echo {
			got = &rs[i]
		}
	}
	if got == nil || got.Proxy != f.route.Proxy.String() || got.Session != f.route.Session ||
		got.Generation != f.route.Generation || got.Agent != f.agent.id || got.Key != f.echo {
		t.Errorf("json route %+v does not match %+v", got, f.route)
	}
}

func TestLookup(t *testing.T) {
	f := newFixture(t)
	r := run(t, "-api", f.api, "lookup", f.echo)
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	mustContain(t, "lookup", r.stdout, "proxy:", f.route.Proxy.String(), "relay:", f.route.Relay.String(),
		"session:", f.route.Session, "agent:", f.agent.id, "server:", f.route.Server)

	r = run(t, "-api", f.api, "-o", "json", "lookup", f.echo)
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	var got routeJSON
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
		t.Fatal(err)
	}
	if got.Proxy != f.route.Proxy.String() || got.Relay != f.route.Relay.String() || got.Target != f.echo ||
		got.Generation != f.route.Generation || got.Registered.IsZero() {
		t.Errorf("lookup json %+v does not match %+v", got, f.route)
	}

	// Nobody exposes it (also in another network): exit 1, and why.
	for _, target := range []string{"127.0.0.1:1", "vpc-b/" + f.echo} {
		r = run(t, "-api", f.api, "lookup", target)
		if r.code != 1 {
			t.Errorf("lookup %s: exit %d, want 1", target, r.code)
		}
		mustContain(t, "stderr", r.stderr, "no route for "+target, hintNoRoute)
	}
}

func TestAgents(t *testing.T) {
	f := newFixture(t)
	r := run(t, "-api", f.api, "agents")
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	mustContain(t, "agents", r.stdout, "AGENT", "SESSION", "REMOTE", "STREAMS", f.agent.id,
		f.route.Session[:8], f.route.Server, "127.0.0.1:")

	r = run(t, "-api", f.api, "-o", "json", "agents")
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	var as []agentJSON
	if err := json.Unmarshal([]byte(r.stdout), &as); err != nil {
		t.Fatal(err)
	}
	if len(as) != 1 {
		t.Fatalf("want 1 agent session, got %+v", as)
	}
	a := as[0]
	if a.Agent != f.agent.id || a.Session != f.route.Session || a.Server != f.route.Server || a.Derived ||
		len(a.Routes) != 2 || a.Remote == "" || a.Version == 0 || a.Started.IsZero() {
		t.Errorf("agent %+v", a)
	}
	mustContain(t, "agent routes", strings.Join(a.Routes, "\n"), f.echo+" -> "+f.route.Proxy.String())
}

func TestExplainOK(t *testing.T) {
	f := newFixture(t)
	r := run(t, "-api", f.api, "explain", f.echo)
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	for n := 1; n <= 4; n++ {
		if got := stepResult(t, r.stdout, n); got != "ok" {
			t.Errorf("step %d: %s", n, got)
		}
	}
	mustContain(t, "explain", r.stdout, "path ok", f.route.Proxy.String(), "the agent dialled the target")

	r = run(t, "-api", f.api, "-o", "json", "explain", f.echo)
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	var e explainJSON
	if err := json.Unmarshal([]byte(r.stdout), &e); err != nil {
		t.Fatal(err)
	}
	if !e.OK || e.FailedStep != 0 || e.Route == nil || e.Route.Proxy != f.route.Proxy.String() || len(e.Steps) != 4 {
		t.Fatalf("explain json %+v", e)
	}
	for _, s := range e.Steps {
		if s.Result != resultOK || s.Hint != "" {
			t.Errorf("step %+v", s)
		}
	}
}

func TestExplainNoRoute(t *testing.T) {
	f := newFixture(t)
	r := run(t, "-api", f.api, "explain", "127.0.0.1:1")
	if r.code != 1 {
		t.Fatalf("exit %d, want 1", r.code)
	}
	if got := stepResult(t, r.stdout, 1); got != "FAIL" {
		t.Errorf("step 1: %s", got)
	}
	for n := 2; n <= 4; n++ {
		if got := stepResult(t, r.stdout, n); got != "-" {
			t.Errorf("step %d ran after a failed step 1: %s", n, got)
		}
	}
	mustContain(t, "explain", r.stdout, "no route for 127.0.0.1:1", hintNoRoute, "path fails at step 1 (route)")

	r = run(t, "-api", f.api, "-o", "json", "explain", "127.0.0.1:1")
	var e explainJSON
	if err := json.Unmarshal([]byte(r.stdout), &e); err != nil {
		t.Fatal(err)
	}
	if r.code != 1 || e.OK || e.FailedStep != 1 || e.Route != nil || e.Steps[0].Hint != hintNoRoute ||
		e.Steps[1].Result != resultSkipped {
		t.Errorf("exit %d, %+v", r.code, e)
	}
}

func TestExplainRefused(t *testing.T) {
	f := newFixture(t)
	r := run(t, "-api", f.api, "explain", f.refused)
	if r.code != 1 {
		t.Fatalf("exit %d, want 1", r.code)
	}
	for n := 1; n <= 3; n++ {
		if got := stepResult(t, r.stdout, n); got != "ok" {
			t.Errorf("step %d: %s", n, got)
		}
	}
	if got := stepResult(t, r.stdout, 4); got != "FAIL" {
		t.Errorf("step 4: %s", got)
	}
	mustContain(t, "step 4", stepLine(t, r.stdout, 4), "refused")
	mustContain(t, "explain", r.stdout, "hint: start the service", "path fails at step 4")
}

// A record that names a live member which serves no such route (a stale
// record: the session that wrote it is gone): steps 2 and 3 pass, the
// member's answer to the relay preamble fails step 4.
func TestExplainStaleRecord(t *testing.T) {
	f := newFixture(t)
	ghost := registry.Route{
		Key:   registry.Key{Addr: netip.MustParseAddrPort("127.0.0.1:" + strconv.Itoa(testutil.FreePort(t)))},
		Proxy: f.route.Proxy, Relay: f.route.Relay, Agent: "ghost", Identity: "ghost", Server: f.route.Server,
		Session: "ghost-session-0001", Generation: 1, Registered: time.Now().Add(-time.Minute)}
	if err := f.reg.Register(context.Background(), ghost, time.Minute); err != nil {
		t.Fatal(err)
	}
	r := run(t, "-api", f.api, "explain", ghost.Key.String())
	if r.code != 1 {
		t.Fatalf("exit %d, want 1", r.code)
	}
	if got := stepResult(t, r.stdout, 3); got != "ok" {
		t.Errorf("step 3: %s", got)
	}
	if got := stepResult(t, r.stdout, 4); got != "FAIL" {
		t.Errorf("step 4: %s", got)
	}
	mustContain(t, "step 4", stepLine(t, r.stdout, 4), "no longer owns this route", "stale registry record")
}

// The agent stops: its routes are withdrawn, so the path fails at the
// route.
func TestExplainAgentStopped(t *testing.T) {
	f := newFixture(t)
	f.agent.Stop()
	k, _ := registry.ParseKey(f.echo)
	testutil.Eventually(t, 5*time.Second, "route withdrawn", func() bool {
		_, err := f.reg.Lookup(context.Background(), k)
		return err != nil
	})
	r := run(t, "-api", f.api, "explain", f.echo)
	if r.code != 1 {
		t.Fatalf("exit %d, want 1", r.code)
	}
	if got := stepResult(t, r.stdout, 1); got != "FAIL" {
		t.Errorf("step 1: %s", got)
	}
	mustContain(t, "explain", r.stdout, hintNoRoute)
	testutil.Eventually(t, 5*time.Second, "session gone from the member", func() bool { return len(f.srv.Agents()) == 0 })
	if r = run(t, "-api", f.api, "agents"); r.code != 0 || strings.Contains(r.stdout, f.agent.id) {
		t.Errorf("agents after the agent stopped: exit %d\n%s", r.code, r.stdout)
	}
}

// The member holding the tunnel dies and leaves its record behind (what
// kill -9 does until the lease expires). Read through another member's
// admin API over the same registry, the path fails at step 2.
func TestExplainMemberDown(t *testing.T) {
	reg := registry.NewMemory(nil)
	t.Cleanup(func() { reg.Close() })
	holder := startServer(t, reg, true)
	reader := startServer(t, reg, false)
	echo := testutil.EchoTarget(t)
	startAgent(t, holder, echo)
	route := waitRoute(t, reg, echo)

	r := run(t, "-api", apiURLOf(reader), "explain", echo)
	if r.code != 0 {
		t.Fatalf("explain before the member died: exit %d", r.code)
	}

	holder.Close()
	// Close ends the tunnel, which deregisters the route; a killed process
	// would not: put the record back as it would have stayed.
	testutil.Eventually(t, 5*time.Second, "route gone with the member", func() bool {
		_, err := reg.Lookup(context.Background(), route.Key)
		return err != nil
	})
	if err := reg.Register(context.Background(), route, time.Minute); err != nil {
		t.Fatal(err)
	}
	r = run(t, "-api", apiURLOf(reader), "explain", echo)
	if r.code != 1 {
		t.Fatalf("exit %d, want 1", r.code)
	}
	if got := stepResult(t, r.stdout, 1); got != "ok" {
		t.Errorf("step 1: %s", got)
	}
	if got := stepResult(t, r.stdout, 2); got != "FAIL" {
		t.Errorf("step 2: %s", got)
	}
	mustContain(t, "step 2", stepLine(t, r.stdout, 2), "cannot connect to relay port "+route.Relay.String())
	mustContain(t, "explain", r.stdout, "hint: the member is down", "path fails at step 2 (member alive)")
}

// The admin listener itself is gone: step 1 cannot read routes.
func TestExplainSourceDown(t *testing.T) {
	f := newFixture(t)
	f.srv.Close()
	r := run(t, "-api", f.api, "explain", f.echo)
	if r.code != 1 {
		t.Fatalf("exit %d, want 1", r.code)
	}
	mustContain(t, "step 1", stepLine(t, r.stdout, 1), "FAIL", "cannot read routes from api "+f.api)
	if r = run(t, "-api", f.api, "routes"); r.code != 1 || !strings.Contains(r.stderr, "list routes from api") {
		t.Errorf("routes with the source down: exit %d, stderr %q", r.code, r.stderr)
	}
}

// -config: a proxyserver file's admin listener, a socks5d file's
// lookup_api.
func TestConfigSource(t *testing.T) {
	f := newFixture(t)
	dir := t.TempDir()
	_, port, _ := strings.Cut(f.srv.APIAddr().String(), ":")
	files := map[string]string{
		"proxyserver.yaml": "server_id: x\ncontrol: 0.0.0.0:7000\nadvertise: 10.0.0.2\nadmin: 0.0.0.0:" + port +
			"\nregistry: {type: memory}\ntoken: {file: /nonexistent}\n",
		"socks5d.yaml": "listen: 127.0.0.1:1080\nlookup_api: " + f.api + "\n",
	}
	for name, body := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		r := run(t, "-config", p, "routes")
		if r.code != 0 {
			t.Fatalf("%s: exit %d", name, r.code)
		}
		mustContain(t, name, r.stdout, f.echo+"  ->  "+f.route.Proxy.String())
	}
	p := filepath.Join(dir, "agent.yaml")
	if err := os.WriteFile(p, []byte("agent_id: a\nservers: [10.0.0.1:7000]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if r := run(t, "-config", p, "routes"); r.code != 1 || !strings.Contains(r.stderr, "nothing to read") {
		t.Errorf("agent config: exit %d, stderr %q", r.code, r.stderr)
	}
}

func TestUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "usage: vpcreachctl"},
		{[]string{"-api", "http://127.0.0.1:1"}, "usage: vpcreachctl"},
		{[]string{"-api", "http://127.0.0.1:1", "frobnicate"}, "unknown command"},
		{[]string{"-api", "http://127.0.0.1:1", "lookup"}, "needs one TARGET"},
		{[]string{"-api", "http://127.0.0.1:1", "explain", "a", "b"}, "needs one TARGET"},
		{[]string{"-api", "http://127.0.0.1:1", "lookup", "example.com:80"}, "want ip:port"},
		{[]string{"-api", "http://127.0.0.1:1", "routes", "extra"}, "takes no arguments"},
		{[]string{"-api", "http://127.0.0.1:1", "-o", "yaml", "routes"}, "want table or json"},
		{[]string{"-api", "ftp://127.0.0.1:1", "routes"}, "want a URL"},
		{[]string{"routes"}, "no source"},
		{[]string{"-redis-master", "m", "routes"}, "need -redis"},
		{[]string{"-redis", "127.0.0.1:1,127.0.0.1:2", "routes"}, "several addresses"},
		{[]string{"-redis", "127.0.0.1", "routes"}, "missing port"},
		{[]string{"-redis", "127.0.0.1:1", "-redis-prefix", "a b", "routes"}, "prefix"},
		{[]string{"-nosuchflag", "routes"}, "flag provided but not defined"},
	} {
		r := run(t, tc.args...)
		if r.code != 2 {
			t.Errorf("%q: exit %d, want 2", tc.args, r.code)
		}
		mustContain(t, "stderr", r.stderr, tc.want)
	}
	r := run(t, "-version")
	if r.code != 0 || r.stdout != "vpcreachctl "+cli.Version+"\n" {
		t.Errorf("-version: exit %d, %q", r.code, r.stdout)
	}
}

func TestAge(t *testing.T) {
	now := time.Date(2025, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct {
		d    time.Duration
		want string
	}{
		{0, "0s"}, {42 * time.Second, "42s"}, {185 * time.Second, "3m05s"},
		{2*time.Hour + 7*time.Minute, "2h07m"}, {4*24*time.Hour + 3*time.Hour, "4d03h"}, {-time.Second, "0s"},
	} {
		if got := age(now, now.Add(-tc.d)); got != tc.want {
			t.Errorf("age(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
	if got := age(now, time.Time{}); got != "-" {
		t.Errorf("age(zero) = %q", got)
	}
}

func TestAdminURL(t *testing.T) {
	for in, want := range map[string]string{
		"0.0.0.0:7070":   "http://127.0.0.1:7070",
		":7070":          "http://127.0.0.1:7070",
		"[::]:7070":      "http://[::1]:7070",
		"10.0.0.2:7070":  "http://10.0.0.2:7070",
		"[fd00::2]:7070": "http://[fd00::2]:7070",
	} {
		if got := adminURL(in); got != want {
			t.Errorf("adminURL(%q) = %q, want %q", in, got, want)
		}
	}
	for in, want := range map[string]string{
		"127.0.0.1:7070":          "http://127.0.0.1:7070",
		"http://127.0.0.1:7070/":  "http://127.0.0.1:7070",
		"https://admin.example:1": "https://admin.example:1",
	} {
		if got, err := apiURL(in); err != nil || got != want {
			t.Errorf("apiURL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}

func TestDeriveAgents(t *testing.T) {
	mk := func(target, agent, session, srv string, gen uint64) registry.Route {
		return registry.Route{Key: registry.Key{Addr: netip.MustParseAddrPort(target)}, Agent: agent,
			Session: session, Server: srv, Generation: gen, Proxy: netip.MustParseAddrPort("10.0.0.2:20000")}
	}
	as := deriveAgents([]registry.Route{
		mk("10.1.0.6:80", "b", "s2", "m1", 2),
		mk("10.1.0.5:80", "a", "s1", "m1", 1),
		mk("10.1.0.5:81", "a", "s1", "m1", 1),
		mk("10.1.0.7:80", "a", "s3", "m2", 3), // the same agent on another member (a move)
	})
	if len(as) != 3 {
		t.Fatalf("want 3 sessions, got %+v", as)
	}
	if as[0].Agent != "a" || as[0].Session != "s1" || len(as[0].Routes) != 2 || !as[0].Derived ||
		as[0].Routes[0] != "10.1.0.5:80 -> 10.0.0.2:20000" || !as[0].Started.Equal(time.Unix(0, 1)) {
		t.Errorf("first: %+v", as[0])
	}
	if as[1].Session != "s3" || as[2].Agent != "b" {
		t.Errorf("order: %+v", as)
	}
}
