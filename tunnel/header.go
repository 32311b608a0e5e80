package tunnel

import (
	"encoding/binary"
	"fmt"
	"io"
	"net/netip"
)

// Status is the byte that answers a stream header (agent -> server) or a
// relay preamble (server -> socks5d) before any data flows.
type Status byte

const (
	StatusOK          Status = 0 // connected; data follows
	StatusRefused     Status = 1 // the target refused the connection
	StatusUnreachable Status = 2 // the target could not be reached (timeout, no route)
	StatusNotExposed  Status = 3 // the agent does not expose this target
	StatusBusy        Status = 4 // a stream or connection cap was reached
	StatusBadHeader   Status = 5 // the header or preamble could not be decoded
	StatusStale       Status = 6 // the generation does not match the live route
	StatusNoRoute     Status = 7 // the server owns no route for this target
	StatusDraining    Status = 8 // the agent or server is shutting down
	StatusInternal    Status = 9 // anything else
)

var statusText = [...]string{
	StatusOK:          "ok",
	StatusRefused:     "connection refused by target",
	StatusUnreachable: "target unreachable",
	StatusNotExposed:  "target not exposed by agent",
	StatusBusy:        "stream limit reached",
	StatusBadHeader:   "bad stream header",
	StatusStale:       "stale route generation",
	StatusNoRoute:     "no route",
	StatusDraining:    "draining",
	StatusInternal:    "internal error",
}

func (s Status) String() string {
	if int(s) < len(statusText) {
		return statusText[s]
	}
	return fmt.Sprintf("status(%d)", byte(s))
}

// StatusError is a non-OK status as an error.
type StatusError struct{ Status Status }

func (e *StatusError) Error() string { return "tunnel: " + e.Status.String() }

// Err returns nil for StatusOK and a *StatusError otherwise.
func (s Status) Err() error {
	if s == StatusOK {
		return nil
	}
	return &StatusError{s}
}

// StreamHeader opens every data stream, server -> agent.
type StreamHeader struct {
	Generation uint64 // generation of the route the stream serves
	Target     Target // only Network and Addr are sent
	Client     string // the originating client address (version 2 and later)
	// Spliced (kind 2, only on a session that negotiated spliced
	// frames): all data of this stream, both ways, is spliced frames
	// (spliced.go), not yamux data.
	Spliced bool
}

// Header and preamble bounds: small, fixed-size fields only.
const (
	maxClientLen  = 64
	MaxHeaderSize = 1 + 8 + 1 + MaxNetworkLen + 1 + 16 + 2 + 1 + maxClientLen
	headerKind    = 1 // connect
	headerSpliced = 2 // connect, data as spliced frames
	preambleMagic = 'R'
	// RelayVersion is the version byte of the relay preamble this side
	// sends: 2, data framed after the status as on a tunnel stream, so a
	// member that dies mid-transfer is an abort, never a clean end.
	RelayVersion = 2
	// RelayVersionRaw is the first relay version (raw bytes after the
	// status), still accepted from older front ends.
	RelayVersionRaw = 1
)

// Append appends the encoding of h in protocol version v.
func (h *StreamHeader) Append(b []byte, v int) []byte {
	if h.Spliced {
		b = append(b, headerSpliced)
	} else {
		b = append(b, headerKind)
	}
	b = binary.BigEndian.AppendUint64(b, h.Generation)
	b = appendTarget(b, h.Target)
	if v >= Version2 {
		c := h.Client
		if len(c) > maxClientLen {
			c = c[:maxClientLen]
		}
		b = append(b, byte(len(c)))
		b = append(b, c...)
	}
	return b
}

// ReadStreamHeader decodes a stream header of protocol version v.
func ReadStreamHeader(r io.Reader, v int) (StreamHeader, error) {
	var h StreamHeader
	var kind [9]byte
	if _, err := io.ReadFull(r, kind[:]); err != nil {
		return h, err
	}
	switch kind[0] {
	case headerKind:
	case headerSpliced:
		h.Spliced = true
	default:
		return h, fmt.Errorf("%w: unknown stream kind %d", ErrProtocol, kind[0])
	}
	h.Generation = binary.BigEndian.Uint64(kind[1:])
	t, err := readTarget(r)
	if err != nil {
		return h, err
	}
	h.Target = t
	if v >= Version2 {
		c, err := readShort(r, maxClientLen, "client")
		if err != nil {
			return h, err
		}
		h.Client = c
	}
	return h, nil
}

// Preamble opens a connection to a proxy server's relay port.
type Preamble struct {
	Generation uint64
	Target     Target
	Client     string
}

// header is the stream header a preamble carries (never spliced).
func (p *Preamble) header() StreamHeader {
	return StreamHeader{Generation: p.Generation, Target: p.Target, Client: p.Client}
}

// preambleOf is the preamble carrying h's fields.
func preambleOf(h StreamHeader) Preamble {
	return Preamble{Generation: h.Generation, Target: h.Target, Client: h.Client}
}

// Append appends the encoding of p: 'R', version, then a version-2 stream
// header body.
func (p *Preamble) Append(b []byte) []byte {
	b = append(b, preambleMagic, RelayVersion)
	h := p.header()
	return h.Append(b, Version2)
}

// ReadPreamble decodes a relay preamble of either version.
func ReadPreamble(r io.Reader) (Preamble, error) {
	p, _, err := ReadRelayPreamble(r)
	return p, err
}

// ReadRelayPreamble decodes a relay preamble and returns its version:
// RelayVersion (framed data) or RelayVersionRaw.
func ReadRelayPreamble(r io.Reader) (Preamble, byte, error) {
	var mv [2]byte
	if _, err := io.ReadFull(r, mv[:]); err != nil {
		return Preamble{}, 0, err
	}
	if mv[0] != preambleMagic || mv[1] != RelayVersion && mv[1] != RelayVersionRaw {
		return Preamble{}, 0, fmt.Errorf("%w: bad relay preamble %x", ErrProtocol, mv)
	}
	h, err := ReadStreamHeader(r, Version2)
	if err == nil && h.Spliced {
		err = fmt.Errorf("%w: unknown stream kind %d", ErrProtocol, headerSpliced)
	}
	return preambleOf(h), mv[1], err
}

func appendTarget(b []byte, t Target) []byte {
	b = append(b, byte(len(t.Network)))
	b = append(b, t.Network...)
	ip := t.Addr.Addr().Unmap()
	if ip.Is4() {
		a := ip.As4()
		b = append(b, 4)
		b = append(b, a[:]...)
	} else {
		a := ip.As16()
		b = append(b, 16)
		b = append(b, a[:]...)
	}
	return binary.BigEndian.AppendUint16(b, t.Addr.Port())
}

func readTarget(r io.Reader) (Target, error) {
	var t Target
	n, err := readShort(r, MaxNetworkLen, "network")
	if err != nil {
		return t, err
	}
	t.Network = n
	var l [1]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return t, err
	}
	var buf [18]byte
	switch l[0] {
	case 4, 16:
	default:
		return t, fmt.Errorf("%w: address length %d", ErrProtocol, l[0])
	}
	b := buf[:int(l[0])+2]
	if _, err := io.ReadFull(r, b); err != nil {
		return t, err
	}
	ip, _ := netip.AddrFromSlice(b[:l[0]])
	port := binary.BigEndian.Uint16(b[l[0]:])
	if port == 0 {
		return t, fmt.Errorf("%w: port 0", ErrProtocol)
	}
	t.Addr = netip.AddrPortFrom(ip, port)
	return t, nil
}

func readShort(r io.Reader, max int, what string) (string, error) {
	var l [1]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return "", err
	}
	if int(l[0]) > max {
		return "", fmt.Errorf("%w: %s longer than %d bytes", ErrProtocol, what, max)
	}
	if l[0] == 0 {
		return "", nil
	}
	b := make([]byte, l[0])
	if _, err := io.ReadFull(r, b); err != nil {
		return "", err
	}
	return string(b), nil
}

// ReadStatus reads one status byte.
func ReadStatus(r io.Reader) (Status, error) {
	var b [1]byte
	_, err := io.ReadFull(r, b[:])
	return Status(b[0]), err
}
