// Package admin is the admin listener every binary can open (off by
// default, loopback by default): Prometheus metrics on /metrics, liveness
// details on /healthz and readiness on /readyz. Metrics read the counters
// the components already keep (atomics next to the state they count) at
// scrape time, so the data path pays nothing extra for them.
package admin

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Namespace prefixes every metric name.
const Namespace = "vpcreach"

// Check is one named detail of /healthz. A failing check is reported but
// does not make the process unhealthy unless Critical is set: a Redis
// outage is a detail, never a reason to pull members out of the VIP.
type Check struct {
	Name     string
	Critical bool
	Run      func(ctx context.Context) error
}

// Admin is the state behind an admin listener.
type Admin struct {
	Reg    *prometheus.Registry
	Mux    *http.ServeMux
	ready  func() error
	checks []Check
}

// New returns an admin handler whose metrics registry has the Go runtime
// and process collectors; ready decides /readyz (nil error: ready).
func New(ready func() error, checks ...Check) *Admin {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a := &Admin{Reg: reg, Mux: http.NewServeMux(), ready: ready, checks: checks}
	a.Mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	a.Mux.HandleFunc("GET /healthz", a.healthz)
	a.Mux.HandleFunc("GET /readyz", a.readyz)
	return a
}

type checkResult struct {
	Name  string `json:"name"`
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// healthz answers 200 while the process serves (every critical check
// passes), with each check's result as JSON.
func (a *Admin) healthz(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	status := http.StatusOK
	res := make([]checkResult, len(a.checks))
	var wg sync.WaitGroup
	for i, c := range a.checks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res[i] = checkResult{Name: c.Name, OK: true}
			if err := c.Run(ctx); err != nil {
				res[i].OK, res[i].Error = false, err.Error()
			}
		}()
	}
	wg.Wait()
	for i, c := range a.checks {
		if c.Critical && !res[i].OK {
			status = http.StatusServiceUnavailable
		}
	}
	writeJSON(w, status, map[string]any{"status": http.StatusText(status), "checks": res})
}

// readyz answers 200 when the process should get traffic, 503 otherwise.
func (a *Admin) readyz(w http.ResponseWriter, r *http.Request) {
	if err := a.ready(); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "not ready", "reason": err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ready"})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// Server serves an Admin on a listener until Close.
type Server struct {
	ln   net.Listener
	http *http.Server
	done chan struct{}
}

// Listen binds addr and serves h in a goroutine the Server owns.
func Listen(addr string, h http.Handler, log *slog.Logger) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	if ap, err := netip.ParseAddrPort(ln.Addr().String()); err == nil && ap.Addr().IsLoopback() {
		h = loopbackOnly(h)
	}
	s := &Server{ln: ln, done: make(chan struct{}),
		http: &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second,
			ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}}
	go func() { defer close(s.done); _ = s.http.Serve(ln) }()
	return s, nil
}

// Addr is the bound address.
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Close stops the listener and open requests and waits for the goroutine.
func (s *Server) Close() error {
	err := s.http.Close()
	<-s.done
	return err
}

// Counter registers a counter that reads v at scrape time.
func Counter(reg prometheus.Registerer, name, help string, v *atomic.Int64, labels prometheus.Labels) {
	CounterFunc(reg, name, help, func() float64 { return float64(v.Load()) }, labels)
}

// CounterFunc registers a counter that calls f at scrape time.
func CounterFunc(reg prometheus.Registerer, name, help string, f func() float64, labels prometheus.Labels) {
	reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Namespace: Namespace, Name: name,
		Help: help, ConstLabels: labels}, f))
}

// Gauge registers a gauge that calls f at scrape time.
func Gauge(reg prometheus.Registerer, name, help string, f func() float64, labels prometheus.Labels) {
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: Namespace, Name: name,
		Help: help, ConstLabels: labels}, f))
}

// GaugeOf registers a gauge that reads v at scrape time.
func GaugeOf(reg prometheus.Registerer, name, help string, v *atomic.Int64, labels prometheus.Labels) {
	Gauge(reg, name, help, func() float64 { return float64(v.Load()) }, labels)
}

// Reasons is a fixed set of reasons, each with its counter: a bounded
// label for "failures by reason".
type Reasons struct {
	names []string
	vals  []atomic.Int64
	other atomic.Int64
}

// NewReasons makes counters for the given reasons; anything else counts
// as "other".
func NewReasons(names ...string) *Reasons {
	return &Reasons{names: names, vals: make([]atomic.Int64, len(names))}
}

// Inc counts one event of reason.
func (r *Reasons) Inc(reason string) {
	for i, n := range r.names {
		if n == reason {
			r.vals[i].Add(1)
			return
		}
	}
	r.other.Add(1)
}

// Get returns the count of reason.
func (r *Reasons) Get(reason string) int64 {
	for i, n := range r.names {
		if n == reason {
			return r.vals[i].Load()
		}
	}
	return r.other.Load()
}

// Register exposes the counters as name{label="reason"}.
func (r *Reasons) Register(reg prometheus.Registerer, name, help, label string) {
	for i, n := range r.names {
		Counter(reg, name, help, &r.vals[i], prometheus.Labels{label: n})
	}
	Counter(reg, name, help, &r.other, prometheus.Labels{label: "other"})
}

// loopbackOnly refuses requests whose Host is not a loopback address or
// "localhost": on a loopback listener, a web page the operator visits
// cannot read the admin listener through DNS rebinding (its requests carry
// the attacker's host name).
func loopbackOnly(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host := r.Host
		if hh, _, err := net.SplitHostPort(host); err == nil {
			host = hh
		}
		a, err := netip.ParseAddr(strings.Trim(host, "[]"))
		if host != "localhost" && (err != nil || !a.IsLoopback()) {
			http.Error(w, "admin listener: Host must be a loopback address or localhost", http.StatusMisdirectedRequest)
			return
		}
		h.ServeHTTP(w, r)
	})
}
