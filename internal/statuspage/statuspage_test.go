package statuspage_test

import (
	"encoding/json"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"

	"go.uber.org/goleak"

	"github.com/vpcreach/vpcreach/internal/admin"
	"github.com/vpcreach/vpcreach/internal/statuspage"
	"github.com/vpcreach/vpcreach/internal/statuspage/browsertest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// Hostile values: each must reach the page as text.
const (
	evilAgent  = `<script>alert(1)</script>`
	evilMember = `s-<i>me</i>`
	evilMsg    = `<b>bold</b> <img src=x onerror=alert(2)>`
	bigGen     = "1733000000123456789" // above 2^53: JSON numbers would round it
)

// fakeAdmin is an admin mux as the proxy server builds it, with canned
// lookup API answers and the status page mounted.
func fakeAdmin(t *testing.T, rec *statuspage.Recent) *httptest.Server {
	t.Helper()
	a := admin.New(func() error { return nil })
	var up, down atomic.Int64
	up.Store(1536)
	down.Store(3 << 20)
	admin.Counter(a.Reg, "server_bytes_total", "Bytes.", &up, map[string]string{"direction": "to_target"})
	admin.Counter(a.Reg, "server_bytes_total", "Bytes.", &down, map[string]string{"direction": "from_target"})
	canned := map[string]string{
		"/v1/agents": `[{"agent": "` + jsonText(evilAgent) + `", "session": "sess-1", "generation": ` + bigGen + `,
			"remote": "127.0.0.1:40000", "started": "2026-01-02T03:04:05.123456789Z", "version": 2,
			"routes": ["10.1.0.5:6379 -> 10.0.0.2:21234"], "streams": 3, "yamux_streams": 4}]`,
		"/v1/routes": `[{"target": "10.1.0.5:6379", "proxy": "10.0.0.2:21234", "relay": "10.0.0.2:7000",
			"agent": "` + jsonText(evilAgent) + `", "identity": "shared-token", "server": "` + jsonText(evilMember) + `",
			"session": "sess-1", "generation": ` + bigGen + `, "registered": "2026-01-02T03:04:06Z"},
			{"network": "vpc-b", "target": "10.9.0.7:5432", "proxy": "10.0.0.3:22000", "relay": "10.0.0.3:7000",
			"agent": "db-agent", "identity": "shared-token", "server": "s-other",
			"session": "sess-2", "generation": 5, "registered": "2026-01-02T03:04:07Z"}]`,
		"/v1/stats": `{"tunnels": 1, "streams_open": 3, "streams_opened": 42, "hello_refusals": 7}`,
	}
	for p, body := range canned {
		a.Mux.HandleFunc("GET "+p, func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = io.WriteString(w, body)
		})
	}
	ui := statuspage.Handler(statuspage.Options{Metrics: a.Reg, Recent: rec,
		Member: statuspage.Member{ID: evilMember, Control: "127.0.0.1:7443", Advertise: "10.0.0.2", Relay: "10.0.0.2:7000", Registry: "memory"}})
	a.Mux.Handle("GET /{$}", ui)
	a.Mux.Handle("GET "+statuspage.Prefix, ui)
	srv := httptest.NewServer(a.Mux)
	t.Cleanup(srv.Close)
	return srv
}

func jsonText(s string) string {
	b, _ := json.Marshal(s)
	return string(b[1 : len(b)-1])
}

func get(t *testing.T, method, url string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func TestHandlerPathsTypesAndHeaders(t *testing.T) {
	srv := fakeAdmin(t, nil)
	for _, c := range []struct {
		method, path string
		code         int
		ctype, body  string
	}{
		{"GET", "/", 200, "text/html; charset=utf-8", `<script src="/ui/status.js" defer></script>`},
		{"HEAD", "/", 200, "text/html; charset=utf-8", ""},
		{"GET", "/ui/status.css", 200, "text/css; charset=utf-8", ".tile"},
		{"GET", "/ui/status.js", 200, "text/javascript; charset=utf-8", "textContent"},
		{"GET", "/ui/favicon.svg", 200, "image/svg+xml", "<svg"},
		{"GET", "/ui/status.json", 200, "application/json", `"member"`},
		{"GET", "/ui/", 404, "", ""},
		{"GET", "/ui/nope.js", 404, "", ""},
		{"GET", "/ui/index.html", 404, "", ""},
		{"GET", "/ui/static/status.js", 404, "", ""},
		{"GET", "/ui/%2e%2e/statuspage.go", 404, "", ""},
		{"GET", "/index.html", 404, "", ""},
		{"GET", "/status.js", 404, "", ""},
		{"POST", "/", 405, "", ""},
		{"POST", "/ui/status.json", 405, "", ""},
	} {
		resp, body := get(t, c.method, srv.URL+c.path)
		if resp.StatusCode != c.code {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, resp.StatusCode, c.code)
			continue
		}
		if c.code != 200 {
			continue
		}
		h := resp.Header
		if got := h.Get("Content-Type"); got != c.ctype {
			t.Errorf("%s: Content-Type %q, want %q", c.path, got, c.ctype)
		}
		if csp := h.Get("Content-Security-Policy"); !strings.HasPrefix(csp, "default-src 'self';") ||
			!strings.Contains(csp, "frame-ancestors 'none'") || strings.Contains(csp, "unsafe") {
			t.Errorf("%s: Content-Security-Policy %q", c.path, csp)
		}
		if h.Get("X-Content-Type-Options") != "nosniff" || h.Get("X-Frame-Options") != "DENY" ||
			h.Get("Referrer-Policy") != "no-referrer" {
			t.Errorf("%s: security headers %v", c.path, h)
		}
		if !strings.Contains(body, c.body) {
			t.Errorf("%s %s: body lacks %q", c.method, c.path, c.body)
		}
	}
}

// A handler mounted without method patterns still refuses writes.
func TestHandlerRefusesOtherMethods(t *testing.T) {
	h := statuspage.Handler(statuspage.Options{})
	for _, m := range []string{"POST", "PUT", "DELETE", "PATCH"} {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(m, "/", nil))
		if w.Code != http.StatusMethodNotAllowed || w.Header().Get("Allow") != "GET, HEAD" ||
			w.Header().Get("Content-Security-Policy") == "" {
			t.Errorf("%s: %d %v", m, w.Code, w.Header())
		}
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, httptest.NewRequest("GET", "/elsewhere", nil))
	if w.Code != http.StatusNotFound {
		t.Errorf("GET /elsewhere: %d", w.Code)
	}
}

func TestStatusJSON(t *testing.T) {
	rec := statuspage.NewRecent(nil, 5)
	slog.New(rec).With("agent", evilAgent).Warn(evilMsg, "n", 1)
	srv := fakeAdmin(t, rec)
	_, body := get(t, "GET", srv.URL+statuspage.StatusPath)
	var st statuspage.Status
	if err := json.Unmarshal([]byte(body), &st); err != nil {
		t.Fatal(err)
	}
	if st.Member.ID != evilMember || st.Member.Relay != "10.0.0.2:7000" || st.Now.IsZero() || st.Started.IsZero() {
		t.Errorf("member/times: %+v", st)
	}
	var bytesUp float64 = -1
	for _, m := range st.Metrics {
		if !strings.HasPrefix(m.Name, "vpcreach_") {
			t.Errorf("foreign metric %s", m.Name)
		}
		if m.Name == "vpcreach_server_bytes_total" && m.Labels["direction"] == "to_target" {
			bytesUp = m.Value
		}
	}
	if bytesUp != 1536 {
		t.Errorf("bytes to target %v in %+v", bytesUp, st.Metrics)
	}
	if st.Recent == nil || st.Recent.Kept != 5 || st.Recent.Total != 1 || len(st.Recent.Records) != 1 {
		t.Fatalf("recent: %+v", st.Recent)
	}
	r := st.Recent.Records[0]
	if r.Message != evilMsg || r.Level != "WARN" || len(r.Attrs) != 2 || r.Attrs[0].Value != evilAgent {
		t.Errorf("record: %+v", r)
	}

	// Without a Recent the field is null, so the page can say so.
	_, body = get(t, "GET", fakeAdmin(t, nil).URL+statuspage.StatusPath)
	if !strings.Contains(body, `"recent":null`) {
		t.Errorf("no Recent: %s", body)
	}
}

// The page's own files keep the CSP meaningful: no inline script, style
// or event handler, no markup sinks, no forms, nothing from elsewhere.
func TestStaticFilesStayInsideThePolicy(t *testing.T) {
	files := map[string]*regexp.Regexp{
		"index.html": regexp.MustCompile(`(?i)<script>|<script(\s+[a-z]+(="[^"]*")?)*\s*>[^<]|\son[a-z]+\s*=|style\s*=|<style|<form|<input|<button|https?://|//[a-z0-9.-]+\.[a-z]`),
		"status.js": regexp.MustCompile(`innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|setAttribute\(\s*"on|` +
			`https?://|method:\s*"(POST|PUT|DELETE|PATCH)"|\.style\b`),
		"status.css": regexp.MustCompile(`@import|url\(|https?://`),
	}
	for name, bad := range files {
		b, err := fs.ReadFile(statuspage.Files(), name)
		if err != nil {
			t.Fatal(err)
		}
		if m := bad.Find(b); m != nil {
			t.Errorf("%s contains %q", name, m)
		}
	}
}

// The page in a real browser: the tables fill from the API, every hostile
// value shows as text, and exact values survive.
func TestPageInBrowser(t *testing.T) {
	rec := statuspage.NewRecent(nil, 5)
	slog.New(rec).Error(evilMsg, "agent", evilAgent)
	srv := fakeAdmin(t, rec)
	dom := browsertest.DumpDOM(t, srv.URL+"/")
	if !regexp.MustCompile(`data-refreshes="[1-9]`).MatchString(dom) {
		t.Fatalf("the script did not complete a refresh:\n%s", dom)
	}
	for _, want := range []string{
		"&lt;script&gt;alert(1)&lt;/script&gt;",                      // agent id, in agents and routes
		"s-&lt;i&gt;me&lt;/i&gt;",                                    // member id, in the header
		"&lt;b&gt;bold&lt;/b&gt; &lt;img src=x onerror=alert(2)&gt;", // log message
		bigGen,                            // exact generation
		"10.1.0.5:6379", "10.0.0.2:21234", // a route's four-tuple
		"vpc-b/10.9.0.7:5432", "s-other", "10.0.0.3:7000", // the other member, from the routes
		"this member", "1.50 KiB", "3.00 MiB", "42", "hello_refusals",
		"(2)", "1 kept of 1 since start",
	} {
		if !strings.Contains(dom, want) {
			t.Errorf("DOM lacks %q", want)
		}
	}
	for _, bad := range []string{"<script>alert", "<b>bold", "<img src=\"x\"", "<img src=x", "<i>me"} {
		if strings.Contains(dom, bad) {
			t.Errorf("DOM has markup from the data: %q", bad)
		}
	}
	if t.Failed() {
		t.Logf("DOM:\n%s", dom)
	}
}
