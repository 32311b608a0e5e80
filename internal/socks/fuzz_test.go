package socks

import (
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// FuzzServeConn feeds any bytes to the front end's own part of the path
// (protocol sniffing, the HTTP proxy request, RFC 1929 with users, the
// CONNECT handler): it answers or closes within the handshake deadline
// and never panics (a recovered panic is logged, and fails the fuzzer).
func FuzzServeConn(f *testing.F) {
	for _, seed := range []string{
		"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
		"\x05\x01\x02\x01\x04user\x08password\x05\x01\x00\x01\x0a\x01\x00\x05\x18\xeb",
		"\x05\x02\x00\x02\x05\x02\x00\x03\x09localhost\x00\x50",
		"CONNECT 10.1.0.5:6379 HTTP/1.1\r\nHost: 10.1.0.5:6379\r\n\r\n",
		"GET http://10.1.0.5:8080/x HTTP/1.1\r\nHost: 10.1.0.5:8080\r\nProxy-Authorization: Basic dXNlcjpwYXNzd29yZA==\r\n\r\n",
		"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
		"",
	} {
		f.Add([]byte(seed), false)
		f.Add([]byte(seed), true)
	}
	f.Fuzz(func(t *testing.T, data []byte, withUsers bool) {
		cfg := Config{Listen: "127.0.0.1:0", HandshakeTimeout: 200 * time.Millisecond, ConnectTimeout: 200 * time.Millisecond}
		if withUsers {
			t.Setenv("VPCREACH_FUZZ_PASS", "password")
			cfg.Users = []User{{Name: "user", Allow: []string{"10.0.0.0/8:*"}}}
			cfg.Users[0].Password.Env = "VPCREACH_FUZZ_PASS"
		}
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		var logs testutil.LogBuffer
		s := New(cfg, registry.NewMemory(nil), slog.New(slog.NewTextHandler(&logs, nil)))
		client, server := net.Pipe()
		done := make(chan struct{})
		go func() { defer close(done); s.ServeConn(server) }()
		// The input, then the end of the client's side: no waiting for the
		// handshake deadline on input that stops early.
		go func() { _, _ = client.Write(data); client.Close() }()
		_, _ = io.Copy(io.Discard, client)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("ServeConn still running 5 s after a 200 ms handshake deadline")
		}
		s.Close()
		if strings.Contains(logs.String(), "panic") {
			t.Fatalf("panic serving %q:\n%s", data, logs.String())
		}
	})
}
