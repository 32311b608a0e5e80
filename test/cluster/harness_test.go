// Package cluster tests a real vpcreach cluster as processes: three
// proxyserver members sharing a redis-server, haproxy as the VIP in TCP
// mode with send-proxy-v2 (rendered from configs/haproxy/haproxy.cfg), an
// agent dialling the VIP, and socks5d reading routes from Redis. Each
// fault test builds its own cluster on loopback addresses of its own
// (127.0.<n>.1-3 for the members; proxy ports 21000-21099 on each,
// below the ephemeral range that free ports come from) and asserts its bound; the daemons are
// built without -race, so the bounds hold under `go test -race` too.
package cluster

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/proctest"
	"github.com/vpcreach/vpcreach/internal/redistest"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

const pageText = "hello from the private target in vpc-a"

// Cluster timing used by every test: the documented defaults (lease 15 s,
// renewal every 5 s, agent backoff first retry <= 250 ms).
const (
	lease         = 15 * time.Second
	renewInterval = lease / 3
)

var (
	// binDir holds the daemons, built once by TestMain (without -race).
	binDir string
	// octets gives each cluster its own 127.0.<n>.0/24 for the members.
	octets atomic.Int32
)

func TestMain(m *testing.M) { os.Exit(proctest.RunWithBinaries(m, &binDir)) }

// member is one proxyserver process.
type member struct {
	id                  string
	ip                  netip.Addr
	control, relay, api int
	cfg                 string
	proc                *proctest.Proc
}

func (m *member) controlAddr() string { return netip.AddrPortFrom(m.ip, uint16(m.control)).String() }
func (m *member) relayAddr() string   { return netip.AddrPortFrom(m.ip, uint16(m.relay)).String() }

type cluster struct {
	t        testing.TB
	bin, dir string
	token    string
	redis    *redistest.Server
	reg      *registry.Redis // the test's own reader of the routes
	target   string          // the private HTTP service the agent exposes
	members  []*member
	vip      string
	haproxy  *proctest.Proc
	socks    string
	socks5d  *proctest.Proc
	agents   []*proctest.Proc
}

// newCluster starts Redis, the target, three members, haproxy and socks5d
// (the agent is started by the test with startAgent).
func newCluster(t testing.TB) *cluster {
	t.Helper()
	testutil.NeedBinary(t, "haproxy")
	c := &cluster{t: t, bin: binDir, dir: t.TempDir(), token: randomToken(t)}
	c.redis = redistest.Start(t)
	reg, err := registry.NewRedis(registry.RedisOptions{Addrs: []string{c.redis.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { reg.Close() })
	c.reg = reg
	c.target = startTarget(t)
	n := 10 + octets.Add(1)
	for i := 1; i <= 3; i++ {
		m := &member{id: fmt.Sprintf("m%d", i), ip: netip.AddrFrom4([4]byte{127, 0, byte(n), byte(i)}),
			control: testutil.FreePort(t), relay: testutil.FreePort(t), api: testutil.FreePort(t)}
		m.cfg = c.write(m.id+".yaml", fmt.Sprintf(`server_id: %s
control: %s
advertise: %s
relay_port: %d
api: %s
port_range: 21000-21099
proxy_protocol_from: [127.0.0.1]
token: {env: VPCREACH_TOKEN}
registry:
  type: redis
  redis: {addrs: [%s]}
drain_grace: 10s
log: {level: debug}
`, m.id, m.controlAddr(), m.ip, m.relay, netip.AddrPortFrom(m.ip, uint16(m.api)), c.redis.Addr))
		c.members = append(c.members, m)
		c.startMember(m)
	}
	c.startHAProxy()
	c.socks, c.socks5d = c.startSocks("socks5d")
	return c
}

func (c *cluster) write(name, content string) string {
	p := filepath.Join(c.dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		c.t.Fatal(err)
	}
	return p
}

// startSocks starts a socks5d reading routes from the cluster's Redis and
// returns its address.
func (c *cluster) startSocks(name string) (string, *proctest.Proc) {
	c.t.Helper()
	addr := "127.0.0.1:" + strconv.Itoa(testutil.FreePort(c.t))
	cfg := c.write(name+".yaml", fmt.Sprintf(`listen: %s
registry:
  type: redis
  redis: {addrs: [%s]}
log: {level: debug}
`, addr, c.redis.Addr))
	p := proctest.Start(c.t, c.token, name, filepath.Join(c.bin, "socks5d"), "-config", cfg)
	waitListening(c.t, p, addr)
	return addr, p
}

// startMember (re)starts a member's process and waits for its listeners.
func (c *cluster) startMember(m *member) {
	c.t.Helper()
	m.proc = proctest.Start(c.t, c.token, m.id, filepath.Join(c.bin, "proxyserver"), "-config", m.cfg)
	waitListening(c.t, m.proc, m.controlAddr())
	waitListening(c.t, m.proc, m.relayAddr())
}

// startHAProxy renders configs/haproxy/haproxy.cfg for this cluster: the
// VIP on a free loopback port, the members between the BEGIN and END
// markers, health checks from 127.0.0.1 (the members' trusted balancer).
func (c *cluster) startHAProxy() {
	t := c.t
	t.Helper()
	c.vip = "127.0.0.1:" + strconv.Itoa(testutil.FreePort(t))
	var servers []proctest.HAProxyServer
	for _, m := range c.members {
		servers = append(servers, proctest.HAProxyServer{Name: m.id, Addr: m.controlAddr()})
	}
	cfg := proctest.HAProxyConfig(t, c.vip, "127.0.0.1", servers)
	path := c.write("haproxy.cfg", cfg)
	c.haproxy = proctest.Start(t, c.token, "haproxy", testutil.NeedBinary(t, "haproxy"), "-db", "-f", path)
	waitListening(t, c.haproxy, c.vip)
}

// startAgent starts an agent process dialling the VIP and exposing the
// target, with the given agent id.
func (c *cluster) startAgent(id string) *proctest.Proc {
	c.t.Helper()
	cfg := c.write("agent-"+id+".yaml", fmt.Sprintf(`agent_id: %s
servers: [%s]
token: {env: VPCREACH_TOKEN}
targets:
  - addr: %s
drain_grace: 10s
log: {level: debug}
`, id, c.vip, c.target))
	p := proctest.Start(c.t, c.token, "agent-"+id, filepath.Join(c.bin, "agent"), "-config", cfg)
	c.agents = append(c.agents, p)
	return p
}

func (c *cluster) key() registry.Key {
	k, err := registry.ParseKey(c.target)
	if err != nil {
		c.t.Fatal(err)
	}
	return k
}

// route returns the target's route in Redis.
func (c *cluster) route() (registry.Route, error) {
	return c.reg.Lookup(c.t.Context(), c.key())
}

// waitRoute waits until the target has a route that ok accepts.
func (c *cluster) waitRoute(timeout time.Duration, what string, ok func(registry.Route) bool) registry.Route {
	c.t.Helper()
	var r registry.Route
	testutil.Eventually(c.t, timeout, what, func() bool {
		var err error
		r, err = c.route()
		return err == nil && ok(r)
	})
	return r
}

func (c *cluster) member(id string) *member {
	for _, m := range c.members {
		if m.id == id {
			return m
		}
	}
	c.t.Fatalf("no member %q", id)
	return nil
}

// outcome of one request through socks5d.
type outcome int

const (
	ok          outcome = iota
	connectFail         // the SOCKS5 CONNECT failed: safe to retry
	broken              // failed after the CONNECT succeeded: a lost request
)

// get fetches the page through socks5d with a SOCKS5 CONNECT to the
// target's own address, the way an application configured with a SOCKS5
// proxy does.
func (c *cluster) get() (outcome, error) {
	conn, err := net.DialTimeout("tcp", c.socks, 2*time.Second)
	if err != nil {
		return connectFail, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	ap := netip.MustParseAddrPort(c.target)
	a4 := ap.Addr().As4()
	req := append([]byte{5, 1, 0, 5, 1, 0, 1}, a4[:]...)
	req = binary.BigEndian.AppendUint16(req, ap.Port())
	if _, err := conn.Write(req); err != nil {
		return connectFail, err
	}
	var rep [2 + 10]byte
	if _, err := io.ReadFull(conn, rep[:]); err != nil {
		return connectFail, fmt.Errorf("socks5 reply: %w", err)
	}
	if rep[0] != 5 || rep[1] != 0 || rep[3] != 0 {
		return connectFail, fmt.Errorf("socks5 reply code %d", rep[3])
	}
	if _, err := io.WriteString(conn, "GET / HTTP/1.0\r\nHost: target\r\n\r\n"); err != nil {
		return broken, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return broken, err
	}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return broken, err
	}
	if !strings.Contains(string(body), pageText) {
		return broken, fmt.Errorf("unexpected body %q", body)
	}
	return ok, nil
}

// startTarget serves the private HTTP service: "/" answers pageText,
// "/stream" sends a line every 10 ms for as long as the client reads.
func startTarget(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, pageText+"\n") })
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		f := w.(http.Flusher)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			if _, err := fmt.Fprintf(w, "line %d\n", i); err != nil {
				return
			}
			f.Flush()
			select {
			case <-r.Context().Done():
				return
			case <-tick.C:
			}
		}
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// waitListening waits until p listens on addr; p exiting fails at once.
func waitListening(t testing.TB, p *proctest.Proc, addr string) {
	t.Helper()
	testutil.Eventually(t, 10*time.Second, addr+" listening", func() bool {
		if p.Exited() {
			t.Fatalf("%s exited before listening on %s:\n%s", p.Name, addr, p.Log)
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
}

func randomToken(t testing.TB) string {
	t.Helper()
	return fmt.Sprintf("cluster-test-token-%d-%d", time.Now().UnixNano(), octets.Load())
}

// stream opens GET /stream through socks5d and reads it in the background,
// recording the longest gap between two reads, until the test ends or
// close is called.
type stream struct {
	conn   net.Conn
	mu     sync.Mutex
	last   time.Time
	maxGap time.Duration
	bytes  int64
	err    error
	done   chan struct{}
}

func (c *cluster) openStream() *stream {
	c.t.Helper()
	conn, err := net.DialTimeout("tcp", c.socks, 2*time.Second)
	if err != nil {
		c.t.Fatal(err)
	}
	ap := netip.MustParseAddrPort(c.target)
	a4 := ap.Addr().As4()
	req := append([]byte{5, 1, 0, 5, 1, 0, 1}, a4[:]...)
	req = binary.BigEndian.AppendUint16(req, ap.Port())
	var rep [12]byte
	if _, err := conn.Write(req); err != nil {
		c.t.Fatal(err)
	}
	if _, err := io.ReadFull(conn, rep[:]); err != nil || rep[3] != 0 {
		c.t.Fatalf("stream CONNECT: reply %v, %v", rep, err)
	}
	io.WriteString(conn, "GET /stream HTTP/1.0\r\n\r\n")
	s := &stream{conn: conn, last: time.Now(), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			now := time.Now()
			s.mu.Lock()
			if n > 0 {
				s.maxGap = max(s.maxGap, now.Sub(s.last))
				s.last = now
				s.bytes += int64(n)
			}
			if err != nil {
				s.err = err
				s.mu.Unlock()
				return
			}
			s.mu.Unlock()
		}
	}()
	c.t.Cleanup(s.close)
	return s
}

// state returns the longest gap so far (counting the current one), the
// bytes read and the error that ended the stream, if any.
func (s *stream) state() (time.Duration, int64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	gap := s.maxGap
	if s.err == nil {
		gap = max(gap, time.Since(s.last))
	}
	return gap, s.bytes, s.err
}

func (s *stream) close() {
	s.conn.Close()
	<-s.done
}

// agentInfo is one entry of a member's /v1/agents.
type agentInfo struct {
	Agent   string   `json:"agent"`
	Session string   `json:"session"`
	Remote  string   `json:"remote"`
	Routes  []string `json:"routes"`
}

// agents lists a member's live agent sessions through its API.
func (c *cluster) agentsOn(m *member) ([]agentInfo, error) {
	resp, err := http.Get("http://" + netip.AddrPortFrom(m.ip, uint16(m.api)).String() + "/v1/agents")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out []agentInfo
	return out, json.NewDecoder(resp.Body).Decode(&out)
}
