// Package proxyproto reads and writes the binary header of the HAProxy
// PROXY protocol version 2, as sent by haproxy's send-proxy-v2 (and
// check-send-proxy for health checks), so that a server behind a TCP load
// balancer sees the real client address.
//
// Only version 2 is spoken: a version 1 (text) header is refused with a
// hint. TLVs after the address block are skipped without being parsed or
// checked (PP2_TYPE_CRC32C included).
//
// Spec: https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt
package proxyproto

import (
	"github.com/vpcreach/vpcreach/internal/netx"

	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"
)

// MaxHeader bounds a whole v2 header: the 16-byte fixed part plus the
// address block and TLVs its length field announces. Read refuses a
// header whose length field would take it past MaxHeader (without reading
// the rest). 1024 bytes hold the largest address block (AF_UNIX, 216
// bytes) with room to spare for the TLVs haproxy adds even with every
// proxy-v2-options (ssl, cert-cn, authority, unique-id, crc32c).
const MaxHeader = 1024

const (
	fixedLen = 16 // signature, ver/cmd, fam/proto, length
	sigLen   = 12

	version2 = 0x2 // high nibble of byte 12

	cmdLocal = 0x0 // low nibble of byte 12
	cmdProxy = 0x1

	// Byte 13: address family (high nibble) and transport (low nibble).
	famUnspec    = 0x00
	famTCP4      = 0x11
	famUDP4      = 0x12
	famTCP6      = 0x21
	famUDP6      = 0x22
	famUnixStrm  = 0x31
	famUnixDgram = 0x32

	lenInet  = 4 + 4 + 2 + 2
	lenInet6 = 16 + 16 + 2 + 2
	lenUnix  = 108 + 108
)

var signature = [sigLen]byte{0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A}

var (
	// ErrNotProxy means the stream does not start with the v2 signature:
	// the peer does not speak PROXY v2 (typically a balancer without
	// send-proxy-v2, or a client connecting directly).
	ErrNotProxy = errors.New("proxyproto: no PROXY v2 signature")
	// ErrBadHeader means the signature matched but the rest of the
	// header is malformed, unsupported, truncated or over MaxHeader.
	ErrBadHeader = errors.New("proxyproto: bad PROXY v2 header")
)

// Header is a parsed v2 header.
type Header struct {
	// Local means the header carries no usable client address, so the
	// receiver uses the connection's own endpoints. It is set for the
	// LOCAL command (haproxy's health checks), and also for the PROXY
	// command with an address family Read does not map to a TCP client:
	// UNSPEC (the spec says to accept it and use the real endpoints),
	// UDP over IPv4/IPv6 and AF_UNIX stream/datagram (the spec's
	// "fall back to UNSPEC" for unsupported combinations).
	Local bool
	// Source and Dest are the client and the address it connected to, for
	// PROXY over TCP4/TCP6; zero when Local. IPv4 addresses, including
	// IPv4-mapped ones from a TCP6 header, are 4-byte netip.Addrs.
	Source, Dest netip.AddrPort
}

// Read reads exactly one v2 header from r and never reads past it, so the
// stream after it is intact: it reads the 16-byte fixed part (stopping
// early, with ErrNotProxy, as soon as the bytes read so far diverge from
// the signature, so a peer that sends a short greeting and waits fails at
// once), then the address block and TLVs with io.ReadFull.
//
// Errors wrap ErrNotProxy (signature mismatch; the message quotes what
// was read) or ErrBadHeader (version not 2, command neither LOCAL nor
// PROXY, family/transport byte not one of the spec's, address block
// shorter than the family needs, length past MaxHeader, or the stream
// ending inside the header, which also wraps io.ErrUnexpectedEOF). A
// stream that ends before its first byte gives an error wrapping io.EOF
// (a bare TCP health check); other read errors, deadlines included, are
// wrapped as they are. After an error the stream position is unspecified.
func Read(r io.Reader) (Header, error) {
	var fixed [fixedLen]byte
	if err := readFixed(r, fixed[:]); err != nil {
		return Header{}, err
	}
	if v := fixed[12] >> 4; v != version2 {
		return Header{}, fmt.Errorf("%w: version %d, want 2", ErrBadHeader, v)
	}
	cmd := fixed[12] & 0x0F
	if cmd != cmdLocal && cmd != cmdProxy {
		return Header{}, fmt.Errorf("%w: unsupported command %#x (want LOCAL 0x0 or PROXY 0x1)", ErrBadHeader, cmd)
	}
	n := int(binary.BigEndian.Uint16(fixed[14:]))
	if fixedLen+n > MaxHeader {
		return Header{}, fmt.Errorf("%w: length %d makes a %d-byte header, over the %d-byte limit", ErrBadHeader, n, fixedLen+n, MaxHeader)
	}
	fam := fixed[13]
	if cmd == cmdProxy {
		// The spec lets LOCAL carry anything here: the receiver discards
		// the protocol block, so only PROXY is checked.
		need, name, ok := addrBlock(fam)
		if !ok {
			return Header{}, fmt.Errorf("%w: unsupported address family/transport 0x%02x", ErrBadHeader, fam)
		}
		if n < need {
			return Header{}, fmt.Errorf("%w: %d-byte address block too short for %s (need %d)", ErrBadHeader, n, name, need)
		}
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return Header{}, fmt.Errorf("%w: stream ended inside the %d-byte header: %w", ErrBadHeader, fixedLen+n, io.ErrUnexpectedEOF)
		}
		return Header{}, fmt.Errorf("proxyproto: reading PROXY v2 header: %w", err)
	}
	if cmd == cmdLocal {
		return Header{Local: true}, nil
	}
	switch fam {
	case famTCP4:
		return Header{
			Source: netip.AddrPortFrom(netip.AddrFrom4([4]byte(body[0:4])), binary.BigEndian.Uint16(body[8:])),
			Dest:   netip.AddrPortFrom(netip.AddrFrom4([4]byte(body[4:8])), binary.BigEndian.Uint16(body[10:])),
		}, nil
	case famTCP6:
		return Header{
			Source: netip.AddrPortFrom(netip.AddrFrom16([16]byte(body[0:16])).Unmap(), binary.BigEndian.Uint16(body[32:])),
			Dest:   netip.AddrPortFrom(netip.AddrFrom16([16]byte(body[16:32])).Unmap(), binary.BigEndian.Uint16(body[34:])),
		}, nil
	default: // UNSPEC, UDP, AF_UNIX: use the connection's endpoints
		return Header{Local: true}, nil
	}
}

// readFixed fills b (the fixed part) from r, failing as soon as the bytes
// read so far are not a prefix of the signature.
func readFixed(r io.Reader, b []byte) error {
	n := 0
	for n < len(b) {
		m, err := r.Read(b[n:])
		n += m
		if k := min(n, sigLen); !bytes.Equal(b[:k], signature[:k]) {
			return notProxy(b[:n])
		}
		if err != nil {
			if n == len(b) {
				break // as io.ReadFull: the bytes are all there
			}
			switch {
			case err == io.EOF && n == 0:
				return fmt.Errorf("proxyproto: connection closed before the PROXY v2 header: %w", io.EOF)
			case err == io.EOF || err == io.ErrUnexpectedEOF:
				return fmt.Errorf("%w: stream ended after %d bytes of the %d-byte fixed part: %w", ErrBadHeader, n, fixedLen, io.ErrUnexpectedEOF)
			default:
				return fmt.Errorf("proxyproto: reading PROXY v2 header: %w", err)
			}
		}
	}
	return nil
}

func notProxy(got []byte) error {
	hint := "balancer not configured with send-proxy-v2?"
	if bytes.HasPrefix(got, []byte("PROXY")) {
		hint = "that is a PROXY v1 text header: configure the balancer with send-proxy-v2, not send-proxy"
	}
	return fmt.Errorf("%w (got %q; %s)", ErrNotProxy, got, hint)
}

// addrBlock returns the address block size a PROXY header with family
// byte fam needs, and whether fam is one the spec allows.
func addrBlock(fam byte) (need int, name string, ok bool) {
	switch fam {
	case famUnspec:
		return 0, "UNSPEC", true
	case famTCP4, famUDP4:
		return lenInet, "IPv4", true
	case famTCP6, famUDP6:
		return lenInet6, "IPv6", true
	case famUnixStrm, famUnixDgram:
		return lenUnix, "AF_UNIX", true
	}
	return 0, "", false
}

// AppendV2 appends a PROXY-command v2 header for a TCP connection from src
// to dst, without TLVs. Both addresses are unmapped first; when both are
// then IPv4 the header is TCP4 (12-byte address block), otherwise TCP6
// (36 bytes) with any IPv4 address written IPv4-mapped, as haproxy does
// for mixed families. Zones are dropped; an invalid (zero) netip.Addr is
// written as the IPv6 unspecified address "::".
func AppendV2(b []byte, src, dst netip.AddrPort) []byte {
	sa, da := src.Addr().Unmap(), dst.Addr().Unmap()
	b = append(b, signature[:]...)
	b = append(b, version2<<4|cmdProxy)
	if sa.Is4() && da.Is4() {
		b = append(b, famTCP4)
		b = binary.BigEndian.AppendUint16(b, lenInet)
		s, d := sa.As4(), da.As4()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	} else {
		b = append(b, famTCP6)
		b = binary.BigEndian.AppendUint16(b, lenInet6)
		s, d := sa.As16(), da.As16()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, src.Port())
	return binary.BigEndian.AppendUint16(b, dst.Port())
}

// AppendLocal appends a LOCAL-command v2 header (family UNSPEC, no address
// block): what haproxy's health checks send with check-send-proxy.
func AppendLocal(b []byte) []byte {
	b = append(b, signature[:]...)
	return append(b, version2<<4|cmdLocal, famUnspec, 0, 0)
}

// Trusted is a set of balancer prefixes allowed to send PROXY headers
// (netx.Prefixes: IPv4 peers match IPv4 prefixes only, IPv4-mapped peers
// are unmapped first, zoned IPv6 peers never match).
type Trusted = netx.Prefixes

// ParseTrusted parses balancer addresses (see netx.ParsePrefixes); the
// error names the bad entry.
func ParseTrusted(cidrs []string) (Trusted, error) {
	t, err := netx.ParsePrefixes(cidrs)
	if err != nil {
		return nil, fmt.Errorf("proxyproto: trusted balancer %v", err)
	}
	return t, nil
}

// Accept is called on a freshly accepted conn. If the peer address is in
// trusted, it reads the v2 header (with c.SetReadDeadline(now+timeout),
// cleared afterwards; timeout <= 0 sets no deadline) and returns the real
// client address: Source for PROXY, or c.RemoteAddr() and local=true for
// LOCAL (and the families Read maps to Local). If the peer is not trusted
// it returns c.RemoteAddr() without reading anything, and a PROXY header
// it may have sent stays in the stream.
//
// The returned address is unmapped (IPv4 as 4 bytes); it is zero when
// RemoteAddr is not an IP address, and such a peer is never trusted. On
// error remote is the peer's own address, for logging; the error wraps
// Read's (ErrNotProxy, ErrBadHeader, io.EOF, os.ErrDeadlineExceeded...).
func Accept(c net.Conn, trusted Trusted, timeout time.Duration) (remote netip.AddrPort, local bool, err error) {
	remote = addrPortOf(c.RemoteAddr())
	if !remote.IsValid() || !trusted.Contains(remote.Addr()) {
		return remote, false, nil
	}
	if timeout > 0 {
		if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
			return remote, false, fmt.Errorf("PROXY header from %v: setting deadline: %w", remote, err)
		}
		defer func() {
			if cerr := c.SetReadDeadline(time.Time{}); cerr != nil && err == nil {
				err = fmt.Errorf("PROXY header from %v: clearing deadline: %w", remote, cerr)
			}
		}()
	}
	h, err := Read(c)
	if err != nil {
		return remote, false, fmt.Errorf("PROXY header from %v: %w", remote, err)
	}
	if h.Local {
		return remote, true, nil
	}
	return h.Source, false, nil
}

// addrPortOf returns a's address and port, unmapped, or zero if a is not
// an IP address.
func addrPortOf(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	switch a := a.(type) {
	case nil:
		return netip.AddrPort{}
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	default:
		var err error
		if ap, err = netip.ParseAddrPort(a.String()); err != nil {
			return netip.AddrPort{}
		}
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
