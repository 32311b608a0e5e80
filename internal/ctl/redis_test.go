package ctl

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vpcreach/vpcreach/internal/redistest"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// A member on a real redis-server, no admin listener: vpcreachctl reads
// Redis directly (-redis, and -config of a socks5d file).
func TestRedisSource(t *testing.T) {
	rs := redistest.Start(t)
	reg, err := registry.NewRedis(registry.RedisOptions{Addrs: []string{rs.Addr}, Prefix: "ctltest:"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	srv := startServer(t, reg, true)
	echo := testutil.EchoTarget(t)
	a := startAgent(t, srv, echo)
	route := waitRoute(t, reg, echo)

	src := []string{"-redis", rs.Addr, "-redis-prefix", "ctltest:"}
	r := run(t, append(src, "routes")...)
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	mustContain(t, "routes", r.stdout, echo+"  ->  "+route.Proxy.String(), route.Relay.String(), a.id,
		route.Server, route.Session[:8])

	r = run(t, append(src, "-o", "json", "lookup", echo)...)
	var got routeJSON
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil || r.code != 0 {
		t.Fatalf("exit %d, %v", r.code, err)
	}
	if got.Proxy != route.Proxy.String() || got.Session != route.Session {
		t.Errorf("lookup %+v, want %+v", got, route)
	}

	// Agents derived from the routes, and said so.
	r = run(t, append(src, "agents")...)
	if r.code != 0 {
		t.Fatalf("exit %d", r.code)
	}
	mustContain(t, "agents", r.stdout, a.id, route.Server, route.Session[:8])
	mustContain(t, "stderr", r.stderr, "derived from the 1 routes in redis")
	r = run(t, append(src, "-o", "json", "agents")...)
	var as []agentJSON
	if err := json.Unmarshal([]byte(r.stdout), &as); err != nil {
		t.Fatal(err)
	}
	if len(as) != 1 || !as[0].Derived || as[0].Agent != a.id || as[0].Server != route.Server || len(as[0].Routes) != 1 {
		t.Errorf("derived agents %+v", as)
	}

	if r = run(t, append(src, "explain", echo)...); r.code != 0 {
		t.Errorf("explain through redis: exit %d", r.code)
	}

	// Another prefix holds nothing.
	r = run(t, "-redis", rs.Addr, "routes")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "" || !strings.Contains(r.stderr, "no routes in redis") {
		t.Errorf("default prefix: exit %d, %q, %q", r.code, r.stdout, r.stderr)
	}

	// A socks5d config file naming this Redis.
	p := filepath.Join(t.TempDir(), "socks5d.yaml")
	body := "listen: 127.0.0.1:1080\nregistry:\n  type: redis\n  redis:\n    addrs: [" + rs.Addr + "]\n    prefix: \"ctltest:\"\n"
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	r = run(t, "-config", p, "routes")
	if r.code != 0 {
		t.Fatalf("-config: exit %d", r.code)
	}
	mustContain(t, "routes", r.stdout, echo+"  ->  "+route.Proxy.String())
}
