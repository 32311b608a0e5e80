package tunnel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net/netip"
	"reflect"
	"runtime"
	"strings"
	"testing"
)

func frameBytes(n uint32, body string) []byte {
	b := binary.BigEndian.AppendUint32(nil, n)
	return append(b, body...)
}

func TestFrameRoundTrip(t *testing.T) {
	msgs := []*Control{
		{Type: MsgAdd, Targets: []Target{{Network: "prod", Addr: netip.MustParseAddrPort("10.0.0.1:5432"), Port: 15432}}},
		{Type: MsgRoutes, Routes: []RouteInfo{{
			Target: Target{Addr: netip.MustParseAddrPort("[fd00::1]:443")},
			Proxy:  netip.MustParseAddrPort("192.0.2.1:20001"),
		}}, Refused: []TargetRefusal{{Target: Target{Addr: netip.MustParseAddrPort("10.0.0.2:22")}, Reason: "taken"}}},
		{Type: MsgSuperseded, Generation: 1<<64 - 1},
		{Type: MsgRefusal, Code: RefuseDraining, Reason: strings.Repeat("x", MaxReasonLen)},
	}
	var buf bytes.Buffer
	for _, m := range msgs {
		if err := WriteFrame(&buf, m); err != nil {
			t.Fatal(err)
		}
	}
	for i, want := range msgs {
		var got Control
		if err := ReadFrame(&buf, MaxControlSize, &got); err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if !reflect.DeepEqual(&got, want) {
			t.Errorf("frame %d: got %+v, want %+v", i, got, *want)
		}
	}
	var c Control
	if err := ReadFrame(&buf, MaxControlSize, &c); err != io.EOF {
		t.Errorf("read past the last frame: %v, want io.EOF", err)
	}
}

func TestFrameLengthPrefix(t *testing.T) {
	var buf bytes.Buffer
	if err := WriteFrame(&buf, &Control{Type: MsgWithdraw}); err != nil {
		t.Fatal(err)
	}
	b := buf.Bytes()
	if n := binary.BigEndian.Uint32(b); int(n) != len(b)-4 {
		t.Fatalf("length prefix %d, body %d bytes", n, len(b)-4)
	}
	if want := `{"type":"withdraw"}`; string(b[4:]) != want {
		t.Fatalf("body %q, want %q", b[4:], want)
	}
}

func TestFrameUnknownFieldsIgnored(t *testing.T) {
	body := `{"type":"move","from_the_future":{"x":1},"reason":"r"}`
	var c Control
	if err := ReadFrame(bytes.NewReader(frameBytes(uint32(len(body)), body)), MaxControlSize, &c); err != nil {
		t.Fatal(err)
	}
	if c.Type != MsgMove || c.Reason != "r" {
		t.Fatalf("got %+v", c)
	}
}

func TestFrameLimit(t *testing.T) {
	// Exactly at the limit is fine.
	body := `"` + strings.Repeat("a", 98) + `"`
	var s string
	if err := ReadFrame(bytes.NewReader(frameBytes(100, body)), 100, &s); err != nil {
		t.Fatalf("frame at the limit: %v", err)
	}
	// One over is refused before the body is read.
	r := bytes.NewReader(frameBytes(101, body+" "))
	err := ReadFrame(r, 100, &s)
	if !errors.Is(err, ErrTooLarge) || !errors.Is(err, ErrProtocol) {
		t.Fatalf("frame over the limit: %v, want ErrTooLarge wrapping ErrProtocol", err)
	}
	if r.Len() != 101 {
		t.Fatalf("ReadFrame consumed %d body bytes of an oversized frame", 101-r.Len())
	}
}

func TestFrameTooLargeDoesNotAllocate(t *testing.T) {
	// A 4 GiB length must be refused without allocating it.
	in := frameBytes(0xFFFFFFFF, "")
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range 10 {
		var h Hello
		if err := ReadFrame(bytes.NewReader(in), MaxHelloSize, &h); !errors.Is(err, ErrTooLarge) {
			t.Fatalf("got %v, want ErrTooLarge", err)
		}
	}
	runtime.ReadMemStats(&after)
	if d := after.TotalAlloc - before.TotalAlloc; d > 1<<20 {
		t.Fatalf("refusing 10 oversized frames allocated %d bytes", d)
	}
}

func TestFrameTruncated(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"empty", nil, io.EOF},
		{"short length", []byte{0, 0}, io.ErrUnexpectedEOF},
		{"no body", frameBytes(10, ""), io.EOF},
		{"short body", frameBytes(10, `{"type"`), io.ErrUnexpectedEOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var c Control
			if err := ReadFrame(bytes.NewReader(tc.in), MaxControlSize, &c); !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

func TestFrameBadJSON(t *testing.T) {
	for _, body := range []string{
		`{"type":`,
		`not json`,
		`{"type":"add"}garbage`,
		`{"type":17}`,
		`{"targets":[{"addr":"not-an-address"}]}`,
		`[1,2,3]`,
		``,
	} {
		var c Control
		err := ReadFrame(bytes.NewReader(frameBytes(uint32(len(body)), body)), MaxControlSize, &c)
		if !errors.Is(err, ErrProtocol) {
			t.Errorf("body %q: got %v, want ErrProtocol", body, err)
		}
	}
}

type errWriter struct{ err error }

func (w errWriter) Write([]byte) (int, error) { return 0, w.err }

func TestWriteFrameErrors(t *testing.T) {
	boom := errors.New("boom")
	if err := WriteFrame(errWriter{boom}, &Control{Type: MsgAdd}); !errors.Is(err, boom) {
		t.Errorf("writer error: got %v", err)
	}
	if err := WriteFrame(io.Discard, make(chan int)); err == nil {
		t.Error("unencodable value: no error")
	}
}

func validHello() Hello {
	return Hello{
		MinVersion: MinVersion,
		MaxVersion: MaxVersion,
		AgentID:    "agent-1",
		Token:      "secret",
		SessionID:  "s-1",
		Generation: 1,
		Targets: []Target{
			{Addr: netip.MustParseAddrPort("10.0.0.1:5432")},
			{Network: "prod", Addr: netip.MustParseAddrPort("[fd00::1]:443"), Port: 8443},
		},
	}
}

func TestHelloValidate(t *testing.T) {
	many := make([]Target, MaxTargets+1)
	for i := range many {
		many[i] = Target{Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), 80)}
	}
	for _, tc := range []struct {
		name     string
		mod      func(*Hello)
		wantErr  bool
		tooLarge bool
	}{
		{"valid", func(*Hello) {}, false, false},
		{"no targets", func(h *Hello) { h.Targets = nil }, false, false},
		{"max ids", func(h *Hello) {
			h.AgentID = strings.Repeat("a", MaxIDLen)
			h.SessionID = strings.Repeat("s", MaxIDLen)
		}, false, false},
		{"max targets", func(h *Hello) { h.Targets = many[:MaxTargets] }, false, false},
		{"max network", func(h *Hello) { h.Targets[0].Network = strings.Repeat("n", MaxNetworkLen) }, false, false},
		{"single version", func(h *Hello) { h.MinVersion, h.MaxVersion = 2, 2 }, false, false},
		{"future versions", func(h *Hello) { h.MinVersion, h.MaxVersion = 7, 9 }, false, false},
		{"empty agent id", func(h *Hello) { h.AgentID = "" }, true, false},
		{"long agent id", func(h *Hello) { h.AgentID = strings.Repeat("a", MaxIDLen+1) }, true, false},
		{"empty session id", func(h *Hello) { h.SessionID = "" }, true, false},
		{"long session id", func(h *Hello) { h.SessionID = strings.Repeat("s", MaxIDLen+1) }, true, false},
		{"zero generation", func(h *Hello) { h.Generation = 0 }, true, false},
		{"min > max", func(h *Hello) { h.MinVersion, h.MaxVersion = 2, 1 }, true, false},
		{"min zero", func(h *Hello) { h.MinVersion = 0 }, true, false},
		{"both zero", func(h *Hello) { h.MinVersion, h.MaxVersion = 0, 0 }, true, false},
		{"negative", func(h *Hello) { h.MinVersion, h.MaxVersion = -1, 2 }, true, false},
		{"too many targets", func(h *Hello) { h.Targets = many }, true, true},
		{"port 0", func(h *Hello) { h.Targets[1].Addr = netip.MustParseAddrPort("[fd00::1]:0") }, true, false},
		{"no address", func(h *Hello) { h.Targets[0].Addr = netip.AddrPort{} }, true, false},
		{"long network", func(h *Hello) { h.Targets[0].Network = strings.Repeat("n", MaxNetworkLen+1) }, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := validHello()
			h.Targets = append([]Target(nil), h.Targets...)
			tc.mod(&h)
			err := h.Validate()
			if (err != nil) != tc.wantErr {
				t.Fatalf("Validate() = %v, want error %v", err, tc.wantErr)
			}
			if err != nil && !errors.Is(err, ErrProtocol) {
				t.Errorf("error %v does not wrap ErrProtocol", err)
			}
			if got := errors.Is(err, ErrTooLarge); got != tc.tooLarge {
				t.Errorf("errors.Is(%v, ErrTooLarge) = %v, want %v", err, got, tc.tooLarge)
			}
		})
	}
}

func TestNegotiate(t *testing.T) {
	for _, tc := range []struct {
		min, max, want int // want 0: no common version
	}{
		{1, 2, 2},
		{1, 1, 1},
		{2, 2, 2},
		{1, 9, 3},
		{2, 9, 3},
		{3, 4, 3},
		{3, 3, 3},
		{4, 5, 0},
		{0, 0, 0},
		{-5, 0, 0},
		{0, 1, 1},
		{2, 1, 0},
	} {
		v, err := Negotiate(tc.min, tc.max)
		if tc.want == 0 {
			if !errors.Is(err, ErrNoVersion) || !errors.Is(err, ErrProtocol) {
				t.Errorf("Negotiate(%d, %d) = %d, %v; want ErrNoVersion", tc.min, tc.max, v, err)
			}
			continue
		}
		if err != nil || v != tc.want {
			t.Errorf("Negotiate(%d, %d) = %d, %v; want %d", tc.min, tc.max, v, err, tc.want)
		}
	}
}

func TestTargetString(t *testing.T) {
	if got := (Target{Addr: netip.MustParseAddrPort("10.0.0.1:80")}).String(); got != "10.0.0.1:80" {
		t.Errorf("got %q", got)
	}
	if got := (Target{Network: "prod", Addr: netip.MustParseAddrPort("[::1]:80")}).String(); got != "prod/[::1]:80" {
		t.Errorf("got %q", got)
	}
}

func TestTokenEqual(t *testing.T) {
	if !TokenEqual("abc", "abc") || TokenEqual("abc", "abd") || TokenEqual("abc", "abcd") || TokenEqual("", "x") {
		t.Fatal("TokenEqual is wrong")
	}
}

func TestRefusalError(t *testing.T) {
	r := &Refusal{Code: RefuseAuth, Reason: "bad token"}
	wrapped := errors.Join(errors.New("ctx"), r)
	got, ok := IsRefusal(wrapped)
	if !ok || got != r {
		t.Fatalf("IsRefusal(%v) = %v, %v", wrapped, got, ok)
	}
	if !strings.Contains(r.Error(), RefuseAuth) || !strings.Contains(r.Error(), "bad token") {
		t.Errorf("Error() = %q", r.Error())
	}
	if _, ok := IsRefusal(ErrProtocol); ok {
		t.Error("IsRefusal(ErrProtocol) = true")
	}
}
