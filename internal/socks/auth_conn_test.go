package socks

import (
	"bufio"
	"encoding/base64"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// The registry in these tests is empty: a CONNECT the ACL allows is
// answered "host unreachable" (no route), one it denies "not allowed by
// ruleset", so the reply code tells the two apart without a target.

// src returns the n-th test source address, so that each case's log line
// is its own (auth failure lines are limited per source and second).
func src(n int) string { return fmt.Sprintf("127.0.0.%d", 10+n) }

func TestSocks5UsernamePassword(t *testing.T) {
	var logs testutil.LogBuffer
	s, addr := startSocks(t, Config{Users: []User{
		user(t, "alice", "alice-password", "10.1.0.0/16:6379", "10.2.0.5:80-443"),
		user(t, "bob", "bob-password", "10.0.0.0/8:*"),
	}}, nil, &logs)

	// A bystander, authenticated before the bad clients and served after.
	bystander := dialFrom(t, addr, "127.0.0.2")
	login(t, bystander, "bob", "bob-password")

	t.Run("good password", func(t *testing.T) {
		c := dialFrom(t, addr, src(0))
		login(t, c, "alice", "alice-password")
		if rep := connectReq(t, c, "10.1.0.5:6379"); rep != repUnreachable {
			t.Fatalf("reply %#x, want %#x (allowed, no route)", rep, repUnreachable)
		}
	})
	for i, tc := range []struct {
		name, user, pass string
	}{
		{"bad password", "alice", "alice-passwore"},
		{"unknown user", "mallory", "alice-password"},
		{"another user's password", "alice", "bob-password"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			source := src(1 + i)
			c := dialFrom(t, addr, source)
			if m := greet(t, c, 0, 2); m != 2 {
				t.Fatalf("method %#x, want 2 (no-auth must not be chosen once users exist)", m)
			}
			if st := userPass(t, c, tc.user, tc.pass); st == 0 {
				t.Fatal("authenticated")
			}
			expectClosed(t, c, 2*time.Second)
			testutil.Eventually(t, 2*time.Second, "log line", func() bool {
				return logHas(&logs, `msg="socks5 authentication failed"`, "client="+source+":", "user="+tc.user)
			})
		})
	}
	for i, tc := range []struct {
		name  string
		req   []byte
		reply bool // a failure status comes before the close
		log   string
	}{
		{"zero-length name", []byte{1, 0, 8, 'p', 'a', 's', 's', 'w', 'o', 'r', 'd'}, true, "empty user name"},
		{"wrong subnegotiation version", append([]byte{5, 5}, "alice\x0ealice-password"...), true, "version 5, want 1"},
		{"truncated name", []byte{1, 5, 'a', 'l'}, false, "truncated"},
		{"truncated password", append([]byte{1, 5}, "alice\x0ealice"...), false, "truncated"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			source := src(4 + i)
			c := dialFrom(t, addr, source)
			if m := greet(t, c, 2); m != 2 {
				t.Fatalf("method %#x", m)
			}
			if _, err := c.Write(tc.req); err != nil {
				t.Fatal(err)
			}
			if !tc.reply {
				_ = c.(*net.TCPConn).CloseWrite()
			} else if b := readN(t, c, 2); b[0] != 1 || b[1] == 0 {
				t.Fatalf("reply %v, want version 1 and a failure", b)
			}
			expectClosed(t, c, 2*time.Second)
			testutil.Eventually(t, 2*time.Second, "log line for "+tc.name, func() bool {
				return logHas(&logs, `msg="socks5 authentication: bad or incomplete request"`, "client="+source+":", tc.log)
			})
		})
	}
	t.Run("only no-auth offered", func(t *testing.T) {
		source := src(8)
		c := dialFrom(t, addr, source)
		if m := greet(t, c, 0); m != 0xff {
			t.Fatalf("method %#x, want 0xff (no acceptable method)", m)
		}
		expectClosed(t, c, 2*time.Second)
		testutil.Eventually(t, 2*time.Second, "log line", func() bool {
			return logHas(&logs, "authentication is required", "client="+source+":")
		})
	})
	t.Run("acl", func(t *testing.T) {
		for _, tc := range []struct {
			target string
			want   byte
		}{
			{"10.1.0.5:6379", repUnreachable}, // CIDR and port
			{"10.1.0.5:6380", repNotAllowed},  // port
			{"10.3.0.5:6379", repNotAllowed},  // CIDR
			{"10.2.0.5:80", repUnreachable},   // range, low end
			{"10.2.0.5:443", repUnreachable},  // range, high end
			{"10.2.0.5:444", repNotAllowed},   // past the range
			{"10.2.0.6:443", repNotAllowed},   // a /32
		} {
			c := dialFrom(t, addr, src(0))
			login(t, c, "alice", "alice-password")
			if rep := connectReq(t, c, tc.target); rep != tc.want {
				t.Errorf("alice -> %s: reply %#x, want %#x", tc.target, rep, tc.want)
			}
			if tc.want == repNotAllowed {
				testutil.Eventually(t, 2*time.Second, "denial line for "+tc.target, func() bool {
					return logHas(&logs, `msg="socks5 connect denied"`, "user=alice", "target="+tc.target+" ")
				})
			}
		}
	})

	// The bystander is served as if nothing happened.
	if rep := connectReq(t, bystander, "10.9.9.9:1"); rep != repUnreachable {
		t.Fatalf("bystander reply %#x", rep)
	}
	bystander.Close()
	if got := s.results.Get("auth failed"); got != 4 {
		t.Errorf("auth failed = %d, want 4 (three wrong credentials, one client without the method)", got)
	}
	if got := s.results.Get("bad request"); got != 4 {
		t.Errorf("bad request = %d, want 4 (malformed subnegotiations)", got)
	}
	if got := s.results.Get("denied"); got != 4 {
		t.Errorf("denied = %d, want 4", got)
	}
	for _, secret := range []string{"alice-password", "bob-password", "alice-passwore"} {
		if logs.Contains(secret) {
			t.Errorf("a password (%s) is in the log", secret)
		}
	}
	testutil.Eventually(t, 5*time.Second, "every connection closed", func() bool { return s.open.Load() == 0 })
}

func TestSocks5NetworkACL(t *testing.T) {
	var logs testutil.LogBuffer
	_, addr := startSocks(t, Config{Network: "vpc-a", Users: []User{
		user(t, "ops", "ops-password", "vpc-a/10.1.0.0/16:*", "10.2.0.0/16:*", "vpc-b/10.3.0.0/16:*", "*/10.4.0.0/16:22"),
	}}, nil, &logs)
	for _, tc := range []struct {
		target string
		want   byte
	}{
		{"10.1.0.5:80", repUnreachable}, // vpc-a rule
		{"10.2.0.5:80", repNotAllowed},  // a rule of the default network
		{"10.3.0.5:80", repNotAllowed},  // a rule of vpc-b
		{"10.4.0.5:22", repUnreachable}, // every network
		{"10.4.0.5:23", repNotAllowed},
	} {
		c := dialFrom(t, addr, "")
		login(t, c, "ops", "ops-password")
		if rep := connectReq(t, c, tc.target); rep != tc.want {
			t.Errorf("%s: reply %#x, want %#x", tc.target, rep, tc.want)
		}
	}
	testutil.Eventually(t, 2*time.Second, "a denial line naming the network", func() bool {
		return logHas(&logs, `msg="socks5 connect denied"`, "user=ops", "target=vpc-a/10.2.0.5:80 ")
	})
}

func TestSocks5WithoutUsers(t *testing.T) {
	_, addr := startSocks(t, Config{}, nil, nil)
	c := dialFrom(t, addr, "")
	if m := greet(t, c, 2, 0); m != 0 {
		t.Fatalf("method %#x, want no-auth", m)
	}
	if rep := connectReq(t, c, "10.1.0.5:6379"); rep != repUnreachable {
		t.Fatalf("reply %#x", rep)
	}
	c = dialFrom(t, addr, "")
	if m := greet(t, c, 2); m != 0xff {
		t.Fatalf("method %#x for a client offering username/password only, want 0xff", m)
	}
}

// The handshake deadline covers the authentication phase.
func TestSocks5AuthStallsHitDeadline(t *testing.T) {
	var logs testutil.LogBuffer
	s, addr := startSocks(t, Config{HandshakeTimeout: 300 * time.Millisecond,
		Users: []User{user(t, "alice", "alice-password", "10.0.0.0/8:*")}}, nil, &logs)
	for i, tc := range []struct {
		name  string
		stall func(c net.Conn)
	}{
		{"before the subnegotiation", func(c net.Conn) { greet(t, c, 2) }},
		{"in the middle of the name", func(c net.Conn) { greet(t, c, 2); _, _ = c.Write([]byte{1, 5, 'a'}) }},
		{"after authenticating", func(c net.Conn) { login(t, c, "alice", "alice-password") }},
	} {
		c := dialFrom(t, addr, src(20+i))
		tc.stall(c)
		start := time.Now()
		expectClosed(t, c, 3*time.Second)
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%s: closed after %v", tc.name, d)
		}
	}
	testutil.Eventually(t, 2*time.Second, "timeout log lines", func() bool {
		return strings.Count(logs.String(), "i/o timeout") >= 3
	})
	testutil.Eventually(t, 2*time.Second, "every connection closed", func() bool { return s.open.Load() == 0 })
}

// httpProxy sends one proxy request and reads the response.
func httpProxy(t *testing.T, addr, source, req string) *http.Response {
	t.Helper()
	c := dialFrom(t, addr, source)
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp
}

func TestHTTPProxyAuth(t *testing.T) {
	var logs testutil.LogBuffer
	s, addr := startSocks(t, Config{Users: []User{user(t, "alice", "alice-password", "10.1.0.0/16:6379")}}, nil, &logs)
	basic := func(u, p string) string {
		return "Proxy-Authorization: Basic " + b64(u+":"+p) + "\r\n"
	}
	for i, tc := range []struct {
		name, req string
		code      int
		log       string
	}{
		{"no credentials", "CONNECT 10.1.0.5:6379 HTTP/1.1\r\nHost: 10.1.0.5:6379\r\n\r\n",
			407, `msg="http proxy: authentication required"`},
		{"wrong password", "CONNECT 10.1.0.5:6379 HTTP/1.1\r\nHost: 10.1.0.5:6379\r\n" + basic("alice", "wrong-password") + "\r\n",
			407, `msg="http proxy: authentication failed"|client=` + src(31) + `:|user=alice`},
		{"unknown user, forward", "GET http://10.1.0.5:6379/ HTTP/1.1\r\nHost: 10.1.0.5:6379\r\n" + basic("mallory", "alice-password") + "\r\n",
			407, "user=mallory"},
		{"not in the ACL", "CONNECT 10.1.0.5:6380 HTTP/1.1\r\nHost: 10.1.0.5:6380\r\n" + basic("alice", "alice-password") + "\r\n",
			403, `msg="http proxy: connect denied"|client=` + src(33) + `:|user=alice|target=10.1.0.5:6380`},
		{"allowed", "GET http://10.1.0.5:6379/x HTTP/1.1\r\nHost: 10.1.0.5:6379\r\n" + basic("alice", "alice-password") + "\r\n",
			502, `msg="http proxy: connect failed"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := httpProxy(t, addr, src(30+i), tc.req)
			if resp.StatusCode != tc.code {
				t.Fatalf("status %d, want %d", resp.StatusCode, tc.code)
			}
			if tc.code == 407 && resp.Header.Get("Proxy-Authenticate") != `Basic realm="vpcreach"` {
				t.Errorf("Proxy-Authenticate = %q", resp.Header.Get("Proxy-Authenticate"))
			}
			testutil.Eventually(t, 2*time.Second, "log "+tc.log, func() bool { return logHas(&logs, strings.Split(tc.log, "|")...) })
		})
	}
	if got := s.results.Get("auth failed"); got != 3 {
		t.Errorf("auth failed = %d, want 3", got)
	}
	if got := s.results.Get("denied"); got != 1 {
		t.Errorf("denied = %d, want 1", got)
	}
	if logs.Contains("alice-password") || logs.Contains(b64("alice:alice-password")) {
		t.Error("a password is in the log")
	}
}

// max_conns_per_source: the connection over the cap is closed at once,
// with one log line per source and second and a counter; the others,
// and other sources, are served.
func TestPerSourceCap(t *testing.T) {
	var logs testutil.LogBuffer
	s, addr := startSocks(t, Config{MaxConnsPerSource: 3}, nil, &logs)
	var held []net.Conn
	for range 3 {
		c := dialFrom(t, addr, "127.0.0.5")
		if m := greet(t, c, 0); m != 0 {
			t.Fatalf("method %#x", m)
		}
		held = append(held, c)
	}
	for range 2 {
		c := dialFrom(t, addr, "127.0.0.5")
		expectClosed(t, c, 2*time.Second)
	}
	if got := s.capped.Load(); got != 2 {
		t.Errorf("capped = %d, want 2", got)
	}
	testutil.Eventually(t, 2*time.Second, "cap log line", func() bool {
		return logHas(&logs, `msg="connection refused: too many connections from this source"`, "client=127.0.0.5:", "max_conns_per_source=3")
	})
	if n := strings.Count(logs.String(), "too many connections"); n != 1 {
		t.Errorf("%d cap log lines within a second, want 1", n)
	}
	// Another source is not counted with this one.
	other := dialFrom(t, addr, "127.0.0.6")
	if m := greet(t, other, 0); m != 0 {
		t.Fatalf("other source: method %#x", m)
	}
	// The held connections are served.
	for _, c := range held[1:] {
		if rep := connectReq(t, c, "10.1.0.5:80"); rep != repUnreachable {
			t.Fatalf("held connection: reply %#x", rep)
		}
	}
	// Once they are gone, the source may connect again.
	held[0].Close()
	testutil.Eventually(t, 5*time.Second, "a new connection once below the cap", func() bool {
		d := net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 5)}}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return false
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(time.Second))
		_, _ = c.Write([]byte{5, 1, 0})
		b := make([]byte, 2)
		_, err = c.Read(b)
		return err == nil && b[1] == 0
	})
	other.Close()
	testutil.Eventually(t, 5*time.Second, "every connection closed", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.sources) == 0 && s.open.Load() == 0
	})
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestLogLimit(t *testing.T) {
	now := time.Unix(1000, 0)
	l := newLogLimit(time.Second)
	l.now = func() time.Time { return now }
	for i, want := range []bool{true, false, false} {
		if ok, _ := l.allow("a"); ok != want {
			t.Fatalf("line %d: %v", i, ok)
		}
	}
	if ok, _ := l.allow("b"); !ok {
		t.Fatal("another key held back")
	}
	now = now.Add(time.Second)
	if ok, held := l.allow("a"); !ok || held != 2 {
		t.Fatalf("after a second: %v, held %d; want true, 2", ok, held)
	}
	// A flood of keys is bounded; expired keys make room again.
	for i := range 2 * maxLogKeys {
		l.allow(fmt.Sprint(i))
	}
	if len(l.last) > maxLogKeys {
		t.Fatalf("%d keys kept", len(l.last))
	}
	if ok, _ := l.allow("late"); ok {
		t.Fatal("a new key logged while the table is full")
	}
	now = now.Add(time.Second)
	if ok, _ := l.allow("late"); !ok {
		t.Fatal("a new key held back after the others expired")
	}
}

func TestApplyUsers(t *testing.T) {
	var logs testutil.LogBuffer
	base := Config{Listen: "127.0.0.1:1080"}
	s, addr := startSocks(t, base, nil, &logs)
	apply := func(c Config) error {
		t.Helper()
		if err := c.Validate(); err != nil {
			t.Fatal(err)
		}
		return s.Apply(c)
	}
	// An anonymous client mid-handshake when users appear: its CONNECT is
	// refused by the new rules.
	anon := dialFrom(t, addr, "")
	if m := greet(t, anon, 0); m != 0 {
		t.Fatalf("method %#x", m)
	}
	alice := user(t, "alice", "alice-password", "10.1.0.0/16:*")
	if err := apply(Config{Listen: base.Listen, Users: []User{alice}}); err != nil {
		t.Fatal(err)
	}
	if rep := connectReq(t, anon, "10.1.0.5:80"); rep != repNotAllowed {
		t.Fatalf("anonymous CONNECT after users appeared: reply %#x", rep)
	}
	c := dialFrom(t, addr, "")
	if m := greet(t, c, 0); m != 0xff {
		t.Fatalf("no-auth still offered: %#x", m)
	}
	c = dialFrom(t, addr, "")
	login(t, c, "alice", "alice-password")

	// Add bob, narrow alice; alice's open handshake sees the narrower ACL.
	if err := apply(Config{Listen: base.Listen, Users: []User{
		user(t, "alice", "alice-password", "10.1.0.0/24:*"), user(t, "bob", "bob-password", "10.0.0.0/8:*")}}); err != nil {
		t.Fatal(err)
	}
	if rep := connectReq(t, c, "10.1.1.5:80"); rep != repNotAllowed {
		t.Fatalf("alice after narrowing: reply %#x", rep)
	}
	b := dialFrom(t, addr, "")
	login(t, b, "bob", "bob-password")
	// Remove alice: she cannot log in; bob's handshake goes on.
	if err := apply(Config{Listen: base.Listen, Users: []User{user(t, "bob", "bob-password", "10.0.0.0/8:*")}}); err != nil {
		t.Fatal(err)
	}
	c = dialFrom(t, addr, src(40))
	greet(t, c, 2)
	if st := userPass(t, c, "alice", "alice-password"); st == 0 {
		t.Fatal("a removed user logged in")
	}
	if rep := connectReq(t, b, "10.1.1.5:80"); rep != repUnreachable {
		t.Fatalf("bob: reply %#x", rep)
	}
	// listen cannot change live; nothing else changes either.
	err := apply(Config{Listen: "127.0.0.1:1081"})
	if !errors.Is(err, ErrRestartNeeded) || !strings.Contains(err.Error(), "listen") {
		t.Fatalf("listen change: %v", err)
	}
	c = dialFrom(t, addr, "")
	login(t, c, "bob", "bob-password")
	// Without users, no authentication again.
	if err := apply(Config{Listen: base.Listen}); err != nil {
		t.Fatal(err)
	}
	c = dialFrom(t, addr, "")
	if m := greet(t, c, 0); m != 0 {
		t.Fatalf("method %#x after the users were removed", m)
	}
	if !logHas(&logs, `msg="socks5 settings applied"`, "users=1 auth_required=true") { // logged before Apply returns
		t.Errorf("no apply log line:\n%s", logs.String())
	}
}

// Over all sources together, at most logBurst limited lines a second get
// through: a storm from many addresses cannot flood the log either.
func TestLogLimitedOverall(t *testing.T) {
	var logs testutil.LogBuffer
	cfg := Config{Listen: "127.0.0.1:0"}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	s := New(cfg, nil, slog.New(slog.NewTextHandler(&logs, nil)))
	for i := range 3 * logBurst {
		s.logLimited("auth", fmt.Sprintf("10.0.%d.%d:1234", i/250, i%250), "storm line")
	}
	if n := strings.Count(logs.String(), "storm line"); n != logBurst {
		t.Fatalf("%d lines from %d sources within a second, want %d", n, 3*logBurst, logBurst)
	}
}

// A connection a reload closed stays tracked until its handler ends; a
// further reload before then does not revoke (count, log) it again.
func TestApplyRevokesOnce(t *testing.T) {
	bob := func(acl string) Config {
		return Config{Listen: "127.0.0.1:1080", Users: []User{user(t, "bob", "bob-password", acl)}}
	}
	s := New(bob("10.0.0.0/8:*"), nil, testutil.Logger(t))
	c, peer := net.Pipe()
	defer c.Close()
	defer peer.Close()
	key, err := registry.ParseKey("10.1.0.5:80")
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	st := &connState{user: s.live.Load().auth.users[0], key: key, connected: true}
	s.conns[c] = st // as serve does; its handler has not ended yet
	s.mu.Unlock()
	if err := s.Apply(bob("10.2.0.0/16:*")); err != nil { // bob no longer reaches 10.1.0.5
		t.Fatal(err)
	}
	if err := s.Apply(bob("10.3.0.0/16:*")); err != nil {
		t.Fatal(err)
	}
	if n := s.revoked.Load(); n != 1 {
		t.Fatalf("revoked %d times, want 1", n)
	}
}
