package server

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vpcreach/vpcreach/internal/admin"
	"github.com/vpcreach/vpcreach/internal/statuspage"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// Bounded label values: refusal reasons and stream statuses. No target,
// address or agent id is ever a label.
var (
	refusalReasons = []string{tunnel.RefuseAuth, tunnel.RefuseVersion, tunnel.RefuseProtocol,
		tunnel.RefuseDraining, tunnel.RefuseLimit, "handshake", "proxy_header", "tls"}
	dialReasons = []string{"refused", "unreachable", "not exposed", "busy", "bad header", "stale",
		"no route", "draining", "internal"}
)

// refused counts a refused control connection by reason.
func (s *Server) refused(reason string) {
	s.Stats.Refusals.Add(1)
	s.refusals.Inc(reason)
}

// adminHandler is the admin listener: the lookup API plus metrics, health
// and readiness, and the read-only status page on / (statuspage).
func (s *Server) adminHandler() http.Handler {
	a := admin.New(s.ready, admin.Check{Name: "registry", Run: s.pingRegistry})
	s.registerMetrics(a.Reg)
	a.Mux.Handle("/v1/", s.apiHandler())
	ui := statuspage.Handler(statuspage.Options{Metrics: a.Reg, Recent: statuspage.RecentOf(s.log), Member: statuspage.Member{ID: s.cfg.ServerID,
		Control: s.control.Addr().String(), Advertise: s.cfg.advertise.String(), Relay: s.relayAP.String(), Registry: s.cfg.Registry.Type}})
	a.Mux.Handle("GET /{$}", ui)
	a.Mux.Handle("GET "+statuspage.Prefix, ui)
	return a.Mux
}

// ready: listening and not draining. The registry is not part of it: a
// Redis outage must not take every member out of the VIP at once.
func (s *Server) ready() error {
	switch {
	case s.draining.Load():
		return errors.New("draining")
	case s.control == nil:
		return errors.New("not listening")
	}
	return nil
}

func (s *Server) pingRegistry(ctx context.Context) error {
	if p, ok := s.reg.(interface{ Ping(context.Context) error }); ok {
		return p.Ping(ctx)
	}
	return nil
}

func (s *Server) registerMetrics(reg prometheus.Registerer) {
	st := &s.Stats
	admin.GaugeOf(reg, "server_tunnels", "Live agent sessions on this member.", &st.Tunnels, nil)
	admin.GaugeOf(reg, "server_streams_open", "Open data streams.", &st.StreamsOpen, nil)
	admin.Counter(reg, "server_streams_opened_total", "Data streams opened.", &st.StreamsOpened, nil)
	admin.Counter(reg, "server_streams_at_cap_total", "Streams refused at the per-session cap.", &st.StreamsAtCap, nil)
	admin.Counter(reg, "server_source_denied_total", "Proxy and relay connections from sources not allowed.", &st.SourceDenied, nil)
	admin.Counter(reg, "server_relay_refusals_total", "Relay preambles answered with an error status.", &st.RelayRefusals, nil)
	admin.Counter(reg, "server_bytes_total", "Bytes carried, by direction.", &s.bytes.Up, prometheus.Labels{"direction": "to_target"})
	admin.Counter(reg, "server_bytes_total", "Bytes carried, by direction.", &s.bytes.Down, prometheus.Labels{"direction": "from_target"})
	admin.Counter(reg, "server_spliced_total", "Stream directions sent to agents as spliced frames (bulk, splice(2)).", &s.bytes.Spliced, nil)
	s.refusals.Register(reg, "server_handshake_refusals_total", "Control connections refused, by reason.", "reason")
	s.dialFailures.Register(reg, "server_dial_failures_total", "Streams the agent could not connect, by status.", "status")
	admin.Gauge(reg, "server_routes", "Routes this member serves.", func() float64 {
		s.mu.Lock()
		defer s.mu.Unlock()
		return float64(len(s.routes))
	}, nil)
	admin.Gauge(reg, "server_draining", "1 while the member drains.", func() float64 {
		if s.draining.Load() {
			return 1
		}
		return 0
	}, nil)
	s.regMetrics.register(reg)
	if s.socks != nil {
		s.socks.RegisterMetrics(reg, "server")
	}
}

// regMetrics times registry calls.
type regMetrics struct {
	latency *prometheus.HistogramVec
	errors  *prometheus.CounterVec
	up      prometheus.Gauge
}

func newRegMetrics() *regMetrics {
	return &regMetrics{
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: admin.Namespace,
			Name: "registry_op_duration_seconds", Help: "Registry call latency by operation.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}}, []string{"op"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: admin.Namespace,
			Name: "registry_errors_total", Help: "Registry calls that failed (not ownership answers), by operation."}, []string{"op"}),
		up: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: admin.Namespace, Name: "registry_up",
			Help: "1 if the last registry call succeeded."}),
	}
}

func (m *regMetrics) register(reg prometheus.Registerer) {
	reg.MustRegister(m.latency, m.errors, m.up)
}

// observe records one call that started at t0.
func (m *regMetrics) observe(op string, t0 time.Time, err error) {
	m.latency.WithLabelValues(op).Observe(time.Since(t0).Seconds())
	if err != nil && !errors.Is(err, registry.ErrStale) && !errors.Is(err, registry.ErrOwned) {
		m.errors.WithLabelValues(op).Inc()
		m.up.Set(0)
	} else {
		m.up.Set(1)
	}
}

// timedRegistry is the server's registry with its calls timed.
type timedRegistry struct {
	registry.Registry
	m *regMetrics
}

func (t timedRegistry) Register(ctx context.Context, r registry.Route, ttl time.Duration) error {
	t0 := time.Now()
	err := t.Registry.Register(ctx, r, ttl)
	t.m.observe("register", t0, err)
	return err
}

func (t timedRegistry) Renew(ctx context.Context, r registry.Route, ttl time.Duration) error {
	t0 := time.Now()
	err := t.Registry.Renew(ctx, r, ttl)
	t.m.observe("renew", t0, err)
	return err
}

func (t timedRegistry) Deregister(ctx context.Context, k registry.Key, session string) error {
	t0 := time.Now()
	err := t.Registry.Deregister(ctx, k, session)
	t.m.observe("deregister", t0, err)
	return err
}

func (t timedRegistry) Lookup(ctx context.Context, k registry.Key) (registry.Route, error) {
	t0 := time.Now()
	r, err := t.Registry.Lookup(ctx, k)
	if errors.Is(err, registry.ErrNotFound) {
		t.m.observe("lookup", t0, nil)
	} else {
		t.m.observe("lookup", t0, err)
	}
	return r, err
}

// Ping checks the registry, when it can be checked.
func (t timedRegistry) Ping(ctx context.Context) error {
	if p, ok := t.Registry.(interface{ Ping(context.Context) error }); ok {
		return p.Ping(ctx)
	}
	return nil
}
