// Package agent is the vpcreach agent: it keeps a reverse tunnel to the
// proxy cluster open for ever and serves the streams the servers open on
// it, dialling only the targets it exposes.
package agent

import (
	"context"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	crand "crypto/rand"

	"github.com/vpcreach/vpcreach/internal/admin"
	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// Stats are the agent's counters.
type Stats struct {
	Sessions     atomic.Int64 // live sessions (2 during a move)
	Reconnects   atomic.Int64
	StreamsOpen  atomic.Int64
	StreamsAtCap atomic.Int64
	NotExposed   atomic.Int64 // streams refused: target not exposed
	DialFailures atomic.Int64
	StreamsTotal atomic.Int64 // streams connected to their target
	DialRefused  atomic.Int64 // dial failures: the target refused
	Bytes        tunnel.Counters
}

// Agent keeps the tunnel and serves its streams.
type Agent struct {
	live  atomic.Pointer[liveConfig] // replaced whole by Apply
	log   *slog.Logger
	Stats Stats

	// MinVersion and MaxVersion are the protocol range announced in the
	// hello; tests lower MaxVersion to play an older agent.
	MinVersion, MaxVersion int

	genMu   sync.Mutex
	lastGen uint64
	// hard is Run's hard context (the second signal): retired sessions
	// stop waiting out their grace period when it ends. Set before the
	// first retire.
	hard    context.Context
	applyMu sync.Mutex // one Apply at a time

	mu       sync.Mutex
	sessions map[*session]struct{}
	current  *session
	draining atomic.Bool
	wg       sync.WaitGroup // session goroutines and stream handlers
	adminSrv *admin.Server  // guarded by mu
}

// New builds an agent from a validated config.
func New(cfg Config, log *slog.Logger) (*Agent, error) {
	lc, err := loadLive(cfg)
	if err != nil {
		return nil, err
	}
	a := &Agent{log: log, MinVersion: tunnel.MinVersion,
		MaxVersion: tunnel.MaxVersion, sessions: map[*session]struct{}{}}
	a.live.Store(lc)
	return a, nil
}

// liveConfig is the configuration in force, its token and TLS settings.
type liveConfig struct {
	Config
	token string
	tls   *tls.Config // nil: plain TCP
}

// loadLive reads the files a configuration names.
func loadLive(cfg Config) (*liveConfig, error) {
	lc := &liveConfig{Config: cfg}
	if cfg.Token.IsSet() {
		tok, err := cfg.Token.Read()
		if err != nil {
			return nil, fmt.Errorf("token: %w", err)
		}
		lc.token = tok
	}
	if cfg.TLS != nil {
		tc, err := cfg.TLS.Config()
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		tc.MinVersion = tls.VersionTLS13
		if tc.ServerName == "" {
			tc.ServerName = serverName(cfg.Servers)
		}
		lc.tls = tc
	}
	return lc, nil
}

// serverName is the host of the first server address: the name the
// server's certificate is checked against unless tls.server_name says.
func serverName(servers []string) string {
	if len(servers) == 0 {
		return ""
	}
	host, _, err := net.SplitHostPort(servers[0])
	if err != nil {
		return servers[0]
	}
	return host
}

// conf returns the configuration in force.
func (a *Agent) conf() *liveConfig { return a.live.Load() }

// session is one tunnel session of the agent.
type session struct {
	ts        *tunnel.Session
	id        string
	gen       uint64
	server    string
	local     netip.Addr                                     // this host's address towards the server
	exposed   atomic.Pointer[map[registry.Key]exposedTarget] // replaced on reload
	routes    []tunnel.RouteInfo
	streams   atomic.Int64
	active    sync.WaitGroup // open streams
	activeMu  sync.Mutex     // orders active.Add against closing
	closing   bool           // no new stream is counted in active after this
	moveCh    chan struct{}  // closed on a move request
	moveMu    sync.Once
	withdrawn chan struct{} // closed when the server confirms a withdraw
	wdOnce    sync.Once
}

// nextGen mints a generation: session-start wall-clock nanoseconds, kept
// monotonic within the process.
func (a *Agent) nextGen() uint64 {
	a.genMu.Lock()
	defer a.genMu.Unlock()
	g := uint64(time.Now().UnixNano())
	if g <= a.lastGen {
		g = a.lastGen + 1
	}
	a.lastGen = g
	return g
}

func newSessionID() string {
	var b [12]byte
	_, _ = crand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// backoff returns the wait before reconnect attempt n (n >= 0): full
// jitter over an exponential ceiling starting at 250 ms.
func (a *Agent) backoff(n int) time.Duration {
	ceil := 250 * time.Millisecond
	for i := 0; i < n && ceil < a.conf().BackoffMax; i++ {
		ceil *= 2
	}
	if ceil > a.conf().BackoffMax {
		ceil = a.conf().BackoffMax
	}
	return time.Duration(rand.Int64N(int64(ceil) + 1))
}

// Routes returns the routes of the current session (nil when down).
func (a *Agent) Routes() []tunnel.RouteInfo {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.current == nil {
		return nil
	}
	return append([]tunnel.RouteInfo(nil), a.current.routes...)
}

// YamuxStreams returns the number of yamux streams open in all live
// sessions, control streams included.
func (a *Agent) YamuxStreams() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for s := range a.sessions {
		n += s.ts.Mux.NumStreams()
	}
	return n
}

// Reload is called on SIGHUP. Nothing is reloadable yet.
func (a *Agent) Reload() {
	a.log.Info("reload: nothing to reload in this version; configuration unchanged")
}

// Run keeps a tunnel up until ctx ends, then drains: it withdraws its
// routes, stops taking streams, waits up to the grace period (or until
// hard is cancelled) for open ones, and returns nil.
func (a *Agent) Run(ctx, hard context.Context) error {
	a.hard = hard
	if a.conf().Admin != "" {
		srv, err := admin.Listen(a.conf().Admin, a.adminHandler(), a.log)
		if err != nil {
			return fmt.Errorf("admin listener: %w", err)
		}
		a.mu.Lock()
		a.adminSrv = srv
		a.mu.Unlock()
		defer srv.Close()
	}
	attempt := 0
	var prev *session // the session being replaced during a move
	next := 0         // index of the server to try next
	for ctx.Err() == nil {
		s, err := a.connect(ctx, &next)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			wait := a.backoff(attempt)
			attempt++
			a.log.Warn("cannot connect to any server; retrying", "err", err, "retry_in", wait.Round(time.Millisecond))
			sleep(ctx, wait)
			continue
		}
		attempt = 0
		if prev != nil {
			a.retire(prev, "moved to a new session")
			prev = nil
		}
		switch a.wait(ctx, s) {
		case endMove:
			prev = s
		case endClosed:
			a.Stats.Reconnects.Add(1)
			sleep(ctx, a.backoff(0))
		case endCtx:
		}
	}
	a.drain()
	return nil
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

type end int

const (
	endClosed end = iota
	endMove
	endCtx
)

func (a *Agent) wait(ctx context.Context, s *session) end {
	select {
	case <-s.ts.Mux.CloseChan():
		a.log.Warn("tunnel lost; reconnecting", "server", s.server, "session", s.id)
		return endClosed
	case <-s.moveCh:
		a.log.Info("server asked us to move; opening a new session first", "server", s.server, "session", s.id)
		return endMove
	case <-ctx.Done():
		return endCtx
	}
}

// connect dials the servers in turn, starting at *next, and returns the
// first session established.
func (a *Agent) connect(ctx context.Context, next *int) (*session, error) {
	var errs []error
	for range a.conf().Servers {
		addr := a.conf().Servers[*next%len(a.conf().Servers)]
		*next++
		s, err := a.dial(ctx, addr)
		if err == nil {
			return s, nil
		}
		if r, ok := tunnel.IsRefusal(err); ok {
			a.log.Error("server refused the tunnel", "server", addr, "code", r.Code, "reason", r.Reason)
		}
		errs = append(errs, fmt.Errorf("%s: %w", addr, err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

func (a *Agent) dial(ctx context.Context, addr string) (*session, error) {
	d := net.Dialer{Timeout: a.conf().ConnectTimeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	local := localAddr(conn)
	exposed, targets := resolveTargets(a.conf().Targets, local)
	s := &session{id: newSessionID(), gen: a.nextGen(), server: addr, local: local,
		moveCh: make(chan struct{}), withdrawn: make(chan struct{})}
	s.exposed.Store(&exposed)
	cf := a.conf()
	if cf.tls != nil {
		tc := tls.Client(conn, cf.tls.Clone())
		hctx, cancel := context.WithTimeout(ctx, cf.Tunnel.WithDefaults().HelloTimeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("tls: %w", err)
		}
		conn = tc
	}
	hello := &tunnel.Hello{MinVersion: a.MinVersion, MaxVersion: a.MaxVersion, AgentID: cf.AgentID,
		SessionID: s.id, Generation: s.gen, Targets: targets, Secret: cf.token}
	switch {
	case cf.token == "":
	case a.MaxVersion >= tunnel.Version3:
		hello.Auth = tunnel.AuthHMAC // the token is proven, never sent
	default:
		hello.Token = cf.token // an older protocol (tests play old agents)
	}
	ts, welcome, err := tunnel.ClientHandshake(conn, hello, cf.Tunnel)
	if err != nil {
		return nil, err
	}
	s.ts, s.routes = ts, welcome.Routes
	a.log.Info("tunnel up", "server", addr, "server_id", welcome.ServerID, "session", s.id,
		"generation", s.gen, "version", ts.Version, "routes", len(welcome.Routes))
	for _, r := range welcome.Routes {
		a.log.Info("route", "target", r.Target.String(), "proxy", r.Proxy.String())
	}
	for _, r := range welcome.Refused {
		a.log.Error("target refused by server", "target", r.Target.String(), "reason", r.Reason)
	}
	a.mu.Lock()
	a.sessions[s] = struct{}{}
	a.current = s
	a.mu.Unlock()
	a.Stats.Sessions.Add(1)
	a.wg.Add(2)
	go a.acceptLoop(s)
	go a.controlLoop(s)
	return s, nil
}

// exposedTarget is a target this agent dials, and whether its
// configuration names the address itself (not ":port", resolved to this
// host): only such targets may be loopback, link-local or metadata.
type exposedTarget struct {
	tunnel.Target
	explicit bool
}

// localAddr is conn's local IP: this host's address on its route to the
// server.
func localAddr(conn net.Conn) netip.Addr {
	if ap, err := netip.ParseAddrPort(conn.LocalAddr().String()); err == nil {
		return ap.Addr().Unmap()
	}
	return netip.Addr{}
}

// resolveTargets turns configured targets into wire targets, filling an
// unspecified IP with local.
func resolveTargets(cfg []TargetConfig, local netip.Addr) (map[registry.Key]exposedTarget, []tunnel.Target) {
	exposed := make(map[registry.Key]exposedTarget, len(cfg))
	targets := make([]tunnel.Target, 0, len(cfg))
	for _, tc := range cfg {
		t, _ := tc.parse() // validated
		explicit := !t.Addr.Addr().IsUnspecified()
		if !explicit {
			t.Addr = netip.AddrPortFrom(local, t.Addr.Port())
		}
		exposed[registry.Key{Network: t.Network, Addr: t.Addr}] = exposedTarget{t, explicit}
		targets = append(targets, t)
	}
	return exposed, targets
}

// acceptLoop hands every stream to its own goroutine at once, so the
// yamux backlog never fills.
func (a *Agent) acceptLoop(s *session) {
	defer a.wg.Done()
	for {
		st, err := s.ts.Mux.AcceptStream()
		if err != nil {
			a.endSession(s)
			return
		}
		if !s.startStream() {
			// The session is draining or retiring: no new stream.
			_ = st.SetWriteDeadline(time.Now().Add(time.Second))
			_, _ = st.Write([]byte{byte(tunnel.StatusDraining)})
			st.Close()
			continue
		}
		a.wg.Add(1)
		go func() {
			run := a.handleStream(s, st)
			if run == nil {
				s.active.Done()
				a.wg.Done()
				return
			}
			// The counts pass to the splice's goroutine.
			go func() {
				defer a.wg.Done()
				defer s.active.Done()
				run()
			}()
		}()
	}
}

// startStream counts a new stream in s.active, unless the session stopped
// taking streams.
func (s *session) startStream() bool {
	s.activeMu.Lock()
	defer s.activeMu.Unlock()
	if s.closing {
		return false
	}
	s.active.Add(1)
	return true
}

// waitStreams stops the session taking new streams and waits for the open
// ones.
func (s *session) waitStreams() {
	s.activeMu.Lock()
	s.closing = true
	s.activeMu.Unlock()
	s.active.Wait()
}

func (a *Agent) endSession(s *session) {
	a.mu.Lock()
	if _, ok := a.sessions[s]; ok {
		delete(a.sessions, s)
		a.Stats.Sessions.Add(-1)
	}
	if a.current == s {
		a.current = nil
	}
	a.mu.Unlock()
}

// controlLoop reads the server's control messages.
func (a *Agent) controlLoop(s *session) {
	defer a.wg.Done()
	log := a.log.With("server", s.server, "session", s.id)
	for {
		m, err := s.ts.Recv()
		if err != nil {
			if errors.Is(err, tunnel.ErrProtocol) {
				log.Error("protocol error on control stream; closing session", "err", err)
			}
			s.ts.Close()
			return
		}
		switch m.Type {
		case tunnel.MsgMove:
			s.moveMu.Do(func() { close(s.moveCh) })
		case tunnel.MsgWithdrawn:
			s.wdOnce.Do(func() { close(s.withdrawn) })
		case tunnel.MsgSuperseded:
			for _, t := range m.Targets {
				log.Warn("route superseded by a newer session of this identity", "target", t.String(), "reason", m.Reason)
			}
		case tunnel.MsgRemove:
			for _, t := range m.Targets {
				log.Warn("server removed a route", "target", t.String(), "reason", m.Reason)
			}
		case tunnel.MsgRoutes:
			for _, r := range m.Routes {
				log.Info("route", "target", r.Target.String(), "proxy", r.Proxy.String())
			}
			for _, r := range m.Refused {
				log.Error("target refused by server", "target", r.Target.String(), "reason", r.Reason)
			}
		case tunnel.MsgRefusal:
			log.Error("server ended the session", "code", m.Code, "reason", m.Reason)
			s.ts.Close()
			return
		default:
			log.Warn("unknown control message ignored", "type", m.Type)
		}
	}
}

// headerTimeout bounds the read of a stream header.
const headerTimeout = 5 * time.Second

// handleStream serves one data stream: header, checks, dial, status, data.
// handleStream sets a stream up: header, checks, dial, status. It returns
// the long part, the splice, for the caller to run on a fresh goroutine:
// the set-up's deep stack (dialling, logging) is not kept for the
// connection's idle life. nil: the stream was refused and closed.
func (a *Agent) handleStream(s *session, st net.Conn) (run func()) {
	refuse := func(status tunnel.Status) {
		_ = st.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = st.Write([]byte{byte(status)})
		st.Close()
	}
	if n := s.streams.Add(1); n > int64(a.conf().Tunnel.MaxStreams) {
		s.streams.Add(-1)
		a.Stats.StreamsAtCap.Add(1)
		a.log.Warn("stream limit reached; stream refused", "session", s.id, "limit", a.conf().Tunnel.MaxStreams)
		refuse(tunnel.StatusBusy)
		return nil
	}
	release := true // the stream count, unless the splice takes it over
	defer func() {
		if release {
			s.streams.Add(-1)
		}
	}()
	if a.draining.Load() {
		refuse(tunnel.StatusDraining)
		return nil
	}
	_ = st.SetReadDeadline(time.Now().Add(headerTimeout))
	hdr, err := tunnel.ReadStreamHeader(st, s.ts.Version)
	_ = st.SetReadDeadline(time.Time{})
	if err != nil {
		a.log.Warn("bad stream header", "session", s.id, "err", err)
		refuse(tunnel.StatusBadHeader)
		return nil
	}
	key := registry.Key{Network: hdr.Target.Network, Addr: hdr.Target.Addr}
	log := a.log.With("target", key.String(), "client", hdr.Client)
	t, ok := (*s.exposed.Load())[key]
	if !ok {
		a.Stats.NotExposed.Add(1)
		log.Warn("server asked for a target this agent does not expose; refused")
		refuse(tunnel.StatusNotExposed)
		return nil
	}
	if hdr.Generation != s.gen {
		log.Warn("stream for another generation; refused", "want", s.gen, "got", hdr.Generation)
		refuse(tunnel.StatusStale)
		return nil
	}
	d := net.Dialer{Timeout: a.conf().DialTimeout, Control: dialGuard(t.Target, t.explicit)}
	conn, err := d.Dial("tcp", t.Addr.String())
	if errors.Is(err, errDestination) {
		a.Stats.NotExposed.Add(1)
		log.Warn("target refused at dial time", "err", err)
		refuse(tunnel.StatusNotExposed)
		return nil
	}
	if err != nil {
		a.Stats.DialFailures.Add(1)
		status := tunnel.StatusUnreachable
		if errors.Is(err, syscall.ECONNREFUSED) {
			status = tunnel.StatusRefused
			a.Stats.DialRefused.Add(1)
		}
		log.Info("target dial failed", "status", status.String(), "err", err)
		refuse(status)
		return nil
	}
	netx.KeepAlive(conn, 30*time.Second, 10*time.Second, 3)
	if hdr.Spliced && !s.ts.PrepareSpliced(st) {
		conn.Close()
		a.log.Warn("spliced stream on a session without spliced frames; refused", "session", s.id)
		refuse(tunnel.StatusBadHeader)
		return nil
	}
	if _, err := st.Write([]byte{byte(tunnel.StatusOK)}); err != nil {
		s.ts.ForgetSpliced(st)
		conn.Close()
		st.Close()
		return nil
	}
	a.Stats.StreamsOpen.Add(1)
	a.Stats.StreamsTotal.Add(1)
	release = false
	return func() {
		defer s.streams.Add(-1)
		defer a.Stats.StreamsOpen.Add(-1)
		res := s.ts.Splice(conn, st, a.conf().IdleTimeout, &a.Stats.Bytes)
		if res.Aborted {
			log.Debug("connection aborted", "err", res.Err, "up", res.Up, "down", res.Down)
		}
	}
}

// retire lets an old session's streams finish (up to the grace period,
// or until the second signal), then closes it. It runs in the background.
func (a *Agent) retire(s *session, why string) {
	a.endSession(s)
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		done := make(chan struct{})
		go func() { s.waitStreams(); close(done) }()
		t := time.NewTimer(a.conf().DrainGrace)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
		case <-s.ts.Mux.CloseChan():
		case <-a.hard.Done():
		}
		a.log.Info("closing old session", "session", s.id, "why", why)
		s.ts.Close()
		<-done
	}()
}

// sessionList is a snapshot of the agent's sessions.
func (a *Agent) sessionList() []*session {
	a.mu.Lock()
	defer a.mu.Unlock()
	ss := make([]*session, 0, len(a.sessions))
	for s := range a.sessions {
		ss = append(ss, s)
	}
	return ss
}

// drain runs at shutdown: withdraw routes, refuse new streams, wait for
// open ones (until the grace period ends or a.hard does), close.
func (a *Agent) drain() {
	hard := a.hard
	a.draining.Store(true)
	ss := a.sessionList()
	a.log.Info("draining", "sessions", len(ss), "grace", a.conf().DrainGrace)
	for _, s := range ss {
		if err := s.ts.Send(&tunnel.Control{Type: tunnel.MsgWithdraw}); err == nil {
			t := time.NewTimer(2 * time.Second)
			select {
			case <-s.withdrawn:
			case <-t.C:
			case <-s.ts.Mux.CloseChan():
			case <-hard.Done():
			}
			t.Stop()
		}
	}
	all := make(chan struct{})
	go func() {
		for _, s := range ss {
			s.waitStreams()
		}
		close(all)
	}()
	t := time.NewTimer(a.conf().DrainGrace)
	defer t.Stop()
	select {
	case <-all:
	case <-t.C:
		a.log.Warn("drain grace period over; closing open connections")
	case <-hard.Done():
	}
	for _, s := range ss {
		s.ts.Close()
	}
	a.wg.Wait()
	a.log.Info("stopped")
}

// Apply takes a new configuration (SIGHUP, after it loaded and validated).
// Targets change live on every session, the tunnel and open connections
// untouched: removed targets refuse new streams at once and are withdrawn
// from the server (remove), new ones are claimed (add; the server answers
// with the routes made or refused, logged). Servers, timeouts, backoff and
// the token and the TLS files (rotation) apply from the next connection. The agent id, the tunnel
// settings and the admin listener need a restart: changing them is
// refused, and the running configuration stays.
func (a *Agent) Apply(cfg *Config) error {
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	cur := a.conf()
	switch {
	case cfg.AgentID != cur.AgentID:
		return fmt.Errorf("agent_id %q -> %q: restart the agent to change its identity", cur.AgentID, cfg.AgentID)
	case cfg.Tunnel != cur.Tunnel:
		return errors.New("tunnel settings changed: restart the agent to apply them")
	case cfg.Admin != cur.Admin:
		return errors.New("admin listener changed: restart the agent to apply it")
	}
	lc, err := loadLive(*cfg)
	if err != nil {
		return err
	}
	a.live.Store(lc)
	ss := a.sessionList()
	for _, s := range ss {
		a.retarget(s, cfg.Targets)
	}
	return nil
}

// retarget brings a session's targets to cfg: remove, then add.
func (a *Agent) retarget(s *session, cfg []TargetConfig) {
	old := *s.exposed.Load()
	next, _ := resolveTargets(cfg, s.local)
	var added, removed []tunnel.Target
	for k, t := range next {
		if _, ok := old[k]; !ok {
			added = append(added, t.Target)
		}
	}
	for k, t := range old {
		if _, ok := next[k]; !ok {
			removed = append(removed, t.Target)
		}
	}
	if len(added)+len(removed) == 0 {
		return
	}
	// New streams see the new set from now on; open ones go on.
	s.exposed.Store(&next)
	log := a.log.With("session", s.id, "server", s.server)
	if len(removed) > 0 {
		if err := s.ts.Send(&tunnel.Control{Type: tunnel.MsgRemove, Targets: removed}); err != nil {
			log.Warn("reload: could not withdraw removed targets; the session will be replaced", "err", err)
		}
		for _, t := range removed {
			log.Info("reload: target removed", "target", t.String())
		}
	}
	if len(added) > 0 {
		if err := s.ts.Send(&tunnel.Control{Type: tunnel.MsgAdd, Targets: added}); err != nil {
			log.Warn("reload: could not add targets; the session will be replaced", "err", err)
		}
		for _, t := range added {
			log.Info("reload: target added", "target", t.String())
		}
	}
}

// errDestination is a dial the destination check refused.
var errDestination = errors.New("destination refused")

// sensitiveAddr reports loopback, link-local (169.254.169.254, the cloud
// metadata service, among them), unspecified and the IPv6 metadata
// address fd00:ec2::254, in any IPv4-mapped form.
func sensitiveAddr(ip netip.Addr) bool {
	ip = ip.Unmap()
	return ip.IsLoopback() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || ip.IsUnspecified() ||
		ip == netip.MustParseAddr("fd00:ec2::254")
}

// dialGuard is the Dialer.Control of every target dial: the socket may
// connect only to the exposed target itself, and to a loopback,
// link-local or metadata address only when a target names it explicitly.
func dialGuard(t tunnel.Target, explicit bool) func(network, address string, _ syscall.RawConn) error {
	return func(_, address string, _ syscall.RawConn) error {
		ap, err := netip.ParseAddrPort(address)
		if err != nil {
			return fmt.Errorf("%w: %v", errDestination, err)
		}
		if ap.Port() != t.Addr.Port() || ap.Addr().Unmap() != t.Addr.Addr().Unmap() {
			return fmt.Errorf("%w: %s is not the exposed target %s", errDestination, address, t.Addr)
		}
		if sensitiveAddr(ap.Addr()) && !explicit {
			return fmt.Errorf("%w: %s is a loopback, link-local or metadata address: name it in a target to expose it", errDestination, ap.Addr())
		}
		return nil
	}
}
