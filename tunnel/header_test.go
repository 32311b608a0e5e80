package tunnel

import (
	"bytes"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
)

var headerCases = []StreamHeader{
	{Generation: 1, Target: Target{Addr: netip.MustParseAddrPort("10.0.0.1:5432")}, Client: "192.0.2.7:40000"},
	{Generation: 1<<64 - 1, Target: Target{Network: "prod", Addr: netip.MustParseAddrPort("[fd00::1]:443")}, Client: "[2001:db8::1]:1"},
	{Generation: 42, Target: Target{Network: strings.Repeat("n", MaxNetworkLen), Addr: netip.MustParseAddrPort("255.255.255.255:65535")}, Client: strings.Repeat("c", maxClientLen)},
	{Generation: 7, Target: Target{Addr: netip.MustParseAddrPort("[::]:1")}},
	{Generation: 0, Target: Target{Network: "ü-net", Addr: netip.MustParseAddrPort("0.0.0.0:9")}, Client: "a"},
}

func TestStreamHeaderRoundTrip(t *testing.T) {
	for _, v := range []int{Version1, Version2} {
		for _, h := range headerCases {
			enc := h.Append([]byte("prefix"), v)
			if !bytes.HasPrefix(enc, []byte("prefix")) {
				t.Fatalf("Append did not append")
			}
			enc = enc[len("prefix"):]
			if len(enc) > MaxHeaderSize {
				t.Errorf("v%d %+v: %d bytes, MaxHeaderSize %d", v, h, len(enc), MaxHeaderSize)
			}
			r := bytes.NewReader(append(enc, "data"...))
			got, err := ReadStreamHeader(r, v)
			if err != nil {
				t.Fatalf("v%d %+v: %v", v, h, err)
			}
			want := h
			if v < Version2 {
				want.Client = ""
			}
			if got != want {
				t.Errorf("v%d: got %+v, want %+v", v, got, want)
			}
			if r.Len() != len("data") {
				t.Errorf("v%d: decoder consumed %d bytes past the header", v, len("data")-r.Len())
			}
		}
	}
}

func TestStreamHeaderEncoding(t *testing.T) {
	h := StreamHeader{Generation: 0x0102030405060708, Target: Target{Network: "ab", Addr: netip.MustParseAddrPort("10.1.2.3:258")}, Client: "xy"}
	want := []byte{1, 1, 2, 3, 4, 5, 6, 7, 8, 2, 'a', 'b', 4, 10, 1, 2, 3, 1, 2}
	if got := h.Append(nil, Version1); !bytes.Equal(got, want) {
		t.Errorf("v1: %x, want %x", got, want)
	}
	want = append(want, 2, 'x', 'y')
	if got := h.Append(nil, Version2); !bytes.Equal(got, want) {
		t.Errorf("v2: %x, want %x", got, want)
	}
}

func TestStreamHeaderNormalisation(t *testing.T) {
	// A v4-mapped v6 address goes on the wire as v4.
	h := StreamHeader{Generation: 3, Target: Target{Addr: netip.MustParseAddrPort("[::ffff:10.0.0.1]:80")}}
	got, err := ReadStreamHeader(bytes.NewReader(h.Append(nil, Version2)), Version2)
	if err != nil {
		t.Fatal(err)
	}
	if want := netip.MustParseAddrPort("10.0.0.1:80"); got.Target.Addr != want {
		t.Errorf("got %v, want %v", got.Target.Addr, want)
	}
	// A client address longer than the limit is truncated, not refused.
	h.Client = strings.Repeat("c", maxClientLen+10)
	got, err = ReadStreamHeader(bytes.NewReader(h.Append(nil, Version2)), Version2)
	if err != nil {
		t.Fatal(err)
	}
	if got.Client != h.Client[:maxClientLen] {
		t.Errorf("client %q", got.Client)
	}
}

func TestPreambleRoundTrip(t *testing.T) {
	for _, h := range headerCases {
		p := preambleOf(h)
		enc := p.Append(nil)
		if enc[0] != 'R' || enc[1] != RelayVersion {
			t.Fatalf("preamble starts %x", enc[:2])
		}
		if !bytes.Equal(enc[2:], h.Append(nil, Version2)) {
			t.Fatalf("preamble body is not a v2 stream header")
		}
		r := bytes.NewReader(append(enc, 0xAA))
		got, err := ReadPreamble(r)
		if err != nil {
			t.Fatal(err)
		}
		if got != p {
			t.Errorf("got %+v, want %+v", got, p)
		}
		if r.Len() != 1 {
			t.Errorf("decoder consumed %d bytes past the preamble", 1-r.Len())
		}
	}
}

func TestStreamHeaderErrors(t *testing.T) {
	good := headerCases[0].Append(nil, Version2) // kind, gen(8), netlen 0, addrlen 4, ip(4), port(2), clientlen, client
	mod := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"unknown kind 0", mod(func(b []byte) []byte { b[0] = 0; return b })},
		{"unknown kind 3", mod(func(b []byte) []byte { b[0] = 3; return b })},
		{"address length 0", mod(func(b []byte) []byte { b[10] = 0; return b })},
		{"address length 6", mod(func(b []byte) []byte { b[10] = 6; return b })},
		{"address length 255", mod(func(b []byte) []byte { b[10] = 255; return b })},
		{"port 0", mod(func(b []byte) []byte { b[15], b[16] = 0, 0; return b })},
		{"network too long", append(append([]byte{1, 0, 0, 0, 0, 0, 0, 0, 1, MaxNetworkLen + 1}, strings.Repeat("n", MaxNetworkLen+1)...), good[10:]...)},
		{"network 255", append([]byte{1, 0, 0, 0, 0, 0, 0, 0, 1, 255}, make([]byte, 300)...)},
		{"client too long", mod(func(b []byte) []byte {
			b = b[:17]
			b = append(b, maxClientLen+1)
			return append(b, strings.Repeat("c", maxClientLen+1)...)
		})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadStreamHeader(bytes.NewReader(tc.in), Version2)
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("got %v, want ErrProtocol", err)
			}
		})
	}
	// The sanity of the base case: unmodified, it decodes.
	if _, err := ReadStreamHeader(bytes.NewReader(good), Version2); err != nil {
		t.Fatal(err)
	}
}

// Both relay versions decode, and the version is reported: 2 (framed)
// from current front ends, 1 (raw) from older ones.
func TestPreambleVersions(t *testing.T) {
	good := (&Preamble{Generation: 7, Target: Target{Addr: netip.MustParseAddrPort("10.0.0.1:80")}}).Append(nil)
	if good[1] != RelayVersion || RelayVersion != 2 {
		t.Fatalf("Append writes relay version %d", good[1])
	}
	for _, v := range []byte{RelayVersion, RelayVersionRaw} {
		in := append([]byte{'R', v}, good[2:]...)
		p, got, err := ReadRelayPreamble(bytes.NewReader(in))
		if err != nil || got != v || p.Generation != 7 {
			t.Fatalf("version %d: got %+v, version %d, %v", v, p, got, err)
		}
	}
}

func TestPreambleErrors(t *testing.T) {
	good := (&Preamble{Generation: 1, Target: Target{Addr: netip.MustParseAddrPort("10.0.0.1:80")}}).Append(nil)
	for _, in := range [][]byte{
		append([]byte{'X', RelayVersion}, good[2:]...),
		append([]byte{'R', RelayVersion + 1}, good[2:]...),
		append([]byte{'R', 3}, good[2:]...),
		append([]byte{'R', 0}, good[2:]...),
		append([]byte{'R', RelayVersion, 9}, good[3:]...),
	} {
		if _, err := ReadPreamble(bytes.NewReader(in)); !errors.Is(err, ErrProtocol) {
			t.Errorf("%x: got %v, want ErrProtocol", in, err)
		}
	}
}

// Every proper prefix of a valid encoding is an error, never a panic and
// never a success.
func TestTruncatedHeaders(t *testing.T) {
	type decoder struct {
		name string
		enc  []byte
		dec  func(io.Reader) error
	}
	var decs []decoder
	for _, h := range headerCases {
		for _, v := range []int{Version1, Version2} {
			decs = append(decs, decoder{"header", h.Append(nil, v), func(r io.Reader) error {
				_, err := ReadStreamHeader(r, v)
				return err
			}})
		}
		p := preambleOf(h)
		decs = append(decs, decoder{"preamble", p.Append(nil), func(r io.Reader) error {
			_, err := ReadPreamble(r)
			return err
		}})
	}
	for _, d := range decs {
		if err := d.dec(bytes.NewReader(d.enc)); err != nil {
			t.Fatalf("%s: full encoding: %v", d.name, err)
		}
		for i := range len(d.enc) {
			err := d.dec(bytes.NewReader(d.enc[:i]))
			if err == nil {
				t.Fatalf("%s: prefix of %d/%d bytes decoded", d.name, i, len(d.enc))
			}
			if !isDecodeErr(err) {
				t.Fatalf("%s: prefix of %d bytes: unexpected error %v", d.name, i, err)
			}
		}
	}
}

func TestStatus(t *testing.T) {
	if StatusOK.Err() != nil {
		t.Fatal("StatusOK.Err() != nil")
	}
	for s := StatusRefused; s <= StatusInternal; s++ {
		err := s.Err()
		var se *StatusError
		if !errors.As(err, &se) || se.Status != s {
			t.Errorf("%d: Err() = %v", s, err)
		}
		if strings.HasPrefix(s.String(), "status(") || s.String() == "" {
			t.Errorf("%d has no text", s)
		}
	}
	if got := Status(200).String(); got != "status(200)" {
		t.Errorf("unknown status: %q", got)
	}
	for _, s := range []Status{StatusOK, StatusStale, 255} {
		got, err := ReadStatus(bytes.NewReader([]byte{byte(s)}))
		if err != nil || got != s {
			t.Errorf("ReadStatus(%d) = %d, %v", s, got, err)
		}
	}
	if _, err := ReadStatus(bytes.NewReader(nil)); err != io.EOF {
		t.Errorf("ReadStatus(empty) = %v", err)
	}
}

// Kind 2 marks a spliced stream; it round-trips in a stream header and is
// refused in a relay preamble, which has no spliced form.
func TestSplicedHeaderKind(t *testing.T) {
	h := StreamHeader{Generation: 9, Target: Target{Addr: netip.MustParseAddrPort("10.0.0.1:80")}, Client: "c", Spliced: true}
	enc := h.Append(nil, Version3)
	if enc[0] != headerSpliced {
		t.Fatalf("kind %d, want %d", enc[0], headerSpliced)
	}
	got, err := ReadStreamHeader(bytes.NewReader(enc), Version3)
	if err != nil || got != h {
		t.Fatalf("round trip: %+v, %v; want %+v", got, err, h)
	}
	h.Spliced = false
	if got, err := ReadStreamHeader(bytes.NewReader(h.Append(nil, Version3)), Version3); err != nil || got.Spliced {
		t.Fatalf("kind 1 decoded as %+v, %v", got, err)
	}
	pre := append([]byte{preambleMagic, RelayVersion}, enc...)
	if _, err := ReadPreamble(bytes.NewReader(pre)); !errors.Is(err, ErrProtocol) {
		t.Fatalf("a preamble of kind 2: %v, want a protocol error", err)
	}
}
