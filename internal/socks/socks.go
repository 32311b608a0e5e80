// Package socks is the SOCKS5 front end, which also speaks HTTP proxy on
// the same port (http.go): things-go/go-socks5 negotiates SOCKS5, this
// package owns the accept loop, the protocol sniffing and the CONNECT path. A CONNECT looks
// the target's route up and connects through the owning proxy server's
// relay port, so the reply code is the real outcome; nothing is ever
// dialled directly, and no name is resolved on the proxy host.
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
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	socks5 "github.com/things-go/go-socks5"
	"github.com/things-go/go-socks5/statute"

	"github.com/vpcreach/vpcreach/internal/admin"
	"github.com/vpcreach/vpcreach/internal/config"
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
}

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
	return p.Err()
}

// Server is a SOCKS5 front end. Serve runs its accept loop; Close stops it
// and every connection it serves.
type Server struct {
	cfg    Config
	routes registry.Reader
	log    *slog.Logger
	s5     *socks5.Server

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	lns    map[net.Listener]struct{}
	closed bool
	// stopping is set by Shutdown: no new connection is tracked after it,
	// so wg.Add never races with Shutdown's Wait.
	stopping bool
	wg       sync.WaitGroup

	// Counters for metrics.
	open    atomic.Int64    // client connections being served
	bytes   tunnel.Counters // Up: client->target, Down: target->client
	results *admin.Reasons
}

// connectResults are the bounded label values of CONNECT outcomes.
var connectResults = []string{"ok", "no route", "unreachable", "refused", "not exposed", "busy",
	"stale", "draining", "bad request", "not supported"}

// RegisterMetrics exposes the front end's counters; sub prefixes the
// names ("socks5d", or "server" for the in-process front end).
func (s *Server) RegisterMetrics(reg prometheus.Registerer, sub string) {
	admin.GaugeOf(reg, sub+"_socks_connections_open", "SOCKS5 client connections being served.", &s.open, nil)
	s.results.Register(reg, sub+"_socks_connects_total", "SOCKS5 CONNECT requests by result.", "result")
	admin.Counter(reg, sub+"_socks_bytes_total", "Bytes carried, by direction.", &s.bytes.Up, prometheus.Labels{"direction": "to_target"})
	admin.Counter(reg, sub+"_socks_bytes_total", "Bytes carried, by direction.", &s.bytes.Down, prometheus.Labels{"direction": "from_target"})
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
	s := &Server{cfg: cfg, routes: routes, log: log.With("part", "socks5"), results: admin.NewReasons(connectResults...),
		conns: map[net.Conn]struct{}{}, lns: map[net.Listener]struct{}{}}
	s.s5 = socks5.NewServer(
		socks5.WithResolver(literalResolver{}),
		socks5.WithConnectHandle(s.connect),
		socks5.WithBindHandle(s.notSupported),
		socks5.WithAssociateHandle(s.notSupported),
		socks5.WithLogger(s5log{s.log}),
	)
	return s
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
		if !s.track(c) {
			c.Close()
			return
		}
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			s.open.Add(1)
			defer s.open.Add(-1)
			s.ServeConn(c)
		}()
	})
}

// track registers a new connection and counts it in wg, under mu so that
// it cannot race with Shutdown's wait; false once the server stops.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.stopping {
		return false
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// ServeConn serves one client connection and closes it.
func (s *Server) ServeConn(c net.Conn) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("panic serving connection", "client", c.RemoteAddr().String(), "panic", r)
			c.Close()
		}
	}()
	defer c.Close()
	netx.KeepAlive(c, 30*time.Second, 10*time.Second, 3)
	_ = c.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	// The first byte decides: 5 is a SOCKS5 greeting, anything else an
	// HTTP proxy request (http.go).
	lr := &headLimit{r: c, n: maxHTTPHeader}
	br := bufio.NewReaderSize(lr, 4096)
	first, err := br.Peek(1)
	if err != nil {
		if errors.Is(err, io.EOF) {
			s.log.Debug("connection closed before its first byte", "client", c.RemoteAddr().String())
		} else {
			s.log.Info("no request", "client", c.RemoteAddr().String(), "err", err)
		}
		return
	}
	if first[0] != socks5Version {
		s.serveHTTP(c, br, lr)
		return
	}
	lr.lift()
	switch err := s.s5.ServeConn(&readerConn{Conn: c, r: br}); {
	case err == nil, errors.Is(err, errHandled):
	case errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF):
		// Closed before a greeting: a port check, not a client.
		s.log.Debug("socks5 connection closed before its greeting", "client", c.RemoteAddr().String())
	default:
		s.log.Info("socks5 request failed", "client", c.RemoteAddr().String(), "err", err)
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
	client := w.(net.Conn)
	log := s.log.With("client", client.RemoteAddr().String())
	dst := req.DestAddr
	if dst.IP == nil {
		s.results.Inc("not supported")
		_ = socks5.SendReply(w, statute.RepAddrTypeNotSupported, nil)
		log.Info("socks5 connect refused: names are not resolved here", "name", dst.FQDN)
		return errHandled
	}
	ip, _ := netip.AddrFromSlice(dst.IP)
	key := registry.Key{Network: s.cfg.Network, Addr: netip.AddrPortFrom(ip.Unmap(), uint16(dst.Port))}
	if dst.Port == 0 {
		s.results.Inc("bad request")
		_ = socks5.SendReply(w, statute.RepHostUnreachable, nil)
		log.Info("socks5 connect refused: port 0", "target", key.String())
		return errHandled
	}
	relay, st, err := s.dial(ctx, key, client.RemoteAddr().String())
	s.results.Inc(st.String())
	if st != tunnel.StatusOK {
		_ = socks5.SendReply(w, replyFor(st), nil)
		log.Info("socks5 connect failed", "target", key.String(), "status", st.String(), "err", err)
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
	res := tunnel.SpliceCounted(pipelined(client, req.Reader), relay, s.cfg.IdleTimeout, &s.bytes)
	if res.Aborted {
		log.Debug("socks5 connection reset", "target", key.String(), "err", res.Err)
	}
	return errHandled
}

// dial finds the route of key and connects through its member's relay
// port. When the member cannot be reached or answers that the route is
// stale or unknown there, the route is dropped from the cache and looked
// up once more; a second, different route is tried.
func (s *Server) dial(ctx context.Context, key registry.Key, client string) (net.Conn, tunnel.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.ConnectTimeout)
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
		c, st, err := Relay(ctx, route, client, s.cfg.RelayDialTimeout)
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
// over the connection itself).
type readerConn struct {
	net.Conn
	r io.Reader
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
