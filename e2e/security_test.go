package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/agent"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

const (
	tokenA = "token-of-agent-a-0123456789"
	tokenB = "token-of-agent-b-0123456789"
)

// writeFile writes content to a new file in a temp dir.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// perAgent configures per-agent tokens (and the policy) on a server.
func perAgent(tokens string, policy []server.PolicyRule) serverOpt {
	return func(c *server.Config) {
		c.Token = config.Secret{}
		c.TokensFile = tokens
		c.Policy = policy
	}
}

// as makes an agent use id and token.
func as(id, token string) agentOpt {
	return func(c *agent.Config, _ *agent.Agent) {
		if c != nil {
			c.AgentID = id
			c.Token = config.Secret{Env: "VPCREACH_E2E_" + strings.ToUpper(strings.ReplaceAll(id, "-", "_"))}
			os.Setenv(c.Token.Env, token)
		}
	}
}

// Per-agent tokens: each agent is its own identity; the second claiming
// the first's target is refused and the first keeps working.
func TestIdentityCannotTakeOverAnother(t *testing.T) {
	echo := testutil.EchoTarget(t)
	tokens := writeFile(t, "tokens.yaml", "agent-a: "+tokenA+"\nagent-b: "+tokenB+"\n")
	reg := registry.NewMemory(nil)
	var logs testutil.LogBuffer
	srv := startServer(t, reg, logger(&logs), perAgent(tokens, nil))
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil, as("agent-a", tokenA))
	first := waitRoute(t, reg, echo, "")
	if first.Identity != "agent-a" {
		t.Fatalf("route identity %q, want agent-a", first.Identity)
	}
	var blogs testutil.LogBuffer
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, logger(&blogs), as("agent-b", tokenB))
	testutil.Eventually(t, 5*time.Second, "agent-b told its claim was refused", func() bool {
		return blogs.Contains("target refused by server") && blogs.Contains("another identity owns the route")
	})
	now, err := reg.Lookup(context.Background(), first.Key)
	if err != nil || now.Session != first.Session {
		t.Fatalf("route after agent-b's claim = %+v, %v; want agent-a's session", now, err)
	}
	c, err := net.Dial("tcp", first.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, c, "agent-a still serves")
	c.Close()
	// An unknown agent id, or a known one with another's token: refused.
	for _, tc := range []struct{ id, tok string }{{"agent-c", tokenA}, {"agent-a", tokenB}} {
		conn := dialTCP(t, srv.ControlAddr().String())
		h := hello("", echo)
		h.AgentID, h.MinVersion, h.MaxVersion, h.Auth, h.Secret = tc.id, tunnel.Version3, tunnel.Version3, tunnel.AuthHMAC, tc.tok
		if _, _, err := tunnel.ClientHandshake(conn, h, tunnel.Settings{}); !isRefusal(err, tunnel.RefuseAuth) {
			t.Fatalf("%s with another's token: %v; want an auth refusal", tc.id, err)
		}
	}
}

func isRefusal(err error, code string) bool {
	ref, ok := tunnel.IsRefusal(err)
	return ok && ref.Code == code
}

// Claim policy: a target outside the identity's rules is refused with a
// reason and an audit line; reloading a narrower policy revokes a live
// route at once, and removing a token closes that agent's session.
func TestClaimPolicyAndRevocation(t *testing.T) {
	echoA, echoB := testutil.EchoTarget(t), testutil.EchoTarget(t)
	tokens := writeFile(t, "tokens.yaml", "agent-a: "+tokenA+"\nagent-b: "+tokenB+"\n")
	policy := []server.PolicyRule{{Identity: "agent-a", Allow: []string{echoA}}, {Identity: "agent-b", Allow: []string{echoB}}}
	reg := registry.NewMemory(nil)
	var logs testutil.LogBuffer
	srv := startServer(t, reg, logger(&logs), perAgent(tokens, policy))
	var alogs testutil.LogBuffer
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echoA, echoB}, logger(&alogs), as("agent-a", tokenA))
	waitRoute(t, reg, echoA, "")
	testutil.Eventually(t, 5*time.Second, "audit line and refusal for the target outside policy", func() bool {
		return logs.Contains("audit: claim refused by policy") && alogs.Contains("outside this agent's claim policy")
	})
	kb, _ := registry.ParseKey(echoB)
	if _, err := reg.Lookup(context.Background(), kb); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("agent-a got a route to %s outside its policy", echoB)
	}
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echoB}, nil, as("agent-b", tokenB))
	rb := waitRoute(t, reg, echoB, "")
	open, err := net.Dial("tcp", rb.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	echoOnce(t, open, "agent-b before the reload")

	// Reload: agent-a's policy no longer allows echoA; agent-b's token is
	// gone.
	cfg := reloadConfig(t, srv, writeFile(t, "tokens2.yaml", "agent-a: "+tokenA+"\n"),
		[]server.PolicyRule{{Identity: "agent-a", Allow: []string{"10.255.0.0/16:*"}}})
	if err := srv.Apply(cfg); err != nil {
		t.Fatal(err)
	}
	ka, _ := registry.ParseKey(echoA)
	testutil.Eventually(t, 5*time.Second, "both routes revoked", func() bool {
		_, ea := reg.Lookup(context.Background(), ka)
		_, eb := reg.Lookup(context.Background(), kb)
		return errors.Is(ea, registry.ErrNotFound) && errors.Is(eb, registry.ErrNotFound)
	})
	testutil.Eventually(t, 5*time.Second, "agent-b's session closed", func() bool {
		for _, a := range srv.Agents() {
			if a.Agent == "agent-b" {
				return false
			}
		}
		return true
	})
	if !logs.Contains("audit: session revoked") || !logs.Contains("audit: route revoked by policy") {
		t.Fatalf("no audit lines for the revocation:\n%s", logs.String())
	}
	// A restart-only change is refused and changes nothing.
	bad := *cfg
	bad.Control = "127.0.0.1:1"
	if err := srv.Apply(&bad); err == nil || !strings.Contains(err.Error(), "control") {
		t.Fatalf("Apply with a new control address = %v; want it refused naming control", err)
	}
}

// reloadConfig is the running server's config with new tokens and policy,
// validated as a reload loads it.
func reloadConfig(t *testing.T, srv *server.Server, tokens string, policy []server.PolicyRule) *server.Config {
	t.Helper()
	cfg := srv.Config()
	cfg.TokensFile, cfg.Policy = tokens, policy
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	return &cfg
}

// Version 3: a captured hello and proof, replayed on a new connection,
// fail the fresh challenge.
func TestHelloReplayRefused(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil)
	rec := &recorder{to: srv.ControlAddr().String()}
	ln := rec.listen(t)
	startAgent(t, []string{ln}, []string{echo}, nil)
	waitRoute(t, reg, echo, "")
	captured := rec.firstBytes(t)
	if bytes.Contains(captured, []byte(testToken)) {
		t.Fatal("the token travelled in the captured handshake")
	}
	conn := dialTCP(t, srv.ControlAddr().String())
	if _, err := conn.Write(captured); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ans tunnel.Answer
	if err := tunnel.ReadFrame(conn, tunnel.MaxHelloSize, &ans); err != nil || ans.Challenge == nil {
		t.Fatalf("replay: first answer %+v, %v; want a fresh challenge", ans, err)
	}
	ans = tunnel.Answer{}
	if err := tunnel.ReadFrame(conn, tunnel.MaxHelloSize, &ans); err != nil || ans.Refusal == nil || ans.Refusal.Code != tunnel.RefuseAuth {
		t.Fatalf("replayed proof: answer %+v, %v; want an auth refusal", ans, err)
	}
}

// recorder relays the agent's first control connection to the server and
// keeps what the agent sent before the welcome (magic, hello, proof).
type recorder struct {
	to   string
	mu   sync.Mutex
	buf  bytes.Buffer
	done bool
}

func (r *recorder) listen(t *testing.T) string {
	ln := testutil.Listen(t)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", r.to)
			if err != nil {
				c.Close()
				continue
			}
			go func() { _, _ = io.Copy(c, up); c.Close() }()
			go func() {
				buf := make([]byte, 32<<10)
				for {
					n, err := c.Read(buf)
					r.mu.Lock()
					if !r.done && r.buf.Len() < 64<<10 {
						r.buf.Write(buf[:n])
					}
					r.mu.Unlock()
					if _, werr := up.Write(buf[:n]); err != nil || werr != nil {
						up.Close()
						return
					}
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// firstBytes returns the magic, hello and proof frames the agent sent.
func (r *recorder) firstBytes(t *testing.T) []byte {
	t.Helper()
	var out []byte
	testutil.Eventually(t, 5*time.Second, "hello and proof captured", func() bool {
		r.mu.Lock()
		defer r.mu.Unlock()
		rd := bytes.NewReader(r.buf.Bytes())
		var magic [8]byte
		if _, err := io.ReadFull(rd, magic[:]); err != nil {
			return false
		}
		var h tunnel.Hello
		var p tunnel.Proof
		if tunnel.ReadFrame(rd, tunnel.MaxHelloSize, &h) != nil || tunnel.ReadFrame(rd, tunnel.MaxHelloSize, &p) != nil {
			return false
		}
		out = append([]byte(nil), r.buf.Bytes()[:r.buf.Len()-rd.Len()]...)
		r.done = true
		return true
	})
	return out
}

// Mutual TLS: the identity is the certificate's name; a hello claiming
// another id is refused; an agent without a client certificate, or one
// that does not trust the server, gets nowhere.
func TestMutualTLS(t *testing.T) {
	echo := testutil.EchoTarget(t)
	ca := testutil.NewCA(t, "vpcreach-test")
	srvCert, srvKey := ca.Issue(t, "proxy-1", net.ParseIP("127.0.0.1"))
	aCert, aKey := ca.Issue(t, "agent-a")
	reg := registry.NewMemory(nil)
	var logs testutil.LogBuffer
	srv := startServer(t, reg, logger(&logs), func(c *server.Config) {
		c.Token = config.Secret{}
		c.TLS = &server.ServerTLS{CertFile: srvCert, KeyFile: srvKey, ClientCAFile: ca.File}
	})
	withTLS := func(id, cert, key, caFile string) agentOpt {
		return func(c *agent.Config, _ *agent.Agent) {
			if c != nil {
				c.AgentID, c.Token = id, config.Secret{}
				c.TLS = &config.TLSFiles{CAFile: caFile, CertFile: cert, KeyFile: key}
			}
		}
	}
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil, withTLS("agent-a", aCert, aKey, ca.File))
	r := waitRoute(t, reg, echo, "")
	if r.Identity != "agent-a" {
		t.Fatalf("identity %q, want the certificate's agent-a", r.Identity)
	}
	c, err := net.Dial("tcp", r.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, c, "over mutual TLS")
	c.Close()

	var other testutil.LogBuffer
	startAgent(t, []string{srv.ControlAddr().String()}, []string{"127.0.0.1:9"}, logger(&other), withTLS("agent-x", aCert, aKey, ca.File))
	testutil.Eventually(t, 5*time.Second, "a claimed id that differs from the certificate refused", func() bool {
		return other.Contains(`differs from its certificate's \"agent-a\"`) || other.Contains("differs from its certificate")
	})
	foreign := testutil.NewCA(t, "someone-else")
	var untrusting testutil.LogBuffer
	startAgent(t, []string{srv.ControlAddr().String()}, []string{"127.0.0.1:9"}, logger(&untrusting), withTLS("agent-a", aCert, aKey, foreign.File))
	testutil.Eventually(t, 5*time.Second, "an agent that does not trust the server's certificate refuses it", func() bool {
		return untrusting.Contains("certificate signed by unknown authority")
	})
	var nocert testutil.LogBuffer
	startAgent(t, []string{srv.ControlAddr().String()}, []string{"127.0.0.1:9"}, logger(&nocert), func(c *agent.Config, _ *agent.Agent) {
		if c != nil {
			c.AgentID = "agent-a"
			c.TLS = &config.TLSFiles{CAFile: ca.File}
		}
	})
	testutil.Eventually(t, 5*time.Second, "an agent without a client certificate refused", func() bool {
		return logs.Contains("TLS handshake failed")
	})
	if len(srv.Agents()) != 1 {
		t.Fatalf("agents %+v; want only agent-a", srv.Agents())
	}
}

// A server with no credential refuses to start, unless told it is a lab.
func TestServerWithoutAuthRefusesToStart(t *testing.T) {
	cfg := server.Config{Control: "127.0.0.1:0", Advertise: "127.0.0.1", Ports: "30000-30010"}
	err := cfg.Validate()
	if err == nil || !strings.Contains(err.Error(), "no authentication configured") {
		t.Fatalf("Validate without credentials = %v", err)
	}
	cfg = server.Config{Control: "127.0.0.1:0", Advertise: "127.0.0.1", Ports: "30000-30010", InsecureNoAuth: true}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("Validate with insecure_no_auth: %v", err)
	}
}

// The agent's dial-time check: a target given as ":port" resolves to this
// host's address towards the server (loopback here), and loopback is never
// dialled unless a target names it: the stream is refused at dial time.
func TestAgentRefusesImplicitLoopback(t *testing.T) {
	echo := testutil.EchoTarget(t)
	_, port, _ := net.SplitHostPort(echo)
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil)
	var alogs testutil.LogBuffer
	startAgent(t, []string{srv.ControlAddr().String()}, []string{":" + port}, logger(&alogs))
	r := waitRoute(t, reg, echo, "") // ":port" resolved to 127.0.0.1:port
	c, err := net.Dial("tcp", r.Proxy.String())
	if err == nil {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, _ = c.Write([]byte("hello"))
		if n, err := c.Read(make([]byte, 8)); err == nil || n > 0 {
			t.Fatalf("got %d bytes through an implicit loopback target", n)
		}
		c.Close()
	}
	testutil.Eventually(t, 5*time.Second, "the agent's destination check refusing the dial", func() bool {
		return alogs.Contains("target refused at dial time") && alogs.Contains("loopback, link-local or metadata")
	})
}

// Proxy and relay ports accept only the configured source CIDRs.
func TestSourceAllowLists(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	var logs testutil.LogBuffer
	srv := startServer(t, reg, logger(&logs), withSocks(), func(c *server.Config) {
		c.ProxyAllow = []string{"192.0.2.0/24"} // not loopback: the test's connections are refused
		c.RelayAllow = []string{"127.0.0.1"}
	})
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil)
	r := waitRoute(t, reg, echo, "")
	c, err := net.Dial("tcp", r.Proxy.String())
	if err == nil {
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, _ = c.Write([]byte("hi"))
		if n, err := c.Read(make([]byte, 4)); err == nil || n > 0 {
			t.Fatal("a source outside proxy_allow got data")
		}
		c.Close()
	}
	testutil.Eventually(t, 5*time.Second, "denial counted and logged", func() bool {
		return srv.Stats.SourceDenied.Load() == 1 && logs.Contains("source not allowed")
	})
	// The relay port allows 127.0.0.1: SOCKS5 through it works.
	sc, rep := socksConnect(t, srv.SocksAddr().String(), echo)
	if rep != repSuccess {
		t.Fatalf("relay from an allowed source: reply %d", rep)
	}
	echoOnce(t, sc, "allowed")
}

// countingTarget accepts connections and counts them and their bytes.
type countingTarget struct {
	conns, bytes atomic.Int64
	addr         string
}

func newCountingTarget(t *testing.T) *countingTarget {
	ct := &countingTarget{}
	ln := testutil.Listen(t)
	ct.addr = ln.Addr().String()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ct.conns.Add(1)
			go func() {
				n, _ := io.Copy(io.Discard, c)
				ct.bytes.Add(n)
				c.Close()
			}()
		}
	}()
	return ct
}

// Fencing on the relay path: a member restarts, its old proxy port goes to
// another target, and socks5d's stale cached route for the first target is
// replayed: the relay refuses it (stale generation), not a byte reaches the
// other target's tunnel, and the retry uses the fresh route.
func TestFencingStaleCacheAfterRestart(t *testing.T) {
	echo := testutil.EchoTarget(t)
	other := newCountingTarget(t)
	control := "127.0.0.1:" + itoa(testutil.FreePort(t))
	relay := testutil.FreePort(t)
	ports := portRange()
	fixed := func(c *server.Config) { c.Control, c.Relay, c.Ports = control, relay, ports }
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil, fixed)
	startAgent(t, []string{control}, []string{echo}, nil)
	old := waitRoute(t, reg, echo, "")

	// socks5d with a cache that stays fresh for an hour and hears no
	// events: after the restart it holds a stale route.
	cache := registry.NewCache(reg, registry.CacheOptions{Fresh: time.Hour})
	front := socksOver(t, cache)
	c, rep := socksConnect(t, front, echo)
	if rep != repSuccess {
		t.Fatalf("before the restart: reply %d", rep)
	}
	echoOnce(t, c, "before")
	c.Close()

	// The member restarts (no memory of its quarantine); the other
	// target's agent takes the old proxy port; the first agent reconnects.
	srv.Close()
	srv2 := startServer(t, reg, nil, fixed)
	startAgent(t, []string{control}, []string{other.addr}, nil, func(c *agent.Config, _ *agent.Agent) {
		if c != nil {
			c.Targets[0].ProxyPort = old.Proxy.Port()
		}
	})
	ko, _ := registry.ParseKey(other.addr)
	testutil.Eventually(t, 10*time.Second, "the other target on the old proxy port", func() bool {
		r, err := reg.Lookup(context.Background(), ko)
		return err == nil && r.Proxy == old.Proxy
	})
	fresh := waitRouteNewer(t, reg, old)
	refusals := srv2.Stats.RelayRefusals.Load()

	c, rep = socksConnect(t, front, echo) // the cache still names the old generation
	if rep != repSuccess {
		t.Fatalf("replay through the stale cache: reply %d; want success on the retry with the fresh route", rep)
	}
	echoOnce(t, c, "after")
	c.Close()
	if got := srv2.Stats.RelayRefusals.Load(); got != refusals+1 {
		t.Fatalf("relay refusals %d -> %d; want the stale generation refused once", refusals, got)
	}
	if n, b := other.conns.Load(), other.bytes.Load(); n != 0 || b != 0 {
		t.Fatalf("the other target saw %d connections, %d bytes: the stale route reached another tunnel", n, b)
	}
	if got, err := cache.Lookup(context.Background(), fresh.Key); err != nil || got.Generation != fresh.Generation {
		t.Fatalf("cache after the retry: %+v, %v; want the fresh generation", got, err)
	}
}

// waitRouteNewer waits for old's key to have a newer generation.
func waitRouteNewer(t *testing.T, reg registry.Reader, old registry.Route) registry.Route {
	t.Helper()
	var r registry.Route
	testutil.Eventually(t, 10*time.Second, "a newer route for "+old.Key.String(), func() bool {
		var err error
		r, err = reg.Lookup(context.Background(), old.Key)
		return err == nil && r.Generation > old.Generation
	})
	return r
}

// socksOver runs a SOCKS5 front end reading routes from routes.
func socksOver(t *testing.T, routes registry.Reader) string {
	cfg := socks.Config{Listen: "127.0.0.1:0", ConnectTimeout: 5 * time.Second}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	s := socks.New(cfg, routes, testutil.Logger(t))
	ln := testutil.Listen(t)
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ln) }()
	t.Cleanup(func() { s.Close(); <-done })
	return ln.Addr().String()
}

func itoa(n int) string { return strconv.Itoa(n) }

// Certificate rotation: SIGHUP's reload re-reads the certificate files; a
// live tunnel stays up, new connections see the new certificate.
func TestTLSCertificateRotation(t *testing.T) {
	echo := testutil.EchoTarget(t)
	ca := testutil.NewCA(t, "rotation-ca")
	cert1, key1 := ca.Issue(t, "proxy-1", net.ParseIP("127.0.0.1"))
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil, func(c *server.Config) {
		c.TLS = &server.ServerTLS{CertFile: cert1, KeyFile: key1}
	})
	a := startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil, func(c *agent.Config, _ *agent.Agent) {
		if c != nil {
			c.TLS = &config.TLSFiles{CAFile: ca.File}
		}
	})
	r := waitRoute(t, reg, echo, "")
	serial := func() string {
		conn, err := tls.Dial("tcp", srv.ControlAddr().String(), &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	before := serial()
	cert2, key2 := ca.Issue(t, "proxy-1-rotated", net.ParseIP("127.0.0.1"))
	cfg := srv.Config()
	cfg.TLS = &server.ServerTLS{CertFile: cert2, KeyFile: key2}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := srv.Apply(&cfg); err != nil {
		t.Fatal(err)
	}
	if after := serial(); after == before {
		t.Fatal("new connections still get the old certificate after the reload")
	}
	c, err := net.Dial("tcp", r.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, c, "the tunnel survived the rotation")
	c.Close()
	if n := a.Stats.Reconnects.Load(); n != 0 {
		t.Fatalf("the rotation dropped the tunnel (%d reconnects)", n)
	}
}
