package e2e

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// Helpers of the socksauth_* tests (prefix sa).

// saUser is a SOCKS5 user whose password is in a file.
func saUser(t *testing.T, name, pass string, allow ...string) socks.User {
	return socks.User{Name: name, Password: tokenFile(t, pass), Allow: allow}
}

// withSocksUsers runs the in-process SOCKS5 front end with users.
func withSocksUsers(max int, users ...socks.User) serverOpt {
	return func(c *server.Config) {
		c.Socks5 = &socks.Config{Listen: "127.0.0.1:0", MaxConnsPerSource: max, Users: users}
	}
}

// saDial connects to addr from the loopback address src ("" any).
func saDial(t *testing.T, addr, src string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// saConnect authenticates as user (RFC 1929) and CONNECTs to target. It
// returns the auth status (0 ok) and, after a good one, the reply code;
// the connection is usable when both are 0.
func saConnect(t *testing.T, c net.Conn, user, pass, target string) (auth, rep byte) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	req := append([]byte{5, 1, 2, 1, byte(len(user))}, user...)
	req = append(append(req, byte(len(pass))), pass...)
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	var b [4]byte
	if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 5 || b[1] != 2 || b[2] != 1 {
		t.Fatalf("greeting and auth: %v, %v", b, err)
	}
	if b[3] != 0 {
		return b[3], 0
	}
	ap := netip.MustParseAddrPort(target)
	a4 := ap.Addr().As4()
	creq := append([]byte{5, 1, 0, 1}, a4[:]...)
	creq = binary.BigEndian.AppendUint16(creq, ap.Port())
	if _, err := c.Write(creq); err != nil {
		t.Fatal(err)
	}
	var r [10]byte
	if _, err := io.ReadFull(c, r[:]); err != nil {
		t.Fatalf("connect reply: %v", err)
	}
	return 0, r[1]
}

// saEcho checks that c still carries data both ways.
func saEcho(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	echoOnce(t, c, msg)
}

// saLogHas reports whether one line of the log holds every part.
func saLogHas(l *testutil.LogBuffer, parts ...string) bool {
	for _, line := range strings.Split(l.String(), "\n") {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			return true
		}
	}
	return false
}

// SOCKS5 and HTTP proxy authentication and ACLs on the in-process front
// end, with the real curl: good credentials reach an allowed target,
// wrong ones are refused (SOCKS5 auth failure, HTTP 407), a target the
// ACL does not name is refused (SOCKS5 0x02, HTTP 403) although its
// route exists, and the proxy credentials never reach the target.
func TestSocksAuthWithCurl(t *testing.T) {
	curl := testutil.NeedBinary(t, "curl")
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "target saw "+r.Method+" "+r.URL.RequestURI()+" proxy-auth="+r.Header.Get("Proxy-Authorization"))
	})
	allowedSrv := httptest.NewServer(handler)
	defer allowedSrv.Close()
	deniedSrv := httptest.NewServer(handler)
	defer deniedSrv.Close()
	allowed := strings.TrimPrefix(allowedSrv.URL, "http://")
	denied := strings.TrimPrefix(deniedSrv.URL, "http://")
	allowedPort := allowed[strings.LastIndexByte(allowed, ':')+1:]

	var logs testutil.LogBuffer
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, logger(&logs), withSocksUsers(0,
		saUser(t, "alice", "alice-password", "127.0.0.1/32:"+allowedPort),
		saUser(t, "bob", "bob-password", "127.0.0.0/8:*")))
	startAgent(t, []string{srv.ControlAddr().String()}, []string{allowed, denied}, nil)
	waitRoute(t, reg, allowed, "")
	waitRoute(t, reg, denied, "")
	proxy := srv.SocksAddr().String()

	// run runs curl from the loopback address src (auth failure lines
	// are limited per source and second) and returns its output and
	// exit code.
	run := func(src string, args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command(curl, append([]string{"-sS", "--max-time", "10", "--interface", src}, args...)...)
		cmd.Env = cleanEnv()
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return string(out), ee.ExitCode()
		} else if err != nil {
			t.Fatalf("curl %v: %v", args, err)
		}
		return string(out), 0
	}
	want := func(name, out string, code, wantCode int, wantOut ...string) {
		t.Helper()
		if code != wantCode {
			t.Errorf("%s: curl exit %d, want %d\n%s", name, code, wantCode, out)
		}
		for _, w := range wantOut {
			if !strings.Contains(out, w) {
				t.Errorf("%s: output %q lacks %q", name, out, w)
			}
		}
	}
	seen := func(name string, parts ...string) {
		t.Helper()
		testutil.Eventually(t, 2*time.Second, name+": log line with "+strings.Join(parts, ", "), func() bool {
			return saLogHas(&logs, parts...)
		})
	}

	// SOCKS5.
	out, code := run("127.0.0.1", "--socks5", proxy, "--proxy-user", "alice:alice-password", "http://"+allowed+"/s5")
	want("socks5 good password", out, code, 0, "target saw GET /s5")
	out, code = run("127.0.0.1", "--socks5-hostname", "alice:alice-password@"+proxy, "http://"+allowed+"/s5h")
	want("socks5-hostname with credentials in the proxy URL", out, code, 0, "target saw GET /s5h")
	out, code = run("127.0.0.21", "--socks5", proxy, "--proxy-user", "alice:wrong-password", "http://"+allowed+"/")
	want("socks5 wrong password", out, code, 97)
	seen("socks5 wrong password", `msg="socks5 authentication failed"`, "client=127.0.0.21:", "user=alice")
	out, code = run("127.0.0.22", "--socks5", proxy, "--proxy-user", "mallory:alice-password", "http://"+allowed+"/")
	want("socks5 unknown user", out, code, 97)
	seen("socks5 unknown user", `msg="socks5 authentication failed"`, "client=127.0.0.22:", "user=mallory")
	out, code = run("127.0.0.23", "--socks5", proxy, "http://"+allowed+"/")
	want("socks5 without credentials", out, code, 97)
	seen("socks5 without credentials", "authentication is required", "client=127.0.0.23:")
	out, code = run("127.0.0.1", "--socks5", proxy, "--proxy-user", "alice:alice-password", "http://"+denied+"/")
	want("socks5 target outside the ACL", out, code, 97)
	seen("socks5 target outside the ACL", `msg="socks5 connect denied"`, "user=alice", "target="+denied+" ")
	out, code = run("127.0.0.1", "--socks5", proxy, "--proxy-user", "bob:bob-password", "http://"+denied+"/bob")
	want("socks5 another user's wider ACL", out, code, 0, "target saw GET /bob")

	// HTTP proxy.
	out, code = run("127.0.0.1", "-x", "http://alice:alice-password@"+proxy, "http://"+allowed+"/fwd")
	want("http good password", out, code, 0, "target saw GET /fwd proxy-auth=")
	if !strings.HasSuffix(out, "proxy-auth=") {
		t.Errorf("the proxy credentials reached the target: %q", out)
	}
	out, code = run("127.0.0.1", "-p", "-x", "http://alice:alice-password@"+proxy, "http://"+allowed+"/tunnel")
	want("http CONNECT good password", out, code, 0, "target saw GET /tunnel proxy-auth=")
	out, code = run("127.0.0.31", "-i", "-x", "http://"+proxy, "http://"+allowed+"/")
	want("http without credentials", out, code, 0, "407 Proxy Authentication Required", `Proxy-Authenticate: Basic realm="vpcreach"`)
	seen("http without credentials", `msg="http proxy: authentication required"`, "client=127.0.0.31:")
	out, code = run("127.0.0.32", "-i", "-x", "http://alice:wrong-password@"+proxy, "http://"+allowed+"/")
	want("http wrong password", out, code, 0, "407 Proxy Authentication Required")
	seen("http wrong password", `msg="http proxy: authentication failed"`, "client=127.0.0.32:", "user=alice")
	out, code = run("127.0.0.1", "-i", "-x", "http://alice:alice-password@"+proxy, "http://"+denied+"/")
	want("http target outside the ACL", out, code, 0, "403 Forbidden")
	seen("http target outside the ACL", `msg="http proxy: connect denied"`, "user=alice", "target="+denied+" ")
	out, code = run("127.0.0.1", "-p", "-x", "http://alice:alice-password@"+proxy, "http://"+denied+"/")
	want("http CONNECT outside the ACL", out, code, 56, "403")

	for _, secret := range []string{"alice-password", "bob-password", "wrong-password"} {
		if logs.Contains(secret) {
			t.Errorf("a password (%s) is in the log", secret)
		}
	}
	testutil.Eventually(t, 5*time.Second, "server counters", func() bool {
		m := scrape(t, srv.APIAddr())
		return m[`vpcreach_server_socks_connects_total{result="auth failed"}`] == 5 &&
			m[`vpcreach_server_socks_connects_total{result="denied"}`] == 3 &&
			m[`vpcreach_server_socks_connects_total{result="ok"}`] == 5
	})
}
