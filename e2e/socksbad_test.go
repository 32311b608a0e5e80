package e2e

import (
	"bytes"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// SOCKS5 bad input, each case: the reply it gets (or a close), a log line,
// a bystander's open connection unaffected, goroutines and descriptors back
// to their baseline.
func TestSocksBadInput(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil)
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil)
	waitRoute(t, reg, echo, "")
	var logs testutil.LogBuffer
	cfg := socks.Config{Listen: "127.0.0.1:0", HandshakeTimeout: 500 * time.Millisecond}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	front := socks.New(cfg, reg, logger(&logs))
	ln := testutil.Listen(t)
	done := make(chan struct{})
	go func() { defer close(done); _ = front.Serve(ln) }()
	t.Cleanup(func() { front.Close(); <-done })
	addr := ln.Addr().String()

	bystander, rep := socksConnect(t, addr, echo)
	if rep != repSuccess {
		t.Fatalf("bystander: reply %d", rep)
	}
	echoOnce(t, bystander, "baseline")
	ip := []byte{127, 0, 0, 1}
	req := func(cmd, atyp byte, rest ...byte) []byte {
		return append([]byte{5, 1, 0, 5, cmd, 0, atyp}, rest...)
	}
	cases := []struct {
		name  string
		send  []byte
		reply []byte // expected prefix of the answer; nil: closed without one
		log   string
	}{
		// Not 5: the port reads it as HTTP, and answers so.
		{"wrong version", []byte{4, 1, 0, '\r', '\n', '\r', '\n'}, []byte("HTTP/1.1 400"), "http proxy: bad request"},
		{"zero methods", []byte{5, 0}, []byte{5, 0xFF}, "~does not offer the no-authentication method"},
		{"255 methods, none acceptable", append([]byte{5, 255}, bytes.Repeat([]byte{0x7F}, 255)...), []byte{5, 0xFF}, "~does not offer the no-authentication method"},
		{"no acceptable method", []byte{5, 1, 2}, []byte{5, 0xFF}, "~does not offer the no-authentication method"},
		{"truncated greeting", []byte{5, 3, 0}, nil, "socks5 request failed"},
		{"stalled greeting", []byte{5}, nil, "socks5 request failed"},
		{"BIND", req(2, 1, append(ip, 0, 80)...), []byte{5, 0, 5, 7}, "socks5 request failed"},
		{"UDP ASSOCIATE", req(3, 1, append(ip, 0, 80)...), []byte{5, 0, 5, 7}, "socks5 request failed"},
		{"unknown address type", req(1, 9, append(ip, 0, 80)...), []byte{5, 0, 5, 8}, "socks5 request failed"},
		{"port 0", req(1, 1, append(ip, 0, 0)...), []byte{5, 0, 5, 4}, "port 0"},
		{"a name, not resolved", req(1, 3, append([]byte{9}, []byte("localhost0P")...)...), []byte{5, 0, 5, 8}, "names are not resolved"},
	}
	baseG, baseFD := runtime.NumGoroutine(), openFDs(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := len(logs.String())
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_, _ = c.Write(tc.send)
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			got, err := io.ReadAll(c)
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("not closed within 5 s (the handshake deadline is 500 ms)")
			}
			if tc.reply == nil && len(got) > 0 && tc.name != "truncated greeting" {
				t.Fatalf("got %x; want a close without a reply", got)
			}
			if tc.reply != nil && !bytes.HasPrefix(got, tc.reply) {
				t.Fatalf("got %x; want a reply starting %x", got, tc.reply)
			}
			if tc.log != "" {
				// "~": a line rate-limited per source (one a second, the
				// rest counted in the next): it may come from an earlier case.
				want, from := tc.log, before
				if strings.HasPrefix(want, "~") {
					want, from = want[1:], 0
				}
				testutil.Eventually(t, 5*time.Second, "log line "+want, func() bool {
					return strings.Contains(logs.String()[from:], want)
				})
			}
			echoOnce(t, bystander, "unaffected by "+tc.name)
		})
	}
	testutil.Eventually(t, 5*time.Second, "goroutines and descriptors back to the baseline", func() bool {
		return runtime.NumGoroutine() <= baseG && openFDs(t) <= baseFD
	})

	// Malformed RFC 1929 requests, against a front end with a user.
	t.Setenv("VPCREACH_E2E_SOCKS_PASS", "password-1234")
	acfg := socks.Config{Listen: "127.0.0.1:0", HandshakeTimeout: 500 * time.Millisecond,
		Users: []socks.User{{Name: "user", Password: config.Secret{Env: "VPCREACH_E2E_SOCKS_PASS"}, Allow: []string{"127.0.0.0/8:*"}}}}
	if err := acfg.Validate(); err != nil {
		t.Fatal(err)
	}
	authed := socks.New(acfg, reg, logger(&logs))
	aln := testutil.Listen(t)
	adone := make(chan struct{})
	go func() { defer close(adone); _ = authed.Serve(aln) }()
	t.Cleanup(func() { authed.Close(); <-adone })
	greet := []byte{5, 1, 2}
	for _, tc := range []struct {
		name  string
		send  []byte
		reply []byte
	}{
		{"RFC 1929 empty name", append(greet, 1, 0, 4, 'p', 'a', 's', 's'), []byte{5, 2, 1, 1}},
		{"RFC 1929 wrong version", append(greet, 2, 4, 'u', 's', 'e', 'r', 4, 'p', 'a', 's', 's'), []byte{5, 2, 1, 1}},
		{"RFC 1929 truncated", append(greet, 1, 9, 'u', 's'), []byte{5, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("tcp", aln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_, _ = c.Write(tc.send)
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			got, err := io.ReadAll(c)
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("not closed within 5 s (the handshake deadline is 500 ms)")
			}
			if !bytes.Equal(got, tc.reply) {
				t.Fatalf("got %x; want %x", got, tc.reply)
			}
			testutil.Eventually(t, 5*time.Second, "log line", func() bool {
				return logs.Contains("socks5 authentication: bad or incomplete request")
			})
			echoOnce(t, bystander, "unaffected by "+tc.name)
		})
	}
	testutil.Eventually(t, 5*time.Second, "goroutines and descriptors back after the RFC 1929 cases", func() bool {
		return runtime.NumGoroutine() <= baseG+3 && openFDs(t) <= baseFD+1 // + the second front end and its listener
	})
}
