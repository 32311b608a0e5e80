package admin

import (
	"io"
	"log/slog"
	"net/http"
	"testing"
)

func TestLoopbackListenerRefusesForeignHost(t *testing.T) {
	a := New(func() error { return nil })
	s, err := Listen("127.0.0.1:0", a.Mux, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	get := func(host string) int {
		req, _ := http.NewRequest("GET", "http://"+s.Addr().String()+"/readyz", nil)
		if host != "" {
			req.Host = host
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, h := range []string{"", "localhost:9090", "127.0.0.1", "[::1]:80"} {
		if code := get(h); code != 200 {
			t.Errorf("Host %q: %d, want 200", h, code)
		}
	}
	for _, h := range []string{"evil.example:80", "attacker.test", "10.0.0.1"} {
		if code := get(h); code != http.StatusMisdirectedRequest {
			t.Errorf("Host %q: %d, want 421 (DNS rebinding guard)", h, code)
		}
	}
}
