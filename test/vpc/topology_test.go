package vpc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vpcreach/vpcreach/internal/proctest"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// Addresses inside the namespaces (see the package comment).
const (
	centreIP   = "10.213.0.1"       // br0: haproxy's source, registry Redis, socks5d
	vip        = "10.213.0.100"     // haproxy's frontend
	vipAddr    = vip + ":7000"      // what the agent dials
	regRedis   = centreIP + ":6379" // the registry
	socksAddr  = centreIP + ":1080"
	vpcAIP     = "10.213.1.2"
	httpTarget = vpcAIP + ":8080" // the private HTTP service in vpc-a
	redisTgt   = vpcAIP + ":6379" // the private Redis in vpc-a
	vpcBIP     = "10.213.2.2"
	// Member ports, each on the member's own address.
	controlPort = 7000
	relayPort   = 7001
	apiPort     = 7070
)

// pagePrefix starts httptarget's page for httpTarget.
const pagePrefix = "hello from the private target " + httpTarget

// member is one proxyserver, alone in its namespace.
type member struct {
	id, ns, ip string
	cfg        string
	proc       *proctest.Proc
}

func (m *member) addr(port int) string { return fmt.Sprintf("%s:%d", m.ip, port) }

// vpc is the whole topology with its daemons running.
type vpc struct {
	t                *testing.T
	dir, token       string
	centre, nsA, nsB string
	members          []*member
	haproxy, socks5d *proctest.Proc
	regRedis         *proctest.Proc
	agent            *proctest.Proc
	reg              *registry.Redis // the test's reader of the routes, dialling into the centre
	proxychains      string          // proxychains4 config for the controller
}

// newVPC builds the namespaces and starts every daemon: the registry
// Redis, three members, haproxy, socks5d, and in vpc-a the HTTP target,
// the private Redis and the agent. It returns once the agent's routes to
// both targets are in the registry.
func newVPC(t *testing.T) *vpc {
	t.Helper()
	testutil.NeedRoot(t)
	for _, b := range []string{"ip", "nft", "haproxy", "redis-server", "redis-cli", "proxychains4", "curl"} {
		testutil.NeedBinary(t, b)
	}
	removeStaleNamespaces(t)
	stem := nsStem(t)
	v := &vpc{t: t, dir: t.TempDir(), token: randomHex(t, 16),
		centre: stem + "centre", nsA: stem + "vpca", nsB: stem + "vpcb"}
	for i := 1; i <= 3; i++ {
		v.members = append(v.members, &member{id: fmt.Sprintf("m%d", i), ns: fmt.Sprintf("%sm%d", stem, i),
			ip: fmt.Sprintf("10.213.0.%d", 10+i)})
	}
	v.network()
	v.startDaemons()
	return v
}

// network makes the namespaces and links them: members on a bridge in
// the centre, vpc-a and vpc-b on point-to-point veths to the centre,
// which does not forward between them.
func (v *vpc) network() {
	t := v.t
	addNamespace(t, v.centre)
	ipCmd(t, "-n", v.centre, "link", "add", "br0", "type", "bridge")
	ipCmd(t, "-n", v.centre, "addr", "add", centreIP+"/24", "dev", "br0")
	ipCmd(t, "-n", v.centre, "addr", "add", vip+"/32", "dev", "br0")
	ipCmd(t, "-n", v.centre, "link", "set", "br0", "up")
	for _, m := range v.members {
		addNamespace(t, m.ns)
		ipCmd(t, "-n", v.centre, "link", "add", m.id, "type", "veth", "peer", "name", "eth0", "netns", m.ns)
		ipCmd(t, "-n", v.centre, "link", "set", m.id, "master", "br0")
		ipCmd(t, "-n", v.centre, "link", "set", m.id, "up")
		ipCmd(t, "-n", m.ns, "addr", "add", m.ip+"/24", "dev", "eth0")
		ipCmd(t, "-n", m.ns, "link", "set", "eth0", "up")
	}
	for _, x := range []struct{ ns, link, net string }{{v.nsA, "vpca", "10.213.1"}, {v.nsB, "vpcb", "10.213.2"}} {
		addNamespace(t, x.ns)
		ipCmd(t, "-n", v.centre, "link", "add", x.link, "type", "veth", "peer", "name", "eth0", "netns", x.ns)
		ipCmd(t, "-n", v.centre, "addr", "add", x.net+".1/24", "dev", x.link)
		ipCmd(t, "-n", v.centre, "link", "set", x.link, "up")
		ipCmd(t, "-n", x.ns, "addr", "add", x.net+".2/24", "dev", "eth0")
		ipCmd(t, "-n", x.ns, "link", "set", "eth0", "up")
		ipCmd(t, "-n", x.ns, "route", "add", "default", "via", x.net+".1")
	}
	// The centre must not route between the VPCs. A new namespace may
	// inherit ip_forward=1 from the host (net.core.devconf_inherit_init_net),
	// so set it, check it, and drop forwarded packets explicitly too.
	mustRunIn(t, v.centre, "sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
	if got := strings.TrimSpace(mustRunIn(t, v.centre, "cat", "/proc/sys/net/ipv4/ip_forward")); got != "0" {
		t.Fatalf("centre ip_forward = %s, want 0", got)
	}
	mustRunIn(t, v.centre, "nft", "add", "table", "inet", "vpcrfw")
	mustRunIn(t, v.centre, "nft", "add", "chain", "inet", "vpcrfw", "forward",
		"{ type filter hook forward priority 0 ; policy drop ; }")
}

// startIn starts a daemon inside namespace ns; `ip netns exec` execs it,
// so the process is the daemon itself and a kill -9 reaches it.
func (v *vpc) startIn(ns, name, bin string, args ...string) *proctest.Proc {
	v.t.Helper()
	return proctest.Start(v.t, v.token, name, "ip", append([]string{"netns", "exec", ns, bin}, args...)...)
}

func (v *vpc) startDaemons() {
	t := v.t
	// The registry Redis in the centre and the private Redis in vpc-a.
	v.regRedis = v.startRedis(v.centre, "registry-redis", centreIP)
	v.startRedis(v.nsA, "vpc-a-redis", vpcAIP)
	target := v.startIn(v.nsA, "httptarget", filepath.Join(binDir, "httptarget"), "-listen", httpTarget)

	for _, m := range v.members {
		m.cfg = v.write(m.id+".yaml", fmt.Sprintf(`server_id: %s
control: %s
advertise: %s
relay_port: %d
api: %s
port_range: 21000-21099
proxy_protocol_from: [%s]
token: {env: VPCREACH_TOKEN}
registry:
  type: redis
  redis: {addrs: [%s]}
drain_grace: 10s
log: {level: debug}
`, m.id, m.addr(controlPort), m.ip, relayPort, m.addr(apiPort), centreIP, regRedis))
		m.proc = v.startIn(m.ns, m.id, filepath.Join(binDir, "proxyserver"), "-config", m.cfg)
	}
	for _, m := range v.members {
		waitListeningIn(t, m.proc, v.centre, m.addr(controlPort))
		waitListeningIn(t, m.proc, v.centre, m.addr(relayPort))
	}
	v.startHAProxy()
	// socks5d keeps the default relay_dial_timeout (2 s): the host-lost
	// test asserts against it.
	scfg := v.write("socks5d.yaml", fmt.Sprintf(`listen: %s
registry:
  type: redis
  redis: {addrs: [%s]}
log: {level: debug}
`, socksAddr, regRedis))
	v.socks5d = v.startIn(v.centre, "socks5d", filepath.Join(binDir, "socks5d"), "-config", scfg)
	waitListeningIn(t, v.socks5d, v.centre, socksAddr)
	waitListeningIn(t, target, v.nsA, httpTarget)

	acfg := v.write("agent.yaml", fmt.Sprintf(`agent_id: vpc-a
servers: [%s]
token: {env: VPCREACH_TOKEN}
targets:
  - addr: %s
  - addr: %s
drain_grace: 10s
log: {level: debug}
`, vipAddr, httpTarget, redisTgt))
	v.agent = v.startIn(v.nsA, "agent", filepath.Join(binDir, "agent"), "-config", acfg)

	v.proxychains = v.write("proxychains.conf", fmt.Sprintf(`# the controller's proxychains4: everything through socks5d
strict_chain
quiet_mode
tcp_read_time_out 8000
tcp_connect_time_out 2000
[ProxyList]
socks5 %s %s
`, centreIP, strings.TrimPrefix(socksAddr, centreIP+":")))

	// The test's own reader of the registry, dialling into the centre.
	rc := redis.NewClient(&redis.Options{Addr: regRedis,
		Dialer: func(ctx context.Context, _, addr string) (net.Conn, error) {
			return dialIn(ctx, v.centre, addr)
		},
		DialTimeout: time.Second, ReadTimeout: time.Second, WriteTimeout: time.Second})
	t.Cleanup(func() { rc.Close() })
	reg, err := registry.NewRedisClient(rc, "")
	if err != nil {
		t.Fatal(err)
	}
	v.reg = reg
	for _, target := range []string{httpTarget, redisTgt} {
		v.waitRoute(target, 15*time.Second, "the agent's route to "+target+" registered through the VIP",
			func(registry.Route) bool { return true })
	}
}

// startRedis runs a redis-server bound to ip:6379 inside ns, without
// persistence, and waits until it answers PING.
func (v *vpc) startRedis(ns, name, ip string) *proctest.Proc {
	v.t.Helper()
	dir := filepath.Join(v.dir, name)
	if err := os.Mkdir(dir, 0o700); err != nil {
		v.t.Fatal(err)
	}
	p := v.startIn(ns, name, testutil.NeedBinary(v.t, "redis-server"),
		"--bind", ip, "--port", "6379", "--protected-mode", "no", "--dir", dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "")
	testutil.Eventually(v.t, 10*time.Second, name+" answers PING", func() bool {
		if p.Exited() {
			v.t.Fatalf("%s exited:\n%s", name, p.Log)
		}
		return pingIn(ns, ip+":6379")
	})
	return p
}

// pingIn sends a Redis PING from inside ns.
func pingIn(ns, addr string) bool {
	c, err := dialInTimeout(ns, addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return false
	}
	buf := make([]byte, 16)
	n, _ := c.Read(buf)
	return strings.HasPrefix(string(buf[:n]), "+PONG")
}

// startHAProxy renders configs/haproxy/haproxy.cfg for this topology, as
// test/cluster does: the VIP as the bind address, the three members
// between the BEGIN and END markers, connecting from the centre's
// address (the members' proxy_protocol_from).
func (v *vpc) startHAProxy() {
	t := v.t
	t.Helper()
	var servers []proctest.HAProxyServer
	for _, m := range v.members {
		servers = append(servers, proctest.HAProxyServer{Name: m.id, Addr: m.addr(controlPort)})
	}
	cfg := proctest.HAProxyConfig(t, vipAddr, centreIP, servers)
	path := v.write("haproxy.cfg", cfg)
	v.haproxy = v.startIn(v.centre, "haproxy", testutil.NeedBinary(t, "haproxy"), "-db", "-f", path)
	waitListeningIn(t, v.haproxy, v.centre, vipAddr)
}

func (v *vpc) write(name, content string) string {
	p := filepath.Join(v.dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		v.t.Fatal(err)
	}
	return p
}

func randomHex(t *testing.T, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// route looks target's route up in the registry.
func (v *vpc) route(target string) (registry.Route, error) {
	k, err := registry.ParseKey(target)
	if err != nil {
		v.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	return v.reg.Lookup(ctx, k)
}

// waitRoute waits until target has a route that ok accepts.
func (v *vpc) waitRoute(target string, timeout time.Duration, what string, ok func(registry.Route) bool) registry.Route {
	v.t.Helper()
	var r registry.Route
	testutil.Eventually(v.t, timeout, what, func() bool {
		var err error
		r, err = v.route(target)
		return err == nil && ok(r)
	})
	return r
}

func (v *vpc) member(id string) *member {
	for _, m := range v.members {
		if m.id == id {
			return m
		}
	}
	v.t.Fatalf("no member %q", id)
	return nil
}

// agentsOn lists a member's agent sessions through its API, from the
// centre.
func (v *vpc) agentsOn(m *member) ([]string, error) {
	c := http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) { return dialIn(ctx, v.centre, addr) },
	}}
	defer c.CloseIdleConnections()
	resp, err := c.Get("http://" + m.addr(apiPort) + "/v1/agents")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out []struct {
		Agent string `json:"agent"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		return nil, err
	}
	var ids []string
	for _, a := range out {
		ids = append(ids, a.Agent)
	}
	return ids, nil
}

// curlViaSocks fetches the HTTP target from vpc-b through socks5d, the
// way the controller does.
func (v *vpc) curlViaSocks(timeout time.Duration) cmdResult {
	v.t.Helper()
	return runIn(v.t, v.nsB, timeout+time.Second, "curl", "-sS", "--max-time", seconds(timeout),
		"--socks5-hostname", socksAddr, "http://"+httpTarget+"/")
}

func seconds(d time.Duration) string { return fmt.Sprintf("%g", d.Seconds()) }

// outcome classifies one redis-cli command through proxychains4 and
// socks5d.
type outcome int

const (
	ok           outcome = iota
	connectFail          // the connect through socks5d failed: nothing was sent, safe to retry
	afterConnect         // failed after the connect succeeded: the command may or may not have run
)

// redisViaSocks runs `proxychains4 -q -f conf redis-cli -h <vpc-a redis>
// args...` in vpc-b, the controller's way to the private Redis.
// proxychains4 makes a failed chain (socks5d failing the CONNECT, or
// socks5d unreachable) a failed connect() (ECONNREFUSED), so redis-cli
// prints "Could not connect to Redis" and sends nothing; any other
// failure happened on an open connection. A command that outlives
// timeout is a hang: the error says so.
func (v *vpc) redisViaSocks(timeout time.Duration, args ...string) (outcome, cmdResult, error) {
	r, err := execIn(v.nsB, timeout, append([]string{"proxychains4", "-q", "-f", v.proxychains,
		"redis-cli", "-h", vpcAIP, "-p", "6379"}, args...)...)
	switch {
	case err != nil:
		return afterConnect, r, err
	case r.timedOut:
		return afterConnect, r, fmt.Errorf("redis-cli %s through socks5d hung: %v", strings.Join(args, " "), r)
	case r.code == 0 && !strings.HasPrefix(strings.TrimSpace(r.stdout), "ERR"):
		return ok, r, nil
	case strings.Contains(r.stdout+r.stderr, "Could not connect to Redis"):
		return connectFail, r, nil
	default:
		return afterConnect, r, nil
	}
}

// incr is `INCR visits` through socks5d; on success it returns the value.
func (v *vpc) incr() (outcome, int64, cmdResult) {
	v.t.Helper()
	res, r, err := v.redisViaSocks(15*time.Second, "INCR", "visits")
	if err != nil {
		v.t.Fatal(err)
	}
	var n int64
	if res == ok {
		if _, err := fmt.Sscanf(strings.TrimSpace(r.stdout), "%d", &n); err != nil {
			v.t.Fatalf("INCR answered %v", r)
		}
	}
	return res, n, r
}
