package e2e

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// The HTTP proxy front end on the SOCKS5 port, driven by the real curl:
// absolute-form forwarding (HTTP_PROXY), CONNECT (HTTPS_PROXY and -p), a
// request body, and the errors for a missing route and a name.
func TestHTTPProxyWithCurl(t *testing.T) {
	curl := testutil.NeedBinary(t, "curl")
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		io.WriteString(w, "target saw "+r.Method+" "+r.URL.RequestURI()+" body="+string(body)+" proxy-auth="+r.Header.Get("Proxy-Authorization"))
	})
	plain := httptest.NewServer(handler)
	defer plain.Close()
	tlsSrv := httptest.NewTLSServer(handler)
	defer tlsSrv.Close()
	plainAddr := strings.TrimPrefix(plain.URL, "http://")
	tlsAddr := strings.TrimPrefix(tlsSrv.URL, "https://")

	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil, withSocks())
	startAgent(t, []string{srv.ControlAddr().String()}, []string{plainAddr, tlsAddr}, nil)
	waitRoute(t, reg, plainAddr, "")
	waitRoute(t, reg, tlsAddr, "")
	proxy := "http://" + srv.SocksAddr().String()

	run := func(env []string, args ...string) string {
		t.Helper()
		cmd := exec.Command(curl, append([]string{"-sS", "--max-time", "10"}, args...)...)
		cmd.Env = append(cleanEnv(), env...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("curl %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	if got := run(nil, "-x", proxy, "http://"+plainAddr+"/forward?x=1"); !strings.Contains(got, "target saw GET /forward?x=1") {
		t.Fatalf("forwarded GET: %q", got)
	}
	if got := run(nil, "-x", proxy, "-U", "user:pass", "-d", "hello", "http://"+plainAddr+"/post"); !strings.Contains(got, "target saw POST /post body=hello") ||
		!strings.HasSuffix(got, "proxy-auth=") {
		t.Fatalf("forwarded POST (the proxy credentials must not reach the target): %q", got)
	}
	if got := run(nil, "-p", "-x", proxy, "http://"+plainAddr+"/tunnel"); !strings.Contains(got, "target saw GET /tunnel") {
		t.Fatalf("CONNECT tunnel: %q", got)
	}
	if got := run([]string{"HTTPS_PROXY=" + proxy}, "-k", "https://"+tlsAddr+"/secure"); !strings.Contains(got, "target saw GET /secure") {
		t.Fatalf("HTTPS_PROXY: %q", got)
	}
	if got := run(nil, "-i", "-x", proxy, "http://192.0.2.1:81/"); !strings.Contains(got, "502") || !strings.Contains(got, "no route") {
		t.Fatalf("unexposed target: %q", got)
	}
	if got := run(nil, "-i", "-x", proxy, "http://name.invalid:80/"); !strings.Contains(got, "400") || !strings.Contains(got, "names are not resolved") {
		t.Fatalf("a name instead of an address: %q", got)
	}
}

// cleanEnv is the environment without proxy variables, so that curl uses
// only the proxy a test names.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !strings.HasSuffix(strings.ToLower(k), "_proxy") {
			env = append(env, kv)
		}
	}
	return env
}
