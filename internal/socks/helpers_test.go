package socks

import (
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// user returns a User whose password is in a file.
func user(t testing.TB, name, pass string, allow ...string) User {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pass")
	if err := os.WriteFile(p, []byte(pass+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return User{Name: name, Password: config.Secret{File: p}, Allow: allow}
}

// startSocks validates cfg and serves it on a loopback listener over
// routes (an empty in-memory registry if nil); log goes to buf when given.
func startSocks(t *testing.T, cfg Config, routes registry.Reader, buf *testutil.LogBuffer) (*Server, string) {
	t.Helper()
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if routes == nil {
		routes = registry.NewMemory(nil)
	}
	log := testutil.Logger(t)
	if buf != nil {
		log = slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	s := New(cfg, routes, log)
	ln := testutil.Listen(t)
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ln) }()
	t.Cleanup(func() { s.Close(); <-done })
	return s, ln.Addr().String()
}

// dialFrom connects to addr from the loopback address src ("" any).
func dialFrom(t *testing.T, addr, src string) net.Conn {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c
}

// readN reads exactly n bytes or fails.
func readN(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("read %d bytes: %v (got %v)", n, err, b)
	}
	return b
}

// greet offers methods and returns the method the server chose.
func greet(t *testing.T, c net.Conn, methods ...byte) byte {
	t.Helper()
	if _, err := c.Write(append([]byte{5, byte(len(methods))}, methods...)); err != nil {
		t.Fatal(err)
	}
	b := readN(t, c, 2)
	if b[0] != 5 {
		t.Fatalf("method reply version %d", b[0])
	}
	return b[1]
}

// userPass sends an RFC 1929 request and returns the status byte.
func userPass(t *testing.T, c net.Conn, name, pass string) byte {
	t.Helper()
	req := append([]byte{1, byte(len(name))}, name...)
	req = append(append(req, byte(len(pass))), pass...)
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	b := readN(t, c, 2)
	if b[0] != 1 {
		t.Fatalf("auth reply version %d", b[0])
	}
	return b[1]
}

// login greets with username/password and authenticates; it fails the
// test unless both succeed.
func login(t *testing.T, c net.Conn, name, pass string) {
	t.Helper()
	if m := greet(t, c, 2); m != 2 {
		t.Fatalf("method %#x, want username/password (2)", m)
	}
	if st := userPass(t, c, name, pass); st != 0 {
		t.Fatalf("auth status %d for %s", st, name)
	}
}

// connectReq sends a CONNECT to an IP target and returns the reply code.
func connectReq(t *testing.T, c net.Conn, target string) byte {
	t.Helper()
	ap := netip.MustParseAddrPort(target)
	req := []byte{5, 1, 0}
	if ap.Addr().Is4() {
		a := ap.Addr().As4()
		req = append(append(req, 1), a[:]...)
	} else {
		a := ap.Addr().As16()
		req = append(append(req, 4), a[:]...)
	}
	req = binary.BigEndian.AppendUint16(req, ap.Port())
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	rep := readN(t, c, 4)
	switch rep[3] {
	case 1:
		readN(t, c, 6)
	case 4:
		readN(t, c, 18)
	}
	return rep[1]
}

// expectClosed waits until the server closes c, having sent nothing more.
func expectClosed(t *testing.T, c net.Conn, within time.Duration) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(within))
	n, err := c.Read(make([]byte, 64))
	if n > 0 {
		t.Fatalf("read %d more bytes, want the connection closed", n)
	}
	if err == nil || isTimeout(err) {
		t.Fatalf("connection still open after %v (%v)", within, err)
	}
}

func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// Reply codes (RFC 1928).
const (
	repOK          = 0x00
	repNotAllowed  = 0x02
	repUnreachable = 0x04
)

// logHas reports whether one line of the log holds every part.
func logHas(l *testutil.LogBuffer, parts ...string) bool {
	for _, line := range strings.Split(l.String(), "\n") {
		ok := true
		for _, p := range parts {
			if !strings.Contains(line, p) {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}
