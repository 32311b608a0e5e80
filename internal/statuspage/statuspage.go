// Package statuspage is the proxy server's read-only status page, served
// on its admin listener: this member and the other members seen in the
// routes, the live agents and their sessions, the routes (the
// four-tuples), traffic and refusal counters, and the recent warnings and
// errors (kept by Recent, an slog.Handler wrapper).
//
// The page is static (HTML, CSS and a small script, embedded; no build
// step, nothing loaded from elsewhere). The script reads the admin
// listener's own JSON (/v1/agents, /v1/routes, /v1/stats, /readyz,
// /healthz) and this package's /ui/status.json every 2 s while the page
// is visible, and builds the tables with text nodes only, so nothing in
// the data is ever parsed as markup. Every response carries a
// Content-Security-Policy that allows only the page's own files and
// same-origin requests, and the page has no forms: it changes nothing.
//
// Mount it on the admin mux at "GET /{$}" and "GET /ui/".
package statuspage

import (
	"embed"
	"encoding/json"
	"io/fs"
	"net/http"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

//go:embed static
var static embed.FS

// Paths of the page's files and its JSON.
const (
	Prefix     = "/ui/"
	StatusPath = Prefix + "status.json"
)

// Member describes this proxy server, as the page's header shows it.
type Member struct {
	ID        string `json:"id"`
	Control   string `json:"control,omitempty"`   // tunnel listener (what the VIP points at)
	Advertise string `json:"advertise,omitempty"` // the member address proxy ports bind
	Relay     string `json:"relay,omitempty"`     // relay port for socks5d
	Registry  string `json:"registry,omitempty"`  // registry kind, e.g. "memory" or "redis"
}

// Options configure the page.
type Options struct {
	Member Member
	// Metrics is where traffic and refusal counters come from (the admin
	// listener's registry); the page shows the vpcreach_* counters and
	// gauges. Nil: none.
	Metrics prometheus.Gatherer
	// Recent holds the recent warnings and errors. Nil: the page says
	// that none are collected.
	Recent *Recent
}

// Sample is one counter or gauge value in the status JSON.
type Sample struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
	Value  float64           `json:"value"`
}

// Status is the JSON at StatusPath: what the page needs beyond the
// lookup API.
type Status struct {
	Member  Member    `json:"member"`
	Now     time.Time `json:"now"`
	Started time.Time `json:"started"`
	Metrics []Sample  `json:"metrics"`
	// Recent is nil when no Recent is wired in.
	Recent *RecentLog `json:"recent"`
}

// RecentLog is the recent warnings and errors, newest first.
type RecentLog struct {
	Kept    int      `json:"kept"`  // capacity of the ring
	Total   int64    `json:"total"` // seen since start, kept or not
	Records []Record `json:"records"`
}

// metricPrefix selects the metrics the page shows: the project's own,
// not the Go runtime's and process collectors'.
const metricPrefix = "vpcreach_"

// Security headers of every response. The policy allows the page's own
// files and same-origin fetches only: no inline script or style, no
// frames, no forms, no plugins.
var headers = map[string]string{
	"Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; " +
		"frame-ancestors 'none'; object-src 'none'",
	"X-Content-Type-Options":       "nosniff",
	"X-Frame-Options":              "DENY",
	"Referrer-Policy":              "no-referrer",
	"Cross-Origin-Opener-Policy":   "same-origin",
	"Cross-Origin-Resource-Policy": "same-origin",
	"Cache-Control":                "no-cache",
}

// types are the content types of the embedded files, by extension; a
// file of any other kind is not served.
var types = map[string]string{
	".html": "text/html; charset=utf-8",
	".css":  "text/css; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".svg":  "image/svg+xml",
}

// Handler returns the page: "/" is the page itself, Prefix+name its
// files, StatusPath its JSON. Anything else is 404; methods other than
// GET and HEAD are 405.
func Handler(o Options) http.Handler {
	files, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	return &handler{o: o, files: files, started: time.Now()}
}

type handler struct {
	o       Options
	files   fs.FS
	started time.Time
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	for k, v := range headers {
		w.Header().Set(k, v)
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	switch p := r.URL.Path; {
	case p == "/":
		h.file(w, "index.html")
	case p == StatusPath:
		h.status(w)
	case strings.HasPrefix(p, Prefix):
		name := strings.TrimPrefix(p, Prefix)
		if name == "index.html" || strings.Contains(name, "/") || !fs.ValidPath(name) {
			http.NotFound(w, r)
			return
		}
		h.file(w, name)
	default:
		http.NotFound(w, r)
	}
}

// file writes one embedded file (of a known type), or 404.
func (h *handler) file(w http.ResponseWriter, name string) {
	ct, ok := types[path.Ext(name)]
	b, err := fs.ReadFile(h.files, name)
	if !ok || err != nil {
		http.Error(w, "404 page not found", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", ct)
	_, _ = w.Write(b)
}

func (h *handler) status(w http.ResponseWriter) {
	st := Status{Member: h.o.Member, Now: time.Now().UTC(), Started: h.started.UTC(), Metrics: []Sample{}}
	if h.o.Metrics != nil {
		st.Metrics = samples(h.o.Metrics)
	}
	if rec := h.o.Recent; rec != nil {
		st.Recent = &RecentLog{Kept: rec.Cap(), Total: rec.Total(), Records: rec.Records()}
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(st)
}

// samples returns the project's counters and gauges from g, sorted by
// name. A gather error leaves out what failed, as a scrape would.
func samples(g prometheus.Gatherer) []Sample {
	mfs, _ := g.Gather()
	out := []Sample{}
	for _, mf := range mfs {
		if !strings.HasPrefix(mf.GetName(), metricPrefix) {
			continue
		}
		for _, m := range mf.GetMetric() {
			s := Sample{Name: mf.GetName()}
			switch {
			case m.Counter != nil:
				s.Value = m.Counter.GetValue()
			case m.Gauge != nil:
				s.Value = m.Gauge.GetValue()
			case m.Untyped != nil:
				s.Value = m.Untyped.GetValue()
			default: // histograms and summaries: not shown
				continue
			}
			if lp := m.GetLabel(); len(lp) > 0 {
				s.Labels = make(map[string]string, len(lp))
				for _, l := range lp {
					s.Labels[l.GetName()] = l.GetValue()
				}
			}
			out = append(out, s)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}
