package proxyproto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// sig is the v2 signature, written out from the spec (section 2.2) rather
// than taken from the package.
var sig = []byte("\r\n\r\n\x00\r\nQUIT\n")

// cat joins byte slices and strings into one slice.
func cat(parts ...any) []byte {
	var b []byte
	for _, p := range parts {
		switch p := p.(type) {
		case []byte:
			b = append(b, p...)
		case string:
			b = append(b, p...)
		case byte:
			b = append(b, p)
		case int: // a 2-byte big-endian length or port
			b = binary.BigEndian.AppendUint16(b, uint16(p))
		default:
			panic("cat: bad part")
		}
	}
	return b
}

// hdr builds a v2 header by hand: ver/cmd, fam/proto, then body with the
// length field computed from it.
func hdr(verCmd, fam byte, body ...any) []byte {
	bd := cat(body...)
	return cat(sig, verCmd, fam, len(bd), bd)
}

var (
	ap  = netip.MustParseAddrPort
	src = ap("192.0.2.1:5000")
	dst = ap("198.51.100.2:7000")
)

// haproxyTCP4 is the header haproxy 2.6 sends with send-proxy-v2 (no
// proxy-v2-options) for a client 192.0.2.1:5000 connected to
// 198.51.100.2:7000: built byte by byte from the spec.
var haproxyTCP4 = []byte{
	0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, // signature
	0x21,       // version 2, command PROXY
	0x11,       // AF_INET, STREAM
	0x00, 0x0C, // 12 bytes of addresses follow
	192, 0, 2, 1, // source address
	198, 51, 100, 2, // destination address
	0x13, 0x88, // source port 5000
	0x1B, 0x58, // destination port 7000
}

// haproxyLocal is what haproxy's check-send-proxy health checks send: LOCAL
// command, UNSPEC family, no address block.
var haproxyLocal = []byte{
	0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
	0x20, 0x00, 0x00, 0x00,
}

func TestHAProxyInterop(t *testing.T) {
	if got := AppendV2(nil, src, dst); !bytes.Equal(got, haproxyTCP4) {
		t.Fatalf("AppendV2 = % x\nhaproxy sends % x", got, haproxyTCP4)
	}
	r := bytes.NewReader(cat(haproxyTCP4, "GET / HTTP/1.1\r\n"))
	h, err := Read(r)
	if err != nil {
		t.Fatal(err)
	}
	if want := (Header{Source: src, Dest: dst}); h != want {
		t.Fatalf("Read = %+v; want %+v", h, want)
	}
	if !h.Source.Addr().Is4() {
		t.Fatalf("source %v is not a 4-byte address", h.Source)
	}
	if rest, _ := io.ReadAll(r); string(rest) != "GET / HTTP/1.1\r\n" {
		t.Fatalf("after the header: %q", rest)
	}

	if got := AppendLocal(nil); !bytes.Equal(got, haproxyLocal) {
		t.Fatalf("AppendLocal = % x\nhaproxy sends % x", got, haproxyLocal)
	}
	h, err = Read(bytes.NewReader(haproxyLocal))
	if err != nil || h != (Header{Local: true}) {
		t.Fatalf("Read(LOCAL) = %+v, %v", h, err)
	}
}

func TestRoundTrip(t *testing.T) {
	cases := []struct {
		name           string
		src, dst       netip.AddrPort
		wantSrc, wantD netip.AddrPort
		wantLen        int
	}{
		{"v4", src, dst, src, dst, 28},
		{"v6", ap("[2001:db8::1]:443"), ap("[2001:db8:ffff::2]:65535"), ap("[2001:db8::1]:443"), ap("[2001:db8:ffff::2]:65535"), 52},
		{"v4 ports 0", ap("0.0.0.0:0"), ap("255.255.255.255:0"), ap("0.0.0.0:0"), ap("255.255.255.255:0"), 28},
		{"mapped both become v4", ap("[::ffff:192.0.2.1]:5000"), ap("[::ffff:198.51.100.2]:7000"), src, dst, 28},
		{"mixed becomes v6", src, ap("[2001:db8::2]:7000"), src, ap("[2001:db8::2]:7000"), 52},
		{"mixed other way", ap("[2001:db8::1]:1"), dst, ap("[2001:db8::1]:1"), dst, 52},
		{"zone dropped", ap("[fe80::1%eth0]:22"), ap("[fe80::2]:2222"), ap("[fe80::1]:22"), ap("[fe80::2]:2222"), 52},
		{"invalid is ::", netip.AddrPort{}, ap("[2001:db8::2]:80"), ap("[::]:0"), ap("[2001:db8::2]:80"), 52},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			enc := AppendV2([]byte("prefix"), c.src, c.dst)
			if !bytes.HasPrefix(enc, []byte("prefix")) {
				t.Fatalf("AppendV2 did not append: % x", enc)
			}
			enc = enc[len("prefix"):]
			if len(enc) != c.wantLen {
				t.Fatalf("header is %d bytes; want %d", len(enc), c.wantLen)
			}
			want := Header{Source: c.wantSrc, Dest: c.wantD}
			for _, oneByte := range []bool{false, true} {
				br := bytes.NewReader(cat(enc, "VPCREACH after"))
				var r io.Reader = br
				if oneByte {
					r = iotest.OneByteReader(br)
				}
				h, err := Read(r)
				if err != nil {
					t.Fatal(err)
				}
				if h != want {
					t.Fatalf("Read = %+v; want %+v", h, want)
				}
				if rest, _ := io.ReadAll(br); string(rest) != "VPCREACH after" {
					t.Fatalf("after the header (one byte at a time: %v): %q", oneByte, rest)
				}
			}
		})
	}
}

func TestLocal(t *testing.T) {
	enc := AppendLocal([]byte{0xEE})
	if enc[0] != 0xEE || !bytes.Equal(enc[1:], haproxyLocal) {
		t.Fatalf("AppendLocal did not append: % x", enc)
	}
	r := bytes.NewReader(cat(haproxyLocal, "rest"))
	h, err := Read(r)
	if err != nil || h != (Header{Local: true}) {
		t.Fatalf("Read = %+v, %v; want Local", h, err)
	}
	if rest, _ := io.ReadAll(r); string(rest) != "rest" {
		t.Fatalf("after the header: %q", rest)
	}
}

// TestLocalIgnoresProtocolBlock: with LOCAL the receiver discards the
// family and whatever block follows, even when it is not a valid one.
func TestLocalIgnoresProtocolBlock(t *testing.T) {
	for _, in := range [][]byte{
		hdr(0x20, 0x11, []byte{192, 0, 2, 1, 198, 51, 100, 2}, 5000, 7000),
		hdr(0x20, 0x21, "short"), // too short for IPv6, but ignored
		hdr(0x20, 0xFF, []byte{1, 2, 3}),
		hdr(0x20, 0x00, byte(0x04), 3, "abc"), // UNSPEC with a NOOP TLV
	} {
		r := bytes.NewReader(cat(in, "rest"))
		h, err := Read(r)
		if err != nil || h != (Header{Local: true}) {
			t.Fatalf("Read(% x) = %+v, %v; want Local", in, h, err)
		}
		if rest, _ := io.ReadAll(r); string(rest) != "rest" {
			t.Fatalf("after % x: %q", in, rest)
		}
	}
}

func TestTLVsSkipped(t *testing.T) {
	tlvs := cat(
		byte(0x01), 2, "h2", // PP2_TYPE_ALPN
		byte(0x02), 11, "example.com", // PP2_TYPE_AUTHORITY
		byte(0x03), 4, []byte{0xDE, 0xAD, 0xBE, 0xEF}, // PP2_TYPE_CRC32C (not checked)
		byte(0x20), 5, []byte{0x07, 0, 0, 0, 0}, // PP2_TYPE_SSL
		byte(0x04), 0, // PP2_TYPE_NOOP
	)
	v6src, v6dst := ap("[2001:db8::1]:40000"), ap("[2001:db8::2]:443")
	s16, d16 := v6src.Addr().As16(), v6dst.Addr().As16()
	for _, c := range []struct {
		in   []byte
		want Header
	}{
		{hdr(0x21, 0x11, []byte{192, 0, 2, 1, 198, 51, 100, 2}, 5000, 7000, tlvs), Header{Source: src, Dest: dst}},
		{hdr(0x21, 0x21, s16[:], d16[:], 40000, 443, tlvs), Header{Source: v6src, Dest: v6dst}},
		// The TLV part is not parsed: a truncated TLV inside the length is skipped too.
		{hdr(0x21, 0x11, []byte{192, 0, 2, 1, 198, 51, 100, 2}, 5000, 7000, byte(0x02), 200), Header{Source: src, Dest: dst}},
	} {
		r := bytes.NewReader(cat(c.in, "\x00rest"))
		h, err := Read(r)
		if err != nil {
			t.Fatal(err)
		}
		if h != c.want {
			t.Fatalf("Read = %+v; want %+v", h, c.want)
		}
		if rest, _ := io.ReadAll(r); string(rest) != "\x00rest" {
			t.Fatalf("after the header: %q", rest)
		}
	}
}

func TestMaxHeaderExactly(t *testing.T) {
	pad := make([]byte, MaxHeader-fixedLen-12-3)
	in := hdr(0x21, 0x11, []byte{192, 0, 2, 1, 198, 51, 100, 2}, 5000, 7000, byte(0x04), len(pad), pad)
	if len(in) != MaxHeader {
		t.Fatalf("test header is %d bytes", len(in))
	}
	r := bytes.NewReader(cat(in, "x"))
	h, err := Read(r)
	if err != nil || h != (Header{Source: src, Dest: dst}) {
		t.Fatalf("Read of a MaxHeader-byte header = %+v, %v", h, err)
	}
	if r.Len() != 1 {
		t.Fatalf("%d bytes left; want 1", r.Len())
	}
}

// TestFallbackToLocal: PROXY with a family that gives no TCP client
// address (UNSPEC, UDP, AF_UNIX) means "use the connection's endpoints".
func TestFallbackToLocal(t *testing.T) {
	v4 := cat([]byte{192, 0, 2, 1, 198, 51, 100, 2}, 5000, 7000)
	v6 := make([]byte, 36)
	unix := make([]byte, 216)
	copy(unix, "/run/client.sock")
	for _, in := range [][]byte{
		hdr(0x21, 0x00),
		hdr(0x21, 0x00, "ignored block"),
		hdr(0x21, 0x12, v4),
		hdr(0x21, 0x22, v6),
		hdr(0x21, 0x31, unix),
		hdr(0x21, 0x32, unix, byte(0x04), 0),
	} {
		r := bytes.NewReader(cat(in, "rest"))
		h, err := Read(r)
		if err != nil || h != (Header{Local: true}) {
			t.Fatalf("Read(fam %#x) = %+v, %v; want Local", in[13], h, err)
		}
		if rest, _ := io.ReadAll(r); string(rest) != "rest" {
			t.Fatalf("after fam %#x: %q", in[13], rest)
		}
	}
}

func TestReadErrors(t *testing.T) {
	v4 := cat([]byte{192, 0, 2, 1, 198, 51, 100, 2}, 5000, 7000)
	badSig := bytes.Clone(haproxyTCP4)
	badSig[11] = 0x0B
	cases := []struct {
		name string
		in   []byte
		want error
		msg  string // in the error text
	}{
		{"vpcreach hello", cat("VPCREACH", []byte{0, 0, 0, 42}, `{"agent":"a1","targets":[]}`), ErrNotProxy, `got "VPCREACH`},
		{"http", []byte("GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"), ErrNotProxy, "send-proxy-v2?"},
		{"tls", []byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03}, ErrNotProxy, "send-proxy-v2?"},
		{"proxy v1", []byte("PROXY TCP4 192.0.2.1 198.51.100.2 5000 7000\r\n"), ErrNotProxy, "v1 text header"},
		{"last signature byte wrong", badSig, ErrNotProxy, "signature"},
		{"empty-ish", []byte("\n"), ErrNotProxy, "signature"},
		{"version 1 nibble", hdr(0x11, 0x11, v4), ErrBadHeader, "version 1"},
		{"version 3", hdr(0x31, 0x11, v4), ErrBadHeader, "version 3"},
		{"version 0", hdr(0x01, 0x11, v4), ErrBadHeader, "version 0"},
		{"command 2", hdr(0x22, 0x11, v4), ErrBadHeader, "command 0x2"},
		{"command F", hdr(0x2F, 0x11, v4), ErrBadHeader, "command 0xf"},
		{"family 4", hdr(0x21, 0x41, v4), ErrBadHeader, "family/transport 0x41"},
		{"transport 3", hdr(0x21, 0x13, v4), ErrBadHeader, "family/transport 0x13"},
		{"inet unspec transport", hdr(0x21, 0x10, v4), ErrBadHeader, "family/transport 0x10"},
		{"unspec family stream", hdr(0x21, 0x01, v4), ErrBadHeader, "family/transport 0x01"},
		{"length over bound", cat(sig, byte(0x21), byte(0x11), MaxHeader-fixedLen+1, make([]byte, MaxHeader)), ErrBadHeader, "limit"},
		{"length 0xFFFF", cat(sig, byte(0x20), byte(0x00), 0xFFFF), ErrBadHeader, "limit"},
		{"tcp4 block 0", hdr(0x21, 0x11), ErrBadHeader, "too short for IPv4"},
		{"tcp4 block 11", hdr(0x21, 0x11, v4[:11]), ErrBadHeader, "too short for IPv4"},
		{"tcp6 block 12", hdr(0x21, 0x21, v4), ErrBadHeader, "too short for IPv6"},
		{"tcp6 block 35", hdr(0x21, 0x21, make([]byte, 35)), ErrBadHeader, "too short for IPv6"},
		{"udp4 block 4", hdr(0x21, 0x12, v4[:4]), ErrBadHeader, "too short for IPv4"},
		{"unix block 215", hdr(0x21, 0x31, make([]byte, 215)), ErrBadHeader, "too short for AF_UNIX"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, oneByte := range []bool{false, true} {
				br := bytes.NewReader(c.in)
				var r io.Reader = br
				if oneByte {
					r = iotest.OneByteReader(br)
				}
				h, err := Read(r)
				if err == nil {
					t.Fatalf("Read(% x) = %+v; want an error", c.in, h)
				}
				if !errors.Is(err, c.want) {
					t.Fatalf("error %q does not wrap %q", err, c.want)
				}
				other := ErrBadHeader
				if c.want == ErrBadHeader {
					other = ErrNotProxy
				}
				if errors.Is(err, other) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("error %q wraps more than %q", err, c.want)
				}
				// One byte at a time, a mismatch is reported on the first
				// byte that differs, so the quoted prefix is shorter.
				if !oneByte || c.want != ErrNotProxy {
					if !strings.Contains(err.Error(), c.msg) {
						t.Fatalf("error %q does not mention %q", err, c.msg)
					}
				} else if !strings.Contains(err.Error(), "send-proxy-v2") {
					t.Fatalf("error %q has no send-proxy-v2 hint", err)
				}
				if consumed := len(c.in) - br.Len(); consumed > fixedLen {
					t.Fatalf("read %d bytes before failing; never more than the %d-byte fixed part", consumed, fixedLen)
				}
				if h != (Header{}) {
					t.Fatalf("Read returned %+v with its error", h)
				}
			}
		})
	}
}

// TestNotProxyFailsFast: a peer that sends a short greeting and waits for
// an answer gets ErrNotProxy at once, not when the fixed part is full.
func TestNotProxyFailsFast(t *testing.T) {
	pr, pw := io.Pipe()
	defer pr.Close()
	go func() { _, _ = pw.Write([]byte("VPCREACH")) }() // then waits for ever
	done := make(chan error, 1)
	go func() { _, err := Read(pr); done <- err }()
	select {
	case err := <-done:
		if !errors.Is(err, ErrNotProxy) {
			t.Fatalf("Read = %v; want ErrNotProxy", err)
		}
	case <-time.After(10 * time.Second):
		pw.CloseWithError(errors.New("test timed out"))
		<-done
		t.Fatal("Read waited for the rest of the fixed part after a signature mismatch")
	}
}

func TestTruncated(t *testing.T) {
	v6src, v6dst := ap("[2001:db8::1]:40000"), ap("[2001:db8::2]:443")
	full := cat(AppendV2(nil, v6src, v6dst)[:fixedLen-2], 36+7, AppendV2(nil, v6src, v6dst)[fixedLen:], byte(0x01), 4, "http")
	if h, err := Read(bytes.NewReader(full)); err != nil || h.Source != v6src {
		t.Fatalf("full header: %+v, %v", h, err)
	}
	for _, in := range [][]byte{full, haproxyTCP4, haproxyLocal} {
		for i := range len(in) {
			for _, oneByte := range []bool{false, true} {
				var r io.Reader = bytes.NewReader(in[:i])
				if oneByte {
					r = iotest.OneByteReader(r)
				}
				_, err := Read(r)
				if i == 0 {
					if !errors.Is(err, io.EOF) || errors.Is(err, ErrBadHeader) || errors.Is(err, ErrNotProxy) {
						t.Fatalf("empty stream: %v; want io.EOF only", err)
					}
					continue
				}
				if !errors.Is(err, ErrBadHeader) || !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("truncated at %d of %d: %v; want ErrBadHeader and io.ErrUnexpectedEOF", i, len(in), err)
				}
				if errors.Is(err, ErrNotProxy) || errors.Is(err, io.EOF) {
					t.Fatalf("truncated at %d of %d: %v wraps too much", i, len(in), err)
				}
			}
		}
	}
}

func TestReadErrorsPassThrough(t *testing.T) {
	boom := errors.New("boom")
	for _, r := range []io.Reader{
		iotest.ErrReader(boom),
		io.MultiReader(bytes.NewReader(sig[:5]), iotest.ErrReader(boom)),
		io.MultiReader(bytes.NewReader(haproxyTCP4[:20]), iotest.ErrReader(boom)),
	} {
		_, err := Read(r)
		if !errors.Is(err, boom) || errors.Is(err, ErrBadHeader) || errors.Is(err, ErrNotProxy) {
			t.Fatalf("Read = %v; want boom only", err)
		}
	}
	// A reader that returns the last bytes together with io.EOF.
	for _, in := range [][]byte{haproxyLocal, haproxyTCP4} {
		h, err := Read(iotest.DataErrReader(bytes.NewReader(in)))
		if err != nil || (!h.Local && h.Source != src) {
			t.Fatalf("Read(DataErrReader) = %+v, %v", h, err)
		}
	}
}

func TestParseTrusted(t *testing.T) {
	pfx := netip.MustParsePrefix
	got, err := ParseTrusted([]string{
		"10.0.0.1", "10.0.0.0/24", " 10.1.2.3/16 ", "2001:db8::1", "2001:db8::/32",
		"::ffff:192.0.2.7", "::ffff:10.0.0.0/104", "0.0.0.0/0",
	})
	if err != nil {
		t.Fatal(err)
	}
	want := Trusted{
		pfx("10.0.0.1/32"), pfx("10.0.0.0/24"), pfx("10.1.0.0/16"), pfx("2001:db8::1/128"), pfx("2001:db8::/32"),
		pfx("192.0.2.7/32"), pfx("10.0.0.0/8"), pfx("0.0.0.0/0"),
	}
	if len(got) != len(want) {
		t.Fatalf("ParseTrusted = %v; want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("entry %d = %v; want %v", i, got[i], want[i])
		}
	}
	if got, err := ParseTrusted(nil); err != nil || len(got) != 0 {
		t.Fatalf("ParseTrusted(nil) = %v, %v", got, err)
	}

	for _, bad := range []string{"", "  ", "10.0.0.256", "10.0.0.0/33", "2001:db8::/129", "fe80::1%eth0", "example.com", "10.0.0.0/8/8", "10.0.0.1:80"} {
		_, err := ParseTrusted([]string{"10.0.0.1", bad, "10.0.0.2"})
		if err == nil {
			t.Fatalf("ParseTrusted accepted %q", bad)
		}
		if !strings.Contains(err.Error(), `"`+bad+`"`) {
			t.Fatalf("error %q does not name the bad entry %q", err, bad)
		}
	}
}

func TestTrustedContains(t *testing.T) {
	tr, err := ParseTrusted([]string{"10.0.0.0/8", "2001:db8::/32", "fe80::/10"})
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddr
	for _, c := range []struct {
		a    netip.Addr
		want bool
	}{
		{addr("10.1.2.3"), true},
		{addr("::ffff:10.1.2.3"), true},
		{addr("2001:db8::5"), true},
		{addr("11.0.0.1"), false},
		{addr("::ffff:11.0.0.1"), false},
		{addr("2001:db9::1"), false},
		{addr("::a01:203"), false}, // IPv4-compatible, not mapped
		{addr("fe80::1%eth0"), false},
		{netip.Addr{}, false},
	} {
		if got := tr.Contains(c.a); got != c.want {
			t.Errorf("Contains(%v) = %v; want %v", c.a, got, c.want)
		}
	}
	if Trusted(nil).Contains(addr("10.0.0.1")) {
		t.Error("a nil Trusted contains 10.0.0.1")
	}
}

// recConn records what Accept does to the conn.
type recConn struct {
	net.Conn
	mu        sync.Mutex
	deadlines []time.Time
	reads     int
}

func (c *recConn) SetReadDeadline(d time.Time) error {
	c.mu.Lock()
	c.deadlines = append(c.deadlines, d)
	c.mu.Unlock()
	return c.Conn.SetReadDeadline(d)
}

func (c *recConn) Read(b []byte) (int, error) {
	c.mu.Lock()
	c.reads++
	c.mu.Unlock()
	return c.Conn.Read(b)
}

// checkDeadlines checks Accept set one deadline in [from+timeout,
// to+timeout], then cleared it.
func (c *recConn) checkDeadlines(t *testing.T, from, to time.Time, timeout time.Duration) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.deadlines) != 2 || c.deadlines[0].Before(from.Add(timeout)) || c.deadlines[0].After(to.Add(timeout)) || !c.deadlines[1].IsZero() {
		t.Fatalf("read deadlines %v; want one at now+%v, then cleared", c.deadlines, timeout)
	}
}

// tcpPair returns a connected loopback TCP pair on network/address,
// closed at the end of the test.
func tcpPair(t *testing.T, network, address string) (dialed, accepted net.Conn) {
	t.Helper()
	ln, err := net.Listen(network, address)
	if err != nil {
		t.Skipf("no %s loopback: %v", network, err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	d, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		ln.Close()
		<-ch
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		d.Close()
		t.Fatal(r.err)
	}
	t.Cleanup(func() { d.Close(); r.c.Close() })
	return d, r.c
}

func mustTrust(t *testing.T, cidrs ...string) Trusted {
	t.Helper()
	tr, err := ParseTrusted(cidrs)
	if err != nil {
		t.Fatal(err)
	}
	return tr
}

func addrOf(t *testing.T, a net.Addr) netip.AddrPort {
	t.Helper()
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func write(t *testing.T, c net.Conn, b []byte) {
	t.Helper()
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
}

func readN(t *testing.T, c net.Conn, n int) string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	defer c.SetReadDeadline(time.Time{})
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestAcceptTrustedProxy(t *testing.T) {
	dialed, accepted := tcpPair(t, "tcp4", "127.0.0.1:0")
	write(t, dialed, cat(AppendV2(nil, src, dst), "payload"))
	rc := &recConn{Conn: accepted}
	const timeout = 5 * time.Second
	before := time.Now()
	remote, local, err := Accept(rc, mustTrust(t, "10.0.0.0/8", "127.0.0.1"), timeout)
	after := time.Now()
	if err != nil || remote != src || local {
		t.Fatalf("Accept = %v, %v, %v; want %v, false, nil", remote, local, err, src)
	}
	rc.checkDeadlines(t, before, after, timeout)
	if got := readN(t, accepted, len("payload")); got != "payload" {
		t.Fatalf("after the header: %q", got)
	}
}

func TestAcceptTrustedLocal(t *testing.T) {
	dialed, accepted := tcpPair(t, "tcp4", "127.0.0.1:0")
	write(t, dialed, cat(haproxyLocal, "ping"))
	remote, local, err := Accept(accepted, mustTrust(t, "127.0.0.0/8"), 5*time.Second)
	if want := addrOf(t, dialed.LocalAddr()); err != nil || remote != want || !local {
		t.Fatalf("Accept = %v, %v, %v; want %v, true, nil", remote, local, err, want)
	}
	if got := readN(t, accepted, 4); got != "ping" {
		t.Fatalf("after the header: %q", got)
	}
}

func TestAcceptIPv6AndDualStack(t *testing.T) {
	t.Run("v6", func(t *testing.T) {
		dialed, accepted := tcpPair(t, "tcp6", "[::1]:0")
		v6src := ap("[2001:db8::7]:1234")
		write(t, dialed, AppendV2(nil, v6src, ap("[2001:db8::8]:443")))
		remote, local, err := Accept(accepted, mustTrust(t, "::1"), 5*time.Second)
		if err != nil || remote != v6src || local {
			t.Fatalf("Accept = %v, %v, %v; want %v", remote, local, err, v6src)
		}
	})
	t.Run("v4 peer on a dual-stack listener", func(t *testing.T) {
		ln, err := net.Listen("tcp", "[::]:0")
		if err != nil {
			t.Skipf("no dual-stack listener: %v", err)
		}
		defer ln.Close()
		dialed, err := net.Dial("tcp4", "127.0.0.1:"+strconv.Itoa(ln.Addr().(*net.TCPAddr).Port))
		if err != nil {
			t.Skipf("listener on [::] is not dual-stack: %v", err)
		}
		defer dialed.Close()
		accepted, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer accepted.Close()
		if ra := accepted.RemoteAddr().(*net.TCPAddr).AddrPort().Addr(); !ra.Is4In6() && !ra.Is4() {
			t.Fatalf("v4 peer seen as %v", ra)
		}
		write(t, dialed, haproxyLocal)
		remote, local, err := Accept(accepted, mustTrust(t, "127.0.0.1"), 5*time.Second)
		if want := addrOf(t, dialed.LocalAddr()); err != nil || remote != want || !local {
			t.Fatalf("Accept = %v, %v, %v; want %v (unmapped), true, nil", remote, local, err, want)
		}
	})
}

func TestAcceptTrustedStalls(t *testing.T) {
	dialed, accepted := tcpPair(t, "tcp4", "127.0.0.1:0")
	write(t, dialed, haproxyTCP4[:5]) // then nothing
	rc := &recConn{Conn: accepted}
	const timeout = 150 * time.Millisecond
	type res struct {
		remote netip.AddrPort
		err    error
	}
	done := make(chan res, 1)
	start := time.Now()
	trusted := mustTrust(t, "127.0.0.1")
	go func() {
		remote, _, err := Accept(rc, trusted, timeout)
		done <- res{remote, err}
	}()
	var r res
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		accepted.Close()
		<-done
		t.Fatal("Accept did not give up on a stalled peer")
	}
	elapsed := time.Since(start)
	if !errors.Is(r.err, os.ErrDeadlineExceeded) || errors.Is(r.err, ErrBadHeader) {
		t.Fatalf("Accept error %v; want a deadline error", r.err)
	}
	if elapsed < timeout {
		t.Fatalf("Accept gave up after %v, before the %v timeout", elapsed, timeout)
	}
	if want := addrOf(t, dialed.LocalAddr()); r.remote != want || !strings.Contains(r.err.Error(), want.String()) {
		t.Fatalf("Accept = %v, %v; want the peer %v, named in the error", r.remote, r.err, want)
	}
	rc.checkDeadlines(t, start, time.Now(), timeout)
	// The deadline is cleared: the conn reads again (a deadline still set
	// in the past would fail this read at once).
	write(t, dialed, []byte("more"))
	b := make([]byte, 4)
	if _, err := io.ReadFull(accepted, b); err != nil || string(b) != "more" {
		t.Fatalf("read after Accept: %q, %v", b, err)
	}
}

func TestAcceptTrustedNotProxy(t *testing.T) {
	dialed, accepted := tcpPair(t, "tcp4", "127.0.0.1:0")
	write(t, dialed, []byte("VPCREACH\x00\x00\x00\x10")) // and waits for an answer
	remote, local, err := Accept(accepted, mustTrust(t, "127.0.0.1"), 30*time.Second)
	if !errors.Is(err, ErrNotProxy) || !strings.Contains(err.Error(), "send-proxy-v2") {
		t.Fatalf("Accept error %v; want ErrNotProxy with the send-proxy-v2 hint", err)
	}
	if want := addrOf(t, dialed.LocalAddr()); remote != want || local {
		t.Fatalf("Accept = %v, %v; want %v, false", remote, local, want)
	}
}

func TestAcceptUntrusted(t *testing.T) {
	dialed, accepted := tcpPair(t, "tcp4", "127.0.0.1:0")
	rc := &recConn{Conn: accepted}
	// Nothing sent yet: Accept must not read, so it cannot block.
	remote, local, err := Accept(rc, mustTrust(t, "10.0.0.0/8", "::1"), 5*time.Second)
	if want := addrOf(t, dialed.LocalAddr()); err != nil || remote != want || local {
		t.Fatalf("Accept = %v, %v, %v; want %v, false, nil", remote, local, err, want)
	}
	if rc.reads != 0 || len(rc.deadlines) != 0 {
		t.Fatalf("Accept read %d times and set deadlines %v on an untrusted peer", rc.reads, rc.deadlines)
	}
	first := cat(AppendV2(nil, src, dst), "VPCREACH")
	write(t, dialed, first)
	if got := readN(t, accepted, len(first)); got != string(first) {
		t.Fatalf("the untrusted peer's bytes were touched: % x", got)
	}
}

func TestAcceptNonIP(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	remote, local, err := Accept(b, mustTrust(t, "0.0.0.0/0", "::/0"), time.Second)
	if err != nil || remote.IsValid() || local {
		t.Fatalf("Accept(pipe) = %v, %v, %v; want zero, false, nil", remote, local, err)
	}
}

func FuzzRead(f *testing.F) {
	v6 := AppendV2(nil, ap("[2001:db8::1]:40000"), ap("[2001:db8::2]:443"))
	for _, seed := range [][]byte{
		haproxyTCP4,
		haproxyLocal,
		v6,
		AppendV2(nil, src, ap("[2001:db8::2]:7000")),
		cat(haproxyTCP4[:14], 12+4, haproxyTCP4[16:], byte(0x04), 1, "x", "trailing"),
		hdr(0x21, 0x00),
		hdr(0x21, 0x31, make([]byte, 216)),
		hdr(0x21, 0x22, make([]byte, 36)),
		hdr(0x20, 0x21, "x"),
		cat(sig, byte(0x21), byte(0x11), 0xFFFF),
		haproxyTCP4[:20],
		[]byte("VPCREACH\x00\x00\x00\x10{}"),
		[]byte("PROXY TCP4 192.0.2.1 198.51.100.2 5000 7000\r\n"),
		nil,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		br := bytes.NewReader(data)
		h, err := Read(br)
		consumed := len(data) - br.Len()
		if consumed > MaxHeader {
			t.Fatalf("consumed %d bytes, over MaxHeader", consumed)
		}

		// Reading one byte at a time gives the same outcome.
		br1 := bytes.NewReader(data)
		h1, err1 := Read(iotest.OneByteReader(br1))
		if class(err) != class(err1) || h != h1 {
			t.Fatalf("one byte at a time: %+v, %v; in one go: %+v, %v", h1, err1, h, err)
		}

		if err != nil {
			if class(err) == "other" {
				t.Fatalf("unexpected error %v", err)
			}
			if h != (Header{}) {
				t.Fatalf("Read returned %+v with error %v", h, err)
			}
			return
		}
		if consumed1 := len(data) - br1.Len(); consumed1 != consumed {
			t.Fatalf("consumed %d bytes one at a time, %d in one go", consumed1, consumed)
		}
		if consumed < fixedLen || !bytes.Equal(data[:12], sig) || consumed != fixedLen+int(binary.BigEndian.Uint16(data[14:16])) {
			t.Fatalf("consumed %d bytes of % x", consumed, data[:min(len(data), fixedLen)])
		}
		if h.Local {
			if h.Source.IsValid() || h.Dest.IsValid() {
				t.Fatalf("Local header with addresses: %+v", h)
			}
			if h2, err := Read(bytes.NewReader(AppendLocal(nil))); err != nil || h2 != h {
				t.Fatalf("LOCAL re-encoded reads as %+v, %v", h2, err)
			}
			return
		}
		for _, a := range []netip.AddrPort{h.Source, h.Dest} {
			if !a.IsValid() || a.Addr().Is4In6() || a.Addr().Zone() != "" {
				t.Fatalf("decoded address %v", a)
			}
		}
		enc := AppendV2(nil, h.Source, h.Dest)
		h2, err := Read(bytes.NewReader(enc))
		if err != nil {
			t.Fatalf("re-reading %+v: %v", h, err)
		}
		if h2 != h {
			t.Fatalf("re-encoded %+v reads as %+v", h, h2)
		}
	})
}

// class names the kind of a Read error.
func class(err error) string {
	switch {
	case err == nil:
		return "nil"
	case errors.Is(err, ErrNotProxy) && !errors.Is(err, ErrBadHeader):
		return "notproxy"
	case errors.Is(err, ErrBadHeader) && errors.Is(err, io.ErrUnexpectedEOF):
		return "truncated"
	case errors.Is(err, ErrBadHeader) && !errors.Is(err, ErrNotProxy):
		return "bad"
	case errors.Is(err, io.EOF):
		return "eof"
	}
	return "other"
}
