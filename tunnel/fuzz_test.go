package tunnel

import (
	"bytes"
	"math"
	"net/netip"
	"reflect"
	"testing"
)

func headerSeeds() [][]byte {
	var seeds [][]byte
	for _, h := range headerCases {
		seeds = append(seeds, h.Append(nil, Version1), h.Append(nil, Version2))
	}
	return append(seeds, nil, []byte{1}, []byte{0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4, 0, 0})
}

// checkHeader checks a successfully decoded header: its fields are within
// bounds, and it re-encodes to what was consumed (modulo the v4-mapped
// normalisation) and decodes again to itself.
func checkHeader(t *testing.T, h StreamHeader, v int, consumed []byte) {
	t.Helper()
	if len(h.Target.Network) > MaxNetworkLen || len(h.Client) > maxClientLen {
		t.Fatalf("decoded out-of-bounds header %+v", h)
	}
	if !h.Target.Addr.IsValid() || h.Target.Addr.Port() == 0 {
		t.Fatalf("decoded bad address %v", h.Target.Addr)
	}
	if v < Version2 && h.Client != "" {
		t.Fatalf("v1 header with a client %q", h.Client)
	}
	if len(consumed) > MaxHeaderSize {
		t.Fatalf("consumed %d bytes, MaxHeaderSize %d", len(consumed), MaxHeaderSize)
	}
	enc := h.Append(nil, v)
	got, err := ReadStreamHeader(bytes.NewReader(enc), v)
	if err != nil {
		t.Fatalf("re-decoding %+v: %v", h, err)
	}
	want := h
	if h.Target.Addr.Addr().Is4In6() {
		want.Target.Addr = netip.AddrPortFrom(h.Target.Addr.Addr().Unmap(), h.Target.Addr.Port())
	} else if !bytes.Equal(enc, consumed) {
		t.Fatalf("re-encoding %+v: %x, consumed %x", h, enc, consumed)
	}
	if got != want {
		t.Fatalf("round trip: got %+v, want %+v", got, want)
	}
}

func FuzzReadStreamHeader(f *testing.F) {
	for _, s := range headerSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, v := range []int{Version1, Version2} {
			r := bytes.NewReader(data)
			h, err := ReadStreamHeader(r, v)
			if err != nil {
				if !isDecodeErr(err) {
					t.Fatalf("v%d: unexpected error %v", v, err)
				}
				continue
			}
			checkHeader(t, h, v, data[:len(data)-r.Len()])
		}
	})
}

func FuzzReadPreamble(f *testing.F) {
	for _, s := range headerSeeds() {
		f.Add(append([]byte{'R', RelayVersion}, s...))
	}
	f.Add([]byte("R"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r := bytes.NewReader(data)
		p, err := ReadPreamble(r)
		if err != nil {
			if !isDecodeErr(err) {
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		consumed := data[:len(data)-r.Len()]
		if consumed[0] != 'R' || consumed[1] != RelayVersion && consumed[1] != RelayVersionRaw {
			t.Fatalf("accepted preamble %x", consumed[:2])
		}
		checkHeader(t, p.header(), Version2, consumed[2:])
		enc := p.Append(nil)
		got, err := ReadPreamble(bytes.NewReader(enc))
		if err != nil {
			t.Fatalf("re-decoding %+v: %v", p, err)
		}
		if got.Generation != p.Generation || got.Client != p.Client || got.Target.Network != p.Target.Network {
			t.Fatalf("round trip: got %+v, want %+v", got, p)
		}
	})
}

func helloBytes(t testing.TB, h any) []byte {
	var b bytes.Buffer
	b.Write(Magic[:])
	if err := WriteFrame(&b, h); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func FuzzReadHello(f *testing.F) {
	h := validHello()
	f.Add(helloBytes(f, &h))
	h.Targets = nil
	h.Token = ""
	f.Add(helloBytes(f, &h))
	f.Add(helloBytes(f, map[string]any{"min_version": 1, "max_version": 1, "agent_id": "a", "session_id": "s", "generation": 1, "extra": []int{1}}))
	f.Add(append(Magic[:], 0, 0, 0, 2, '{', '}'))
	f.Add(append(Magic[:], 0xFF, 0xFF, 0xFF, 0xFF))
	f.Add([]byte("VPCREACX"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := ReadHello(&bytesConn{r: bytes.NewReader(data)}, Settings{})
		if err != nil {
			if !isDecodeErr(err) {
				t.Fatalf("unexpected error %v", err)
			}
			return
		}
		if err := h.Validate(); err != nil {
			t.Fatalf("ReadHello returned an invalid hello without error: %v", err)
		}
		if v, err := Negotiate(h.MinVersion, h.MaxVersion); err == nil && (v < h.MinVersion || v > h.MaxVersion || v < MinVersion || v > MaxVersion) {
			t.Fatalf("Negotiate(%d, %d) = %d", h.MinVersion, h.MaxVersion, v)
		}
		var b bytes.Buffer
		if err := WriteFrame(&b, h); err != nil {
			t.Fatalf("re-encoding %+v: %v", h, err)
		}
		var got Hello
		if err := ReadFrame(&b, math.MaxInt32, &got); err != nil {
			t.Fatalf("re-decoding %+v: %v", h, err)
		}
		if !reflect.DeepEqual(&got, h) {
			t.Fatalf("round trip: got %+v, want %+v", got, *h)
		}
	})
}
