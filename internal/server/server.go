// Package server is the proxy server: it accepts agent tunnels on its
// control listener, opens a proxy port on its member address for every
// target an agent exposes, writes each route to the registry, and forwards
// connections on those ports, and on its relay port, through the tunnel.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vpcreach/vpcreach/internal/admin"
	"github.com/vpcreach/vpcreach/internal/logx"
	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// Stats are the server's counters.
type Stats struct {
	Tunnels        atomic.Int64 // live agent sessions
	StreamsOpen    atomic.Int64
	StreamsOpened  atomic.Int64
	StreamsAtCap   atomic.Int64 // streams refused at the per-session cap
	Refusals       atomic.Int64 // hellos refused
	RelayRefusals  atomic.Int64 // relay preambles answered with an error status
	RegistryErrors atomic.Int64
	SourceCapped   atomic.Int64 // control connections refused at the per-source cap
	SourceDenied   atomic.Int64 // proxy and relay connections from sources not allowed
}

// Snapshot returns the counters as a map, for the API.
func (s *Stats) Snapshot() map[string]int64 {
	return map[string]int64{
		"tunnels": s.Tunnels.Load(), "streams_open": s.StreamsOpen.Load(),
		"streams_opened": s.StreamsOpened.Load(), "streams_at_cap": s.StreamsAtCap.Load(),
		"hello_refusals": s.Refusals.Load(), "relay_refusals": s.RelayRefusals.Load(),
		"registry_errors": s.RegistryErrors.Load(), "source_capped": s.SourceCapped.Load(), "source_denied": s.SourceDenied.Load(),
	}
}

// Spliced returns how many stream directions this server sent as spliced
// frames (tunnel: splice(2), no user-space copy).
func (s *Server) Spliced() int64 { return s.bytes.Spliced.Load() }

// Server is one proxy server member.
type Server struct {
	cfg   Config
	log   *slog.Logger
	reg   registry.Registry
	ports *Ports
	auth  atomic.Pointer[authState] // credentials and policy; swapped on reload
	Stats Stats

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // every goroutine the server starts
	conns  sync.WaitGroup // user connections, for the drain

	draining atomic.Bool
	mu       sync.Mutex
	sessions map[*agentSession]struct{}
	routes   map[registry.Key]*route
	closed   bool
	// perSource counts control connections by source address.
	perSource map[netip.Addr]int

	control, relay net.Listener
	relayAP        netip.AddrPort // the relay address routes name
	socks          *socks.Server
	socksLn        net.Listener
	cache          *registry.Cache // the SOCKS5 front end's, with a shared store

	// renewNow asks the renewal loop for a round at once (after the
	// store came back, or a route may have been taken over).
	renewNow chan struct{}

	bytes        tunnel.Counters
	refusals     *admin.Reasons // control connections refused, by reason
	dialFailures *admin.Reasons // streams the agent answered with an error status
	regMetrics   *regMetrics
	adminSrv     *admin.Server
	started      chan struct{} // closed when Start has bound every listener
	deniedLog    logx.Limiter  // "source not allowed": per connection, so rate-limited
	relayLog     logx.Limiter  // relay refusals: per connection, so rate-limited
}

// New builds a server from a validated config. reg is the route store;
// the server does not close it.
func New(cfg Config, reg registry.Registry, log *slog.Logger) (*Server, error) {
	auth, err := loadAuth(&cfg)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	rm := newRegMetrics()
	if _, local := reg.(*registry.Memory); !local {
		reg = timedRegistry{reg, rm}
	}
	s := &Server{cfg: cfg, log: log, reg: reg, ctx: ctx, cancel: cancel,
		refusals: admin.NewReasons(refusalReasons...), dialFailures: admin.NewReasons(dialReasons...), regMetrics: rm,
		ports:    NewPorts(cfg.portLo, cfg.portHi, cfg.Quarantine, nil),
		sessions: map[*agentSession]struct{}{}, routes: map[registry.Key]*route{}, perSource: map[netip.Addr]int{},
		renewNow: make(chan struct{}, 1), started: make(chan struct{})}
	s.auth.Store(auth)
	s.warnAuth(auth)
	return s, nil
}

// Start binds the control, relay, API and SOCKS5 listeners and serves
// them. On error everything bound so far is closed.
func (s *Server) Start() (err error) {
	defer func() {
		if err != nil {
			s.Close()
		}
	}()
	lc := net.ListenConfig{}
	if s.control, err = lc.Listen(s.ctx, "tcp", s.cfg.Control); err != nil {
		return fmt.Errorf("control listener: %w", err)
	}
	relayAddr := netip.AddrPortFrom(s.cfg.advertise, uint16(s.cfg.Relay))
	if s.relay, err = lc.Listen(s.ctx, "tcp", relayAddr.String()); err != nil {
		return fmt.Errorf("relay listener: %w", err)
	}
	s.relayAP = netip.MustParseAddrPort(s.relay.Addr().String())
	s.goServe("control", s.control, s.handleTunnel)
	s.goServe("relay", s.relay, s.handleRelay)
	if s.cfg.Socks5 != nil {
		if s.socksLn, err = lc.Listen(s.ctx, "tcp", s.cfg.Socks5.Listen); err != nil {
			return fmt.Errorf("socks5 listener: %w", err)
		}
		var routes registry.Reader = s.reg
		if _, local := s.reg.(*registry.Memory); !local {
			// Routes of other members come from the shared store:
			// cache them, and let change events refresh the cache.
			s.cache = registry.NewCache(s.reg, s.cfg.Cache.Options())
			routes = s.cache
		}
		s.socks = socks.New(*s.cfg.Socks5, routes, s.log)
		s.wg.Add(1)
		go func() { defer s.wg.Done(); _ = s.socks.Serve(s.socksLn) }()
	}
	if s.cfg.Admin != "" {
		if s.adminSrv, err = admin.Listen(s.cfg.Admin, s.adminHandler(), s.log); err != nil {
			return fmt.Errorf("admin listener: %w", err)
		}
	}
	s.wg.Add(2)
	go s.renewLoop()
	go s.watchLoop()
	close(s.started)
	s.log.Info("proxy server started", "server", s.cfg.ServerID, "control", s.control.Addr().String(),
		"relay", s.relay.Addr().String(), "advertise", s.cfg.advertise.String(), "ports", s.cfg.Ports)
	return nil
}

// Ready is closed once Start has bound every listener (control, relay,
// admin, SOCKS5): systemd's READY=1.
func (s *Server) Ready() <-chan struct{} { return s.started }

// ControlAddr, RelayAddr, APIAddr and SocksAddr return the bound addresses.
func (s *Server) ControlAddr() net.Addr { return s.control.Addr() }
func (s *Server) RelayAddr() net.Addr   { return s.relay.Addr() }
func (s *Server) APIAddr() net.Addr {
	if s.adminSrv == nil {
		return nil
	}
	return s.adminSrv.Addr()
}
func (s *Server) SocksAddr() net.Addr {
	if s.socksLn == nil {
		return nil
	}
	return s.socksLn.Addr()
}

func (s *Server) goServe(name string, ln net.Listener, handle func(net.Conn)) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		_ = netx.AcceptLoop(ln, s.log.With("listener", name), func(c net.Conn) {
			s.spawn(func() { handle(c) })
		})
	}()
}

// Run serves until ctx ends, then drains (Shutdown) and closes. A
// cancelled hard context cuts the drain short.
func (s *Server) Run(ctx, hard context.Context) error {
	if err := s.Start(); err != nil {
		return err
	}
	<-ctx.Done()
	s.Shutdown(hard)
	return nil
}

// Reload is called on SIGHUP. Nothing is reloadable yet.
func (s *Server) Reload() {
	s.log.Info("reload: nothing to reload in this version; configuration unchanged")
}

// Shutdown drains the server: it stops accepting tunnels, asks every
// agent to move, withdraws its routes once the agents have moved (or half
// the grace period passed), waits for open connections until the grace
// period ends or hard is cancelled, then closes everything.
func (s *Server) Shutdown(hard context.Context) {
	start := time.Now()
	s.draining.Store(true)
	s.log.Info("draining", "grace", s.cfg.DrainGrace)
	if s.control != nil {
		s.control.Close()
	}
	for _, as := range s.sessionList() {
		s.spawn(func() { _ = as.ts.Send(&tunnel.Control{Type: tunnel.MsgMove, Reason: "server draining"}) })
	}
	deadline := start.Add(s.cfg.DrainGrace)
	moveBy := start.Add(s.cfg.DrainGrace / 2)
	for len(s.sessionList()) > 0 && time.Now().Before(moveBy) && hard.Err() == nil {
		select {
		case <-hard.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
	s.mu.Lock()
	rs := make([]*route, 0, len(s.routes))
	for _, r := range s.routes {
		rs = append(rs, r)
	}
	s.mu.Unlock()
	for _, r := range rs {
		s.removeRoute(r, true)
	}
	done := make(chan struct{})
	go func() { s.conns.Wait(); close(done) }()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		s.log.Warn("drain grace period over; closing open connections")
	case <-hard.Done():
	}
	s.Close()
	s.log.Info("stopped")
}

// Close stops everything at once and waits for every goroutine.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	for _, ln := range []net.Listener{s.control, s.relay} {
		if ln != nil {
			ln.Close()
		}
	}
	if s.adminSrv != nil {
		s.adminSrv.Close()
	}
	if s.socks != nil {
		s.socks.Close()
	}
	for _, as := range s.sessionList() {
		as.ts.Close()
	}
	s.mu.Lock()
	for _, r := range s.routes {
		r.ln.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

func (s *Server) sessionList() []*agentSession {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*agentSession, 0, len(s.sessions))
	for as := range s.sessions {
		out = append(out, as)
	}
	return out
}

// Draining reports whether Shutdown has begun.
func (s *Server) Draining() bool { return s.draining.Load() }

func (s *Server) regCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 3*time.Second)
}

// renewLoop renews every owned route each Lease/3, re-creating records the
// store lost. While the store errors it retries sooner, backing off from
// 250 ms to the renewal interval. A route another session took over is
// closed here and its agent told.
func (s *Server) renewLoop() {
	defer s.wg.Done()
	interval := s.cfg.Lease / 3
	retry := 250 * time.Millisecond
	t := time.NewTimer(interval)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		case <-s.renewNow:
			if !t.Stop() {
				<-t.C
			}
		}
		next := interval
		if failed := s.renewAll(); failed > 0 {
			next = min(retry, interval)
			retry = min(2*retry, interval)
			s.log.Warn("route renewals failed; retrying", "failed", failed, "retry_in", next)
		} else {
			retry = 250 * time.Millisecond
		}
		t.Reset(next)
	}
}

// renewAll renews every route once and returns how many were not renewed
// for a reason other than a takeover.
func (s *Server) renewAll() (failed int) {
	s.mu.Lock()
	rs := make([]*route, 0, len(s.routes))
	for _, r := range s.routes {
		rs = append(rs, r)
	}
	s.mu.Unlock()
	for i, r := range rs {
		if s.ctx.Err() != nil {
			return failed + len(rs) - i
		}
		ctx, cancel := s.regCtx()
		err := s.reg.Renew(ctx, r.info, s.cfg.Lease)
		cancel()
		switch {
		case errors.Is(err, registry.ErrStale), errors.Is(err, registry.ErrOwned):
			s.supersede(r, err)
		case err != nil:
			s.Stats.RegistryErrors.Add(1)
			s.log.Debug("route renewal failed", "target", r.key.String(), "err", err)
			failed++
			if timedOut(err) {
				// The registry hangs (its host gone): one timeout per
				// round, not one per route; the rest wait for the retry.
				// Fast errors go on: in a Redis Cluster one master down
				// fails only its own slots.
				return failed + len(rs) - i - 1
			}
		}
	}
	return failed
}

func timedOut(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}

// kickRenewal asks for a renewal round now.
func (s *Server) kickRenewal() {
	select {
	case s.renewNow <- struct{}{}:
	default:
	}
}

// watchLoop follows the registry's change events: they refresh the SOCKS5
// cache, a put by another session of a key this member serves triggers a
// renewal round (which closes the route if the other session is newer),
// and a gap in events (the store reconnected, maybe restarted empty)
// re-asserts every route at once. Events are hints: the renewal loop and
// the cache TTL work without them.
func (s *Server) watchLoop() {
	defer s.wg.Done()
	registry.Follow(s.ctx, s.reg, s.log, s.onEvent)
}

func (s *Server) onEvent(ev registry.Event) {
	if s.cache != nil {
		s.cache.Apply(ev)
	}
	switch ev.Type {
	case registry.EventReset:
		s.kickRenewal()
	case registry.EventPut:
		s.mu.Lock()
		r := s.routes[ev.Key]
		s.mu.Unlock()
		if r != nil && r.info.Session != ev.Route.Session {
			s.kickRenewal()
		}
	}
}

// supersede drops a route someone else now owns and tells its session.
func (s *Server) supersede(r *route, why error) {
	s.log.Warn("route superseded; closing its proxy port", "target", r.key.String(),
		"agent", r.sess.agent, "session", r.sess.id, "err", why)
	s.removeRoute(r, false)
	s.mu.Lock()
	ts := r.sess.ts // nil while that session is still in its handshake
	s.mu.Unlock()
	if ts == nil {
		return
	}
	s.spawn(func() {
		_ = ts.Send(&tunnel.Control{Type: tunnel.MsgSuperseded, Targets: []tunnel.Target{r.target}, Reason: why.Error()})
	})
}

// spawn runs f in a goroutine the server owns.
func (s *Server) spawn(f func()) {
	s.wg.Add(1)
	go func() { defer s.wg.Done(); f() }()
}
