// Package socks is the SOCKS5 front end, which also speaks HTTP proxy on
// the same port (http.go): things-go/go-socks5 negotiates SOCKS5, this
// package owns the accept loop, the protocol sniffing and the CONNECT path. A CONNECT looks
// the target's route up and connects through the owning proxy server's
// relay port, so the reply code is the real outcome; nothing is ever
// dialled directly, and no name is resolved on the proxy host. With users
// configured, clients authenticate (auth.go) and each CONNECT is checked
// against the user's allow list; Apply (reload.go) swaps users and
// settings live. limits.go holds the per-source cap.
package socks

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	socks5 "github.com/things-go/go-socks5"
	"github.com/things-go/go-socks5/statute"

	"github.com/vpcreach/vpcreach/internal/admin"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/logx"
	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// Config configures the SOCKS5 front end.
type Config struct {
	// Listen is the SOCKS5 listen address.
	Listen string `yaml:"listen"`
	// Network is the registry network this front end serves ("" default).
	Network string `yaml:"network"`
	// HandshakeTimeout bounds greeting, auth and request. Default 10 s.
	HandshakeTimeout time.Duration `yaml:"handshake_timeout"`
	// ConnectTimeout bounds the whole connect: lookups, relay connects
	// and the target's status. Default 10 s.
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
	// RelayDialTimeout bounds the TCP connect to a member's relay port: a
	// member whose host is gone (no RST) fails within it, and the route is
	// looked up once more. Default 2 s (one SYN retransmit).
	RelayDialTimeout time.Duration `yaml:"relay_dial_timeout"`
	// IdleTimeout closes connections idle this long. Default 1 h.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// MaxConnsPerSource caps the open client connections from one IP
	// address; more are closed at once (a log line, at most one per
	// source per second, and a counter). Default 256.
	MaxConnsPerSource int `yaml:"max_conns_per_source"`
	// Users, when set, require authentication (RFC 1929 for SOCKS5,
	// Proxy-Authorization: Basic for HTTP) and limit each user to its
	// allow list. Empty: no authentication, any target with a route.
	Users []User `yaml:"users"`

	// auth is the compiled Users, filled by Validate.
	auth *authTable
}

// DefaultMaxConnsPerSource is the default of max_conns_per_source.
const DefaultMaxConnsPerSource = 256

// Validate fills defaults and checks the fields.
func (c *Config) Validate() error {
	var p config.Problems
	if c.Listen == "" {
		p.Addf("listen", "required (e.g. 127.0.0.1:1080)")
	} else if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		p.Addf("listen", "%v", err)
	}
	if c.Network != "" {
		if err := registry.ValidNetwork(c.Network); err != nil {
			p.Addf("network", "%v", err)
		}
	}
	p.Duration(&c.HandshakeTimeout, 10*time.Second, "handshake_timeout")
	p.Duration(&c.ConnectTimeout, 10*time.Second, "connect_timeout")
	p.Duration(&c.RelayDialTimeout, 2*time.Second, "relay_dial_timeout")
	p.Duration(&c.IdleTimeout, time.Hour, "idle_timeout")
	if c.MaxConnsPerSource == 0 {
		c.MaxConnsPerSource = DefaultMaxConnsPerSource
	} else if c.MaxConnsPerSource < 0 {
		p.Addf("max_conns_per_source", "must be positive")
	}
	c.auth = compileUsers(c.Users, c.Network, &p, "users")
	return p.Err()
}

// Server is a SOCKS5 front end. Serve runs its accept loop; Close stops it
// and every connection it serves.
type Server struct {
	routes registry.Reader
	log    *slog.Logger
	// s5open offers no authentication, s5auth username/password only;
	// each connection gets one of them by the users configured when it
	// arrives.
	s5open, s5auth *socks5.Server
	// live holds the settings that Apply swaps; each connection takes a
	// snapshot when it arrives, but who may connect where is decided by
	// the newest one.
	live    atomic.Pointer[settings]
	applyMu sync.Mutex   // serialises Apply
	logs    *logLimit    // per source and kind
	logsAll logx.Limiter // all sources together
	// testHook, when set (tests only), runs first for every connection
	// inside its panic recovery.
	testHook func(net.Conn)

	mu      sync.Mutex
	conns   map[net.Conn]*connState
	sources map[string]int // open connections by client IP
	lns     map[net.Listener]struct{}
	closed  bool
	// stopping is set by Shutdown: no new connection is tracked after it,
	// so wg.Add never races with Shutdown's Wait.
	stopping bool
	wg       sync.WaitGroup

	// Counters for metrics.
	open    atomic.Int64    // client connections being served
	bytes   tunnel.Counters // Up: client->target, Down: target->client
	results *admin.Reasons
	capped  atomic.Int64 // connections closed by max_conns_per_source
	revoked atomic.Int64 // open connections closed by a reload
}

// settings is what Apply swaps: an immutable snapshot.
type settings struct {
	cfg  Config
	auth *authTable // nil: no authentication
}

// connState is what the server knows of one client connection.
type connState struct {
	set    *settings // at accept
	source string    // client IP
	// Under Server.mu: the user it authenticated as (nil: none), and
	// the target once a CONNECT was allowed, for a reload to re-check.
	user      *userEntry
	key       registry.Key
	connected bool
	revoked   bool // closed by a reload; it leaves conns when its handler ends
}

// connectResults are the bounded label values of CONNECT outcomes.
// "auth failed" counts failed authentications (SOCKS5 and HTTP 407),
// "denied" CONNECTs an ACL refused.
var connectResults = []string{"ok", "no route", "unreachable", "refused", "not exposed", "busy",
	"stale", "draining", "bad request", "not supported", "denied", "auth failed"}

// RegisterMetrics exposes the front end's counters; sub prefixes the
// names ("socks5d", or "server" for the in-process front end).
func (s *Server) RegisterMetrics(reg prometheus.Registerer, sub string) {
	admin.GaugeOf(reg, sub+"_socks_connections_open", "SOCKS5 client connections being served.", &s.open, nil)
	s.results.Register(reg, sub+"_socks_connects_total", "SOCKS5 CONNECT requests by result.", "result")
	admin.Counter(reg, sub+"_socks_bytes_total", "Bytes carried, by direction.", &s.bytes.Up, prometheus.Labels{"direction": "to_target"})
	admin.Counter(reg, sub+"_socks_bytes_total", "Bytes carried, by direction.", &s.bytes.Down, prometheus.Labels{"direction": "from_target"})
	admin.Counter(reg, sub+"_socks_connections_refused_total", "Client connections closed at once, by reason.", &s.capped, prometheus.Labels{"reason": "per_source_cap"})
	admin.Counter(reg, sub+"_socks_connections_revoked_total", "Open connections closed by a reload that removed their user or narrowed their ACL.", &s.revoked, nil)
	if c, ok := s.routes.(*registry.Cache); ok {
		name, help := sub+"_route_lookups_total", "Route lookups by result."
		admin.Counter(reg, name, help, &c.Stats.Hits, prometheus.Labels{"result": "hit"})
		admin.Counter(reg, name, help, &c.Stats.Misses, prometheus.Labels{"result": "miss"})
		admin.Counter(reg, name, help, &c.Stats.Stale, prometheus.Labels{"result": "stale"})
		admin.Counter(reg, name, help, &c.Stats.Errors, prometheus.Labels{"result": "error"})
	}
}

// New returns a front end that finds routes in routes. cfg must have
// passed Validate.
func New(cfg Config, routes registry.Reader, log *slog.Logger) *Server {
	s := &Server{routes: routes, log: log.With("part", "socks5"), results: admin.NewReasons(connectResults...),
		conns: map[net.Conn]*connState{}, sources: map[string]int{}, lns: map[net.Listener]struct{}{},
		logs: newLogLimit(time.Second), logsAll: logx.Limiter{Burst: logBurst, Every: time.Second}}
	set, err := newSettings(cfg)
	if err != nil {
		// Validate would have refused this: fail closed, nobody gets in.
		s.log.Error("users cannot be loaded; every client is refused", "err", err)
	}
	s.live.Store(set)
	opts := func(auth socks5.Authenticator) []socks5.Option {
		return []socks5.Option{
			socks5.WithAuthMethods([]socks5.Authenticator{auth}),
			socks5.WithResolver(literalResolver{}),
			socks5.WithConnectHandle(s.connect),
			socks5.WithBindHandle(s.notSupported),
			socks5.WithAssociateHandle(s.notSupported),
			socks5.WithLogger(s5log{s.log}),
		}
	}
	s.s5open = socks5.NewServer(opts(socks5.NoAuthAuthenticator{})...)
	s.s5auth = socks5.NewServer(opts(userPassAuth{s})...)
	return s
}

// newSettings makes the live settings of cfg, compiling its users unless
// Validate did. On error the settings require authentication that no one
// passes.
func newSettings(cfg Config) (*settings, error) {
	if cfg.MaxConnsPerSource <= 0 {
		cfg.MaxConnsPerSource = DefaultMaxConnsPerSource
	}
	set := &settings{cfg: cfg, auth: cfg.auth}
	if set.auth == nil && len(cfg.Users) > 0 {
		var p config.Problems
		if set.auth = compileUsers(cfg.Users, cfg.Network, &p, "users"); set.auth == nil {
			set.auth = &authTable{denyAll: true}
			return set, p.Err()
		}
	}
	return set, nil
}

// literalResolver resolves IP literals only. Other names pass through
// unresolved (nil IP, no error) so that the CONNECT handler answers them
// "address type not supported" instead of go-socks5's "host unreachable".
type literalResolver struct{}

func (literalResolver) Resolve(ctx context.Context, name string) (context.Context, net.IP, error) {
	if a, err := netip.ParseAddr(name); err == nil {
		return ctx, net.IP(a.AsSlice()), nil
	}
	return ctx, nil, nil
}

type s5log struct{ l *slog.Logger }

func (l s5log) Errorf(format string, args ...any) { l.l.Debug(fmt.Sprintf(format, args...)) }

func (s *Server) notSupported(_ context.Context, w io.Writer, _ *socks5.Request) error {
	s.results.Inc("not supported")
	_ = socks5.SendReply(w, statute.RepCommandNotSupported, nil)
	return errors.New("command not supported")
}

// Serve accepts connections on ln until Close. Temporary accept errors
// (EMFILE and the like) are logged and retried with a backoff; Serve
// returns only when ln is closed.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return net.ErrClosed
	}
	s.lns[ln] = struct{}{}
	s.mu.Unlock()
	return netx.AcceptLoop(ln, s.log, func(c net.Conn) {
		if st := s.track(c); st != nil {
			go s.serveTracked(c, st)
		}
	})
}

// track registers a new connection and counts it in wg, under mu so that
// it cannot race with Shutdown's wait. It closes c and returns nil once
// the server stops, or when c's source is at max_conns_per_source.
func (s *Server) track(c net.Conn) *connState {
	set := s.live.Load()
	src := sourceOf(c)
	s.mu.Lock()
	if s.closed || s.stopping {
		s.mu.Unlock()
		c.Close()
		return nil
	}
	if n := s.sources[src]; n >= set.cfg.MaxConnsPerSource {
		s.mu.Unlock()
		c.Close()
		s.capped.Add(1)
		s.logLimited("cap", src, "connection refused: too many connections from this source",
			"client", c.RemoteAddr().String(), "open", n, "max_conns_per_source", set.cfg.MaxConnsPerSource)
		return nil
	}
	s.sources[src]++
	st := &connState{set: set, source: src}
	s.conns[c] = st
	s.wg.Add(1)
	s.mu.Unlock()
	return st
}

func (s *Server) untrack(c net.Conn, st *connState) {
	s.mu.Lock()
	delete(s.conns, c)
	if s.sources[st.source]--; s.sources[st.source] <= 0 {
		delete(s.sources, st.source)
	}
	s.mu.Unlock()
}

// ServeConn serves one client connection and closes it. It counts
// against max_conns_per_source, and Close closes it, as if Serve had
// accepted it.
func (s *Server) ServeConn(c net.Conn) {
	if st := s.track(c); st != nil {
		s.serveTracked(c, st)
	}
}

func (s *Server) serveTracked(c net.Conn, st *connState) {
	defer s.wg.Done()
	defer s.untrack(c, st)
	s.open.Add(1)
	defer s.open.Add(-1)
	s.serve(c, st)
}

// serve serves one tracked connection and closes it. A panic is
// recovered and logged, and ends this connection only.
func (s *Server) serve(c net.Conn, st *connState) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("panic serving connection", "client", c.RemoteAddr().String(), "panic", r,
				"stack", string(debug.Stack()))
			c.Close()
		}
	}()
	defer c.Close()
	if s.testHook != nil {
		s.testHook(c)
	}
	netx.KeepAlive(c, 30*time.Second, 10*time.Second, 3)
	_ = c.SetDeadline(time.Now().Add(st.set.cfg.HandshakeTimeout))
	client := c.RemoteAddr().String()
	// The first byte decides: 5 is a SOCKS5 greeting, anything else an
	// HTTP proxy request (http.go).
	lr := &headLimit{r: c, n: maxHTTPHeader}
	br := bufio.NewReaderSize(lr, 4096)
	first, err := br.Peek(1)
	if err != nil {
		if errors.Is(err, io.EOF) {
			s.log.Debug("connection closed before its first byte", "client", client)
		} else {
			s.log.Info("no request", "client", client, "err", err)
		}
		return
	}
	if first[0] != socks5Version {
		s.serveHTTP(c, st, br, lr)
		return
	}
	lr.lift()
	s5, authRequired := s.s5open, st.set.auth.required()
	if authRequired {
		s5 = s.s5auth
	}
	switch err := s5.ServeConn(&readerConn{Conn: c, r: br, st: st}); {
	case err == nil, errors.Is(err, errHandled):
	case errors.Is(err, statute.ErrNoSupportedAuth):
		if authRequired {
			s.results.Inc("auth failed")
			s.logLimited("auth", client, "socks5 client offers no username/password method; authentication is required", "client", client)
		} else {
			s.results.Inc("bad request")
			s.logLimited("auth", client, "socks5 client does not offer the no-authentication method", "client", client)
		}
	case errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF):
		// Closed before a greeting: a port check, not a client.
		s.log.Debug("socks5 connection closed before its greeting", "client", client)
	default:
		s.log.Info("socks5 request failed", "client", client, "err", err)
	}
}

const socks5Version = 5

// errHandled marks a CONNECT whose outcome the handler already logged.
var errHandled = errors.New("handled")

// Shutdown stops accepting, lets open connections finish until grace
// passes or hard is cancelled, then closes the rest.
func (s *Server) Shutdown(hard context.Context, grace time.Duration) {
	s.mu.Lock()
	s.stopping = true
	for ln := range s.lns {
		ln.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		s.log.Warn("drain grace period over; closing open connections")
	case <-hard.Done():
	}
	s.Close()
	<-done
}

// Close stops every listener and connection and waits for them.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	for ln := range s.lns {
		ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// Reply codes, decided in one place.
func replyFor(st tunnel.Status) uint8 {
	switch st {
	case tunnel.StatusOK:
		return statute.RepSuccess
	case tunnel.StatusRefused:
		return statute.RepConnectionRefused
	case tunnel.StatusUnreachable, tunnel.StatusNotExposed, tunnel.StatusNoRoute,
		tunnel.StatusStale, tunnel.StatusDraining:
		return statute.RepHostUnreachable
	default:
		return statute.RepServerFailure
	}
}

// connect is the CONNECT handler. w is the client connection.
func (s *Server) connect(ctx context.Context, w io.Writer, req *socks5.Request) error {
	client := w.(*readerConn)
	st := client.st
	log := s.log.With("client", client.RemoteAddr().String())
	dst := req.DestAddr
	if dst.IP == nil {
		s.results.Inc("not supported")
		_ = socks5.SendReply(w, statute.RepAddrTypeNotSupported, nil)
		log.Info("socks5 connect refused: names are not resolved here", "name", dst.FQDN)
		return errHandled
	}
	ip, _ := netip.AddrFromSlice(dst.IP)
	key := registry.Key{Network: st.set.cfg.Network, Addr: netip.AddrPortFrom(ip.Unmap(), uint16(dst.Port))}
	if dst.Port == 0 {
		s.results.Inc("bad request")
		_ = socks5.SendReply(w, statute.RepHostUnreachable, nil)
		log.Info("socks5 connect refused: port 0", "target", key.String())
		return errHandled
	}
	if user, why := s.permit(st, key); why != allowed {
		s.results.Inc("denied")
		_ = socks5.SendReply(w, statute.RepRuleFailure, nil)
		log.Info("socks5 connect denied", "user", user, "target", key.String(), "reason", why.String())
		return errHandled
	}
	relay, status, err := s.dial(ctx, st.set, key, client.RemoteAddr().String())
	s.results.Inc(status.String())
	if status != tunnel.StatusOK {
		_ = socks5.SendReply(w, replyFor(status), nil)
		log.Info("socks5 connect failed", "target", key.String(), "status", status.String(), "err", err)
		return errHandled
	}
	_ = client.SetDeadline(time.Time{})
	if err := socks5.SendReply(w, statute.RepSuccess, relay.LocalAddr()); err != nil {
		relay.Close()
		return err
	}
	log.Debug("socks5 connected", "target", key.String(), "relay", relay.RemoteAddr().String())
	// The relay carries framed data: an end without an end marker (the
	// member died, the target reset) reaches the client as a reset.
	// req.Reader is go-socks5's buffered reader: bytes the client
	// pipelined after the request are in it.
	res := tunnel.SpliceCounted(pipelined(client, req.Reader), relay, st.set.cfg.IdleTimeout, &s.bytes)
	if res.Aborted {
		log.Debug("socks5 connection reset", "target", key.String(), "err", res.Err)
	}
	return errHandled
}

// dial finds the route of key and connects through its member's relay
// port. When the member cannot be reached or answers that the route is
// stale or unknown there, the route is dropped from the cache and looked
// up once more; a second, different route is tried.
func (s *Server) dial(ctx context.Context, set *settings, key registry.Key, client string) (net.Conn, tunnel.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, set.cfg.ConnectTimeout)
	defer cancel()
	var failed registry.Route
	var last tunnel.Status
	var lastErr error
	for attempt := 0; attempt < 2; attempt++ {
		route, err := s.routes.Lookup(ctx, key)
		if err != nil {
			if errors.Is(err, registry.ErrNotFound) {
				return nil, tunnel.StatusNoRoute, err
			}
			if attempt > 0 {
				break // the first route's failure is the better answer
			}
			return nil, tunnel.StatusUnreachable, err
		}
		if attempt > 0 && route == failed {
			break // the store still names the route that just failed
		}
		c, st, err := Relay(ctx, route, client, set.cfg.RelayDialTimeout)
		if st == tunnel.StatusOK {
			return c, st, nil
		}
		if !errors.Is(err, ErrMemberDown) && st != tunnel.StatusStale && st != tunnel.StatusNoRoute {
			return nil, st, err
		}
		if inv, ok := s.routes.(interface {
			Invalidate(registry.Key, registry.Route)
		}); ok {
			inv.Invalidate(key, route)
		}
		failed, last, lastErr = route, st, err
	}
	return nil, last, lastErr
}

// pipelined returns c, or, when the client sent bytes after its request
// that go-socks5's buffered reader holds, c reading those first.
// With nothing buffered anywhere it is the raw connection, so that the
// splice waits for data without holding a buffer.
func pipelined(c net.Conn, r io.Reader) net.Conn {
	if b, ok := r.(interface{ Buffered() int }); ok && b.Buffered() == 0 {
		if rc, ok := c.(*readerConn); ok {
			return pipelined(rc.Conn, rc.r)
		}
		return c
	}
	return &readerConn{Conn: c, r: r}
}

// readerConn is a connection whose reads come from r (a buffered reader
// over the connection itself). st, on the connection handed to
// go-socks5, is the server's state of it.
type readerConn struct {
	net.Conn
	r  io.Reader
	st *connState
}

func (c *readerConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// SetLinger lets a reset (linger 0) reach the connection underneath.
func (c *readerConn) SetLinger(sec int) error {
	if l, ok := c.Conn.(interface{ SetLinger(int) error }); ok {
		return l.SetLinger(sec)
	}
	return nil
}

// CloseWrite half-closes the connection underneath.
func (c *readerConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// ErrMemberDown marks a relay connect that failed before the member
// answered: the member (or its host) is gone, not the target.
var ErrMemberDown = errors.New("proxy member unreachable")

// Relay connects to a route's relay port, sends the preamble and reads
// the status. On StatusOK the connection is ready for data.
// dialTimeout bounds the TCP connect alone (0: only ctx).
func Relay(ctx context.Context, route registry.Route, client string, dialTimeout time.Duration) (net.Conn, tunnel.Status, error) {
	d := net.Dialer{Timeout: dialTimeout}
	c, err := d.DialContext(ctx, "tcp", route.Relay.String())
	if err != nil {
		return nil, tunnel.StatusUnreachable, fmt.Errorf("relay %s: %w: %w", route.Relay, ErrMemberDown, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	p := tunnel.Preamble{Generation: route.Generation, Client: client,
		Target: tunnel.Target{Network: route.Network, Addr: route.Addr}}
	if _, err := c.Write(p.Append(nil)); err != nil {
		c.Close()
		return nil, tunnel.StatusUnreachable, fmt.Errorf("relay %s: %w: %w", route.Relay, ErrMemberDown, err)
	}
	st, err := tunnel.ReadStatus(c)
	if err != nil { // the member closed without a status: it died or was killed
		c.Close()
		return nil, tunnel.StatusUnreachable, fmt.Errorf("relay %s: %w: %w", route.Relay, ErrMemberDown, err)
	}
	if st != tunnel.StatusOK {
		c.Close()
		return nil, st, st.Err()
	}
	_ = c.SetDeadline(time.Time{})
	netx.KeepAlive(c, 30*time.Second, 10*time.Second, 3)
	return c, st, nil
}
