package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/internal/proxyproto"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// agentSession is one live agent tunnel.
type agentSession struct {
	ts       *tunnel.Session
	agent    string
	identity string
	id       string
	gen      uint64
	remote   string
	started  time.Time
	streams  atomic.Int64
	routes   map[registry.Key]*route // guarded by Server.mu
	// What it authenticated with, re-checked when credentials reload.
	token string
	cert  *x509.Certificate
}

// newer reports whether a outranks b (generation, then session id).
func (a *agentSession) newer(b *agentSession) bool {
	if a.gen != b.gen {
		return a.gen > b.gen
	}
	return a.id > b.id
}

// route is a target this server forwards: its proxy listener and record.
type route struct {
	key    registry.Key
	target tunnel.Target
	port   int
	ln     net.Listener
	sess   *agentSession
	info   registry.Route
	served bool // accept loop started; guarded by Server.mu
	// ready is closed when served is set: the relay waits on it for a
	// route whose record is in the registry while its session finishes
	// the handshake.
	ready chan struct{}
}

// handleTunnel runs one agent connection from the hello to its end.
func (s *Server) handleTunnel(conn net.Conn) {
	remote := conn.RemoteAddr().String()
	if len(s.cfg.balancers) > 0 {
		ap, local, err := proxyproto.Accept(conn, s.cfg.balancers, s.cfg.Tunnel.HelloTimeout)
		if errors.Is(err, io.EOF) { // closed before a byte: a plain TCP check
			s.log.Debug("balancer connection closed before its PROXY header", "balancer", remote)
			conn.Close()
			return
		}
		if err != nil {
			s.refused("proxy_header")
			s.log.Warn("tunnel refused: bad PROXY protocol header from a balancer", "balancer", remote, "err", err)
			conn.Close()
			return
		}
		if local { // the balancer's own health check
			s.log.Debug("balancer health check", "balancer", remote)
			conn.Close()
			return
		}
		remote = ap.String()
	}
	if !s.admitSource(remote) {
		s.Stats.SourceCapped.Add(1)
		s.refusals.Inc(tunnel.RefuseLimit)
		s.log.Warn("tunnel refused: too many control connections from this source", "remote", remote,
			"limit", s.cfg.MaxTunnelsPerSource)
		tunnel.Refuse(conn, &tunnel.Refusal{Code: tunnel.RefuseLimit, Reason: "too many tunnels from this address"})
		return
	}
	defer s.releaseSource(remote)
	auth := s.auth.Load()
	var cert *x509.Certificate
	if auth.tls != nil {
		tc := tls.Server(conn, auth.tls)
		_ = conn.SetDeadline(time.Now().Add(s.cfg.Tunnel.HelloTimeout))
		if err := tc.Handshake(); err != nil {
			s.refused("tls")
			s.log.Warn("tunnel refused: TLS handshake failed", "remote", remote, "err", err)
			conn.Close()
			return
		}
		if pcs := tc.ConnectionState().PeerCertificates; len(pcs) > 0 {
			cert = pcs[0]
		}
		conn = tc
	}
	hello, err := tunnel.ReadHello(conn, s.cfg.Tunnel)
	if errors.Is(err, tunnel.ErrNoHello) {
		// Closed before a byte: a TCP health check, or a port scan.
		s.log.Debug("control connection closed before its hello", "remote", remote)
		conn.Close()
		return
	}
	if err != nil {
		s.refused("handshake")
		s.log.Warn("tunnel handshake failed", "remote", remote, "err", err)
		if errors.Is(err, tunnel.ErrProtocol) && !errors.Is(err, tunnel.ErrBadMagic) {
			tunnel.Refuse(conn, &tunnel.Refusal{Code: tunnel.RefuseProtocol, Reason: err.Error()})
		} else {
			conn.Close()
		}
		return
	}
	log := s.log.With("remote", remote, "agent", hello.AgentID, "session", hello.SessionID)
	refuse := func(code, reason string) {
		s.refused(code)
		log.Warn("tunnel refused", "audit", "refusal", "code", code, "reason", reason)
		tunnel.Refuse(conn, &tunnel.Refusal{Code: code, Reason: reason})
	}
	version, err := tunnel.Negotiate(hello.MinVersion, hello.MaxVersion)
	if err != nil {
		refuse(tunnel.RefuseVersion, err.Error())
		return
	}
	if version < auth.minVer {
		refuse(tunnel.RefuseVersion, fmt.Sprintf("protocol version %d is below this server's minimum %d: upgrade the agent",
			version, auth.minVer))
		return
	}
	identity, token, code, reason := auth.authenticate(conn, hello, version, cert)
	if code != "" {
		refuse(code, reason)
		return
	}
	if s.draining.Load() {
		refuse(tunnel.RefuseDraining, "server is draining; connect to another member")
		return
	}
	as := &agentSession{agent: hello.AgentID, identity: identity, id: hello.SessionID,
		gen: hello.Generation, remote: remote, started: time.Now(), routes: map[registry.Key]*route{},
		token: token, cert: cert}
	made, refused := s.claim(as, hello.Targets)
	ts, err := tunnel.Accept(conn, &tunnel.Welcome{Version: version, ServerID: s.cfg.ServerID,
		Routes: made, Refused: refused, SpliceWindow: hello.SpliceWindow}, s.cfg.Tunnel)
	if err != nil {
		log.Warn("tunnel setup failed", "err", err)
		s.dropSession(as)
		return
	}
	s.mu.Lock()
	as.ts = ts
	if s.closed {
		s.mu.Unlock()
		ts.Close()
		s.dropSession(as)
		return
	}
	s.sessions[as] = struct{}{}
	s.mu.Unlock()
	s.Stats.Tunnels.Add(1)
	log.Info("agent session started", "audit", "session_start", "identity", identity, "version", version, "generation", hello.Generation,
		"routes", len(made), "refused", len(refused))
	for _, r := range refused {
		log.Warn("target refused", "target", r.Target.String(), "reason", r.Reason)
	}
	s.serveRoutes(as)
	s.spawn(func() { s.rejectStreams(as) })
	s.controlLoop(as, log)
	ts.Close()
	s.dropSession(as)
	s.Stats.Tunnels.Add(-1)
	log.Info("agent session ended", "audit", "session_end", "identity", identity)
}

// admitSource counts a control connection from remote (ip:port) against
// the per-source cap; false if the cap is reached.
func (s *Server) admitSource(remote string) bool {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	a := ap.Addr().Unmap()
	if s.perSource[a] >= s.cfg.MaxTunnelsPerSource {
		return false
	}
	s.perSource[a]++
	return true
}

func (s *Server) releaseSource(remote string) {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	a := ap.Addr().Unmap()
	if s.perSource[a]--; s.perSource[a] <= 0 {
		delete(s.perSource, a)
	}
}

// rejectStreams closes every stream the agent opens: in this protocol the
// agent opens only the control stream. Accepting them keeps yamux's
// backlog from filling.
func (s *Server) rejectStreams(as *agentSession) {
	for {
		st, err := as.ts.Mux.AcceptStream()
		if err != nil {
			return
		}
		s.log.Warn("agent opened a data stream; closing it", "agent", as.agent, "session", as.id)
		st.Close()
	}
}

// controlLoop reads the agent's control messages until the session ends.
func (s *Server) controlLoop(as *agentSession, log interface {
	Info(string, ...any)
	Warn(string, ...any)
}) {
	for {
		m, err := as.ts.Recv()
		if err != nil {
			if errors.Is(err, tunnel.ErrProtocol) {
				log.Warn("protocol error on control stream; closing session", "err", err)
				_ = as.ts.Send(&tunnel.Control{Type: tunnel.MsgRefusal, Code: tunnel.RefuseProtocol, Reason: err.Error()})
			}
			return
		}
		switch m.Type {
		case tunnel.MsgAdd:
			if err := tunnel.ValidateTargets(m.Targets); err != nil {
				_ = as.ts.Send(&tunnel.Control{Type: tunnel.MsgRefusal, Code: tunnel.RefuseProtocol, Reason: err.Error()})
				return
			}
			made, refused := s.claim(as, m.Targets)
			s.serveRoutes(as)
			log.Info("targets added", "routes", len(made), "refused", len(refused))
			_ = as.ts.Send(&tunnel.Control{Type: tunnel.MsgRoutes, Routes: made, Refused: refused})
		case tunnel.MsgRemove:
			for _, t := range m.Targets {
				s.mu.Lock()
				r := as.routes[registry.Key{Network: t.Network, Addr: t.Addr}]
				s.mu.Unlock()
				if r != nil {
					s.removeRoute(r, true)
				}
			}
			log.Info("targets removed", "count", len(m.Targets))
		case tunnel.MsgWithdraw:
			s.mu.Lock()
			rs := make([]*route, 0, len(as.routes))
			for _, r := range as.routes {
				rs = append(rs, r)
			}
			s.mu.Unlock()
			for _, r := range rs {
				s.removeRoute(r, true)
			}
			log.Info("agent withdrew its routes", "count", len(rs))
			_ = as.ts.Send(&tunnel.Control{Type: tunnel.MsgWithdrawn})
		default:
			log.Warn("unknown control message ignored", "type", m.Type)
		}
	}
}

// claim makes routes for targets on behalf of as: ownership checks
// against local routes, a port, a listener, a registry record. Listeners
// are not served until serveRoutes.
// claimBudget bounds the registry writes of one claim (a hello's targets):
// a registry that hangs (its host gone) must not outlast the agent's
// handshake deadline. What is not registered in time is served locally and
// registered by the renewal loop.
const claimBudget = 2 * time.Second

func (s *Server) claim(as *agentSession, targets []tunnel.Target) ([]tunnel.RouteInfo, []tunnel.TargetRefusal) {
	var made []tunnel.RouteInfo
	var refused []tunnel.TargetRefusal
	c := &claimRun{}
	c.ctx, c.cancel = context.WithTimeout(s.ctx, claimBudget)
	defer c.cancel()
	for _, t := range targets {
		t.Addr = netip.AddrPortFrom(t.Addr.Addr().Unmap(), t.Addr.Port())
		r, err := s.claimOne(as, t, c)
		if err != nil {
			refused = append(refused, tunnel.TargetRefusal{Target: t, Reason: err.Error()})
			continue
		}
		made = append(made, tunnel.RouteInfo{Target: t, Proxy: r.info.Proxy})
	}
	return made, refused
}

var errRegistryDown = errors.New("registry unavailable earlier in this claim")

// claimRun is the registry state shared by the claims of one hello.
type claimRun struct {
	ctx    context.Context
	cancel context.CancelFunc
	// down is set after a registry error: the remaining routes of this
	// claim are served locally without another wait.
	down bool
}

func (s *Server) claimOne(as *agentSession, t tunnel.Target, c *claimRun) (*route, error) {
	key := registry.Key{Network: t.Network, Addr: t.Addr}
	if t.Network != "" {
		if err := registry.ValidNetwork(t.Network); err != nil {
			return nil, err
		}
	}
	if !s.auth.Load().allows(as.identity, key) {
		s.log.Warn("audit: claim refused by policy", "identity", as.identity, "agent", as.agent,
			"session", as.id, "remote", as.remote, "target", key.String())
		return nil, fmt.Errorf("%w: identity %q may not expose %s", errPolicy, as.identity, key)
	}
	s.mu.Lock()
	old := s.routes[key]
	s.mu.Unlock()
	if old != nil {
		switch {
		case old.sess == as:
			return nil, errors.New("target listed twice")
		case old.sess.identity != as.identity:
			return nil, registry.ErrOwned
		case !as.newer(old.sess):
			return nil, registry.ErrStale
		}
		if old.sess.agent != as.agent {
			s.log.Warn("two agents claim one target under one identity; the newer session wins",
				"target", key.String(), "old_agent", old.sess.agent, "new_agent", as.agent)
		}
		s.supersede(old, fmt.Errorf("superseded by session %s", as.id))
	}
	ln, port, err := s.listenProxy(key, int(t.Port))
	if err != nil {
		return nil, err
	}
	r := &route{key: key, target: t, port: port, ln: ln, sess: as, ready: make(chan struct{}), info: registry.Route{
		Key:   key,
		Proxy: netip.AddrPortFrom(s.cfg.advertise, uint16(port)), Relay: s.relayAP,
		Agent: as.agent, Identity: as.identity, Server: s.cfg.ServerID, Session: as.id,
		Generation: as.gen, Registered: time.Now().UTC(),
	}}
	// The route is this member's before its record is written, so that a
	// relay request that follows the record finds it.
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil, errors.New("server closed")
	}
	s.routes[key] = r
	as.routes[key] = r
	s.mu.Unlock()
	err = errRegistryDown
	if !c.down {
		err = s.reg.Register(c.ctx, r.info, s.cfg.Lease)
	}
	if errors.Is(err, registry.ErrStale) || errors.Is(err, registry.ErrOwned) {
		s.removeRoute(r, false)
		return nil, err
	}
	if err != nil {
		c.down = c.down || timedOut(err)
		// The registry is down: serve the route on this member anyway;
		// the renewal loop registers it when the registry is back.
		s.Stats.RegistryErrors.Add(1)
		s.log.Warn("route registration failed; serving locally, will retry", "target", key.String(), "err", err)
	}
	return r, nil
}

// listenProxy binds a proxy port for key on the member address.
func (s *Server) listenProxy(key registry.Key, fixed int) (net.Listener, int, error) {
	skip := map[int]bool{}
	for range 16 {
		port, err := s.ports.Take(key, fixed, skip)
		if err != nil {
			return nil, 0, err
		}
		addr := net.JoinHostPort(s.cfg.proxyBind.String(), strconv.Itoa(port))
		ln, err := net.Listen("tcp", addr)
		if err == nil {
			return ln, port, nil
		}
		s.ports.Drop(port)
		if fixed != 0 {
			return nil, 0, fmt.Errorf("fixed proxy port %d: %w", fixed, err)
		}
		skip[port] = true
	}
	return nil, 0, ErrNoPort
}

// serveRoutes starts the accept loops of as's routes not yet served.
func (s *Server) serveRoutes(as *agentSession) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range as.routes {
		if r.served {
			continue
		}
		r.served = true
		close(r.ready)
		s.goServe("proxy "+r.key.String(), r.ln, func(c net.Conn) { s.handleProxyConn(r, c) })
	}
}

// removeRoute closes a route's listener, frees its port and, when
// deregister is set, deletes its record if it is still this session's.
func (s *Server) removeRoute(r *route, deregister bool) {
	s.mu.Lock()
	if s.routes[r.key] == r {
		delete(s.routes, r.key)
	}
	delete(r.sess.routes, r.key)
	s.mu.Unlock()
	if r.ln.Close() == nil {
		s.ports.Release(r.port)
	}
	if deregister {
		ctx, cancel := s.regCtx()
		if err := s.reg.Deregister(ctx, r.key, r.sess.id); err != nil {
			s.Stats.RegistryErrors.Add(1)
			s.log.Warn("route deregistration failed; its lease will expire", "target", r.key.String(), "err", err)
		}
		cancel()
	}
}

// dropSession removes every route of a session that ended.
func (s *Server) dropSession(as *agentSession) {
	s.mu.Lock()
	delete(s.sessions, as)
	rs := make([]*route, 0, len(as.routes))
	for _, r := range as.routes {
		rs = append(rs, r)
	}
	s.mu.Unlock()
	for _, r := range rs {
		s.removeRoute(r, true)
	}
}

// openStream opens a data stream to the agent for hdr and waits for its
// status. On StatusOK the caller owns the stream and must call
// as.endStream when done.
func (s *Server) openStream(as *agentSession, hdr *tunnel.StreamHeader) (net.Conn, tunnel.Status) {
	if n := as.streams.Add(1); n > int64(s.cfg.Tunnel.MaxStreams) {
		as.streams.Add(-1)
		s.Stats.StreamsAtCap.Add(1)
		s.log.Warn("stream limit reached; connection refused", "agent", as.agent, "session", as.id,
			"limit", s.cfg.Tunnel.MaxStreams)
		return nil, tunnel.StatusBusy
	}
	var stream net.Conn
	fail := func(st tunnel.Status) (net.Conn, tunnel.Status) {
		if stream != nil {
			as.ts.ForgetSpliced(stream)
			stream.Close()
		}
		as.streams.Add(-1)
		s.dialFailures.Inc(st.String())
		return nil, st
	}
	ys, err := as.ts.Mux.OpenStream()
	if err != nil {
		return fail(tunnel.StatusUnreachable)
	}
	stream = ys
	hdr.Spliced = hdr.Spliced && as.ts.PrepareSpliced(stream)
	if _, err := stream.Write(hdr.Append(make([]byte, 0, tunnel.MaxHeaderSize), as.ts.Version)); err != nil {
		return fail(tunnel.StatusUnreachable)
	}
	_ = stream.SetReadDeadline(time.Now().Add(s.cfg.StatusTimeout))
	st, err := tunnel.ReadStatus(stream)
	_ = stream.SetReadDeadline(time.Time{})
	if err != nil {
		return fail(tunnel.StatusUnreachable)
	}
	if st != tunnel.StatusOK {
		return fail(st)
	}
	s.Stats.StreamsOpened.Add(1)
	s.Stats.StreamsOpen.Add(1)
	return stream, st
}

func (s *Server) endStream(as *agentSession) {
	as.streams.Add(-1)
	s.Stats.StreamsOpen.Add(-1)
}

// handleProxyConn forwards one connection on a route's proxy port.
func (s *Server) handleProxyConn(r *route, c net.Conn) {
	if !allowed(s.cfg.proxyAllow, c) {
		s.sourceDenied("proxy port", c)
		return
	}
	s.conns.Add(1)
	defer s.conns.Done()
	netx.KeepAlive(c, 30*time.Second, 10*time.Second, 3)
	_, tcp := c.(*net.TCPConn) // spliced frames need the socket
	stream, st := s.openStream(r.sess, &tunnel.StreamHeader{Generation: r.sess.gen, Target: r.target,
		Client: c.RemoteAddr().String(), Spliced: tcp})
	if st != tunnel.StatusOK {
		s.log.Debug("proxy connection failed", "target", r.key.String(), "status", st.String())
		netx.Reset(c)
		return
	}
	defer s.endStream(r.sess)
	r.sess.ts.Splice(c, stream, s.cfg.IdleTimeout, &s.bytes)
}

// relayPreambleTimeout bounds the read of a relay preamble.
const relayPreambleTimeout = 5 * time.Second

// servedRoute returns key's route once it is served. A route whose
// session is still in its handshake may already be in the registry (and so
// in a socks5d cache): wait for it, within the status timeout.
func (s *Server) servedRoute(key registry.Key) *route {
	s.mu.Lock()
	r := s.routes[key]
	served := r != nil && r.served
	s.mu.Unlock()
	if r == nil || served {
		return r
	}
	t := time.NewTimer(s.cfg.StatusTimeout)
	defer t.Stop()
	select {
	case <-r.ready:
	case <-t.C:
	case <-s.ctx.Done():
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.routes[key] == r && r.served {
		return r
	}
	return nil
}

// handleRelay serves one connection on the relay port: preamble, route and
// generation check, stream, status, data.
func (s *Server) handleRelay(c net.Conn) {
	if !allowed(s.cfg.relayAllow, c) {
		s.sourceDenied("relay port", c)
		return
	}
	s.conns.Add(1)
	defer s.conns.Done()
	_ = c.SetReadDeadline(time.Now().Add(relayPreambleTimeout))
	p, version, err := tunnel.ReadRelayPreamble(c)
	_ = c.SetReadDeadline(time.Time{})
	answer := func(st tunnel.Status, msg string, args ...any) {
		s.Stats.RelayRefusals.Add(1)
		if s.relayLog.Allow() { // per connection: rate-limited
			s.log.Info(msg, append(args, "client", c.RemoteAddr().String(), "status", st.String(),
				"suppressed", s.relayLog.Suppressed())...)
		}
		_ = c.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = c.Write([]byte{byte(st)})
		c.Close()
	}
	if err == io.EOF { // closed before a byte: a port check, not a client
		s.log.Debug("relay connection closed before its preamble", "client", c.RemoteAddr().String())
		c.Close()
		return
	}
	if err != nil {
		answer(tunnel.StatusBadHeader, "bad relay preamble", "err", err)
		return
	}
	key := registry.Key{Network: p.Target.Network, Addr: p.Target.Addr}
	r := s.servedRoute(key)
	switch {
	case r == nil:
		answer(tunnel.StatusNoRoute, "relay: no route on this member", "target", key.String())
		return
	case r.sess.gen != p.Generation:
		answer(tunnel.StatusStale, "relay: stale generation refused", "target", key.String(),
			"want", r.sess.gen, "got", p.Generation)
		return
	}
	netx.KeepAlive(c, 30*time.Second, 10*time.Second, 3)
	// A raw relay (version 1) is spliced like a proxy port; a framed one
	// passes the front end's frames through as yamux data.
	_, tcp := c.(*net.TCPConn)
	stream, st := s.openStream(r.sess, &tunnel.StreamHeader{Generation: r.sess.gen, Target: r.target, Client: p.Client,
		Spliced: tcp && version == tunnel.RelayVersionRaw})
	if st != tunnel.StatusOK {
		answer(st, "relay: agent could not connect", "target", key.String())
		return
	}
	defer s.endStream(r.sess)
	if _, err := c.Write([]byte{byte(tunnel.StatusOK)}); err != nil {
		r.sess.ts.ForgetSpliced(stream)
		stream.Close()
		c.Close()
		return
	}
	if version == tunnel.RelayVersionRaw {
		r.sess.ts.Splice(c, stream, s.cfg.IdleTimeout, &s.bytes)
		return
	}
	// Framed on both sides: pass the frames through untouched (the bytes
	// counted include their 4-byte frame headers). If this member dies,
	// the front end sees its relay end without an end marker: an abort.
	_, _, _ = netx.JoinCounted(c, nil, closeOnHalfClose{stream}, s.cfg.IdleTimeout, &s.bytes.Up, &s.bytes.Down)
}

// closeOnHalfClose is a framed stream whose half-close is a close: when
// the relay connection ends, its end markers (if any) have passed already,
// and without them the agent must see an abort at once, not wait for the
// idle timeout.
type closeOnHalfClose struct{ net.Conn }

func (c closeOnHalfClose) CloseWrite() error { return c.Close() }

// sourceDenied resets a connection from a source outside the allow list,
// with a counter and a rate-limited log line (a scan must not flood it).
func (s *Server) sourceDenied(where string, c net.Conn) {
	s.Stats.SourceDenied.Add(1)
	netx.Reset(c)
	if s.deniedLog.Allow() {
		s.log.Warn("connection refused: source not allowed", "where", where, "remote", c.RemoteAddr().String(),
			"refused_so_far", s.Stats.SourceDenied.Load(), "suppressed", s.deniedLog.Suppressed())
	}
}
