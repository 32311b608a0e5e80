package e2e

import (
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// SOCKS5 reply codes (RFC 1928).
const (
	repSuccess         = 0
	repHostUnreachable = 4
	repRefused         = 5
	repCmdNotSupported = 7
	repAddrNotSupp     = 8
)

func TestReplyCodes(t *testing.T) {
	echo := testutil.EchoTarget(t)
	closedPort := testutil.FreePort(t) // nothing listens: the target refuses
	refusing := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(closedPort)).String()
	_, _, socksAddr := single(t, echo, refusing)

	t.Run("no route is host unreachable at once", func(t *testing.T) {
		start := time.Now()
		_, rep := socksConnect(t, socksAddr, "10.255.255.1:6379")
		if rep != repHostUnreachable {
			t.Fatalf("reply %d, want %d", rep, repHostUnreachable)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("answer took %v, want <= 1 s", d)
		}
	})
	t.Run("target refuses", func(t *testing.T) {
		_, rep := socksConnect(t, socksAddr, refusing)
		if rep != repRefused {
			t.Fatalf("reply %d, want %d", rep, repRefused)
		}
	})
	ap := netip.MustParseAddrPort(echo)
	a4 := ap.Addr().As4()
	for _, cmd := range []struct {
		name string
		code byte
	}{{"BIND", 2}, {"UDP ASSOCIATE", 3}} {
		t.Run(cmd.name+" not supported", func(t *testing.T) {
			req := append([]byte{5, cmd.code, 0, 1}, a4[:]...)
			req = binary.BigEndian.AppendUint16(req, ap.Port())
			_, rep := socksRaw(t, socksAddr, req)
			if rep != repCmdNotSupported {
				t.Fatalf("reply %d, want %d", rep, repCmdNotSupported)
			}
		})
	}
	t.Run("ATYP 3 IP literal", func(t *testing.T) {
		host := ap.Addr().String()
		req := append([]byte{5, 1, 0, 3, byte(len(host))}, host...)
		req = binary.BigEndian.AppendUint16(req, ap.Port())
		c, rep := socksRaw(t, socksAddr, req)
		if rep != repSuccess {
			t.Fatalf("reply %d, want success", rep)
		}
		if _, err := c.Write([]byte("literal")); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "literal" {
			t.Fatalf("got %q, %v", got, err)
		}
	})
	t.Run("ATYP 3 name is not resolved", func(t *testing.T) {
		host := "db.internal.example"
		req := append([]byte{5, 1, 0, 3, byte(len(host))}, host...)
		req = binary.BigEndian.AppendUint16(req, 6379)
		_, rep := socksRaw(t, socksAddr, req)
		if rep != repAddrNotSupp {
			t.Fatalf("reply %d, want %d", rep, repAddrNotSupp)
		}
	})
	t.Run("data pipelined after CONNECT is not lost", func(t *testing.T) {
		c, err := net.Dial("tcp", socksAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		req := []byte{5, 1, 0, 5, 1, 0, 1}
		req = append(req, a4[:]...)
		req = binary.BigEndian.AppendUint16(req, ap.Port())
		req = append(req, "pipelined"...)
		if _, err := c.Write(req); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).CloseWrite()
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		// method reply (2) + connect reply (10) + echo
		if len(got) < 12 || got[3] != repSuccess || string(got[12:]) != "pipelined" {
			t.Fatalf("got %q", got)
		}
	})
}

func TestSocksHandshakeDeadline(t *testing.T) {
	reg := registry.NewMemory(nil)
	cfg := socks.Config{Listen: "127.0.0.1:0", HandshakeTimeout: 300 * time.Millisecond}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	s := socks.New(cfg, reg, testutil.Logger(t))
	ln := testutil.Listen(t)
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(ln) }()
	defer func() { s.Close(); <-done }()

	for _, stall := range [][]byte{nil, {5}, {5, 1, 0, 5, 1}} { // nothing, half a greeting, half a request
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		_, _ = c.Write(stall)
		start := time.Now()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = io.ReadAll(c)
		if d := time.Since(start); d > 2*time.Second || netx.IsTimeout(err) {
			t.Fatalf("stalled client (%v) still connected after %v (%v)", stall, d, err)
		}
		c.Close()
	}
}
