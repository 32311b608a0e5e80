package socks

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/tunnel"
)

func TestReplyForEveryStatus(t *testing.T) {
	// RFC 1928 reply codes, spelled out rather than taken from statute.
	const (
		succeeded   = 0x00
		failure     = 0x01
		unreachable = 0x04
		refused     = 0x05
	)
	want := map[tunnel.Status]uint8{
		tunnel.StatusOK:          succeeded,
		tunnel.StatusRefused:     refused,
		tunnel.StatusUnreachable: unreachable,
		tunnel.StatusNotExposed:  unreachable,
		tunnel.StatusNoRoute:     unreachable,
		tunnel.StatusStale:       unreachable,
		tunnel.StatusDraining:    unreachable,
		tunnel.StatusBusy:        failure,
		tunnel.StatusBadHeader:   failure,
		tunnel.StatusInternal:    failure,
	}
	// Every status the tunnel package names is in the table.
	for s := 0; s < 256; s++ {
		st := tunnel.Status(s)
		if _, ok := want[st]; !ok && !strings.HasPrefix(st.String(), "status(") {
			t.Errorf("status %d (%s) has no expected reply code in this test", s, st)
		}
	}
	for st, code := range want {
		if got := replyFor(st); got != code {
			t.Errorf("replyFor(%s) = %#x; want %#x", st, got, code)
		}
	}
	for _, st := range []tunnel.Status{10, 99, 255} {
		if got := replyFor(st); got != failure {
			t.Errorf("replyFor(unknown %d) = %#x; want general failure %#x", st, got, failure)
		}
	}
}

func TestLiteralResolver(t *testing.T) {
	type ctxKey struct{}
	ctx := context.WithValue(context.Background(), ctxKey{}, "kept")
	for _, tc := range []struct {
		name string
		want net.IP // nil: passed through unresolved
	}{
		{"10.1.2.3", net.IPv4(10, 1, 2, 3)},
		{"127.0.0.1", net.IPv4(127, 0, 0, 1)},
		{"::1", net.IPv6loopback},
		{"2001:db8::5", net.ParseIP("2001:db8::5")},
		{"::ffff:10.1.2.3", net.IPv4(10, 1, 2, 3)},
		{"localhost", nil},
		{"db.internal", nil},
		{"10.1.2.3.nip.io", nil},
		{"", nil},
	} {
		gotCtx, ip, err := literalResolver{}.Resolve(ctx, tc.name)
		if err != nil {
			t.Errorf("Resolve(%q) error %v; want nil", tc.name, err)
		}
		if gotCtx.Value(ctxKey{}) != "kept" {
			t.Errorf("Resolve(%q) dropped the context", tc.name)
		}
		if tc.want == nil {
			if ip != nil {
				t.Errorf("Resolve(%q) = %v; want nil (names are not resolved here)", tc.name, ip)
			}
			continue
		}
		if !ip.Equal(tc.want) {
			t.Errorf("Resolve(%q) = %v; want %v", tc.name, ip, tc.want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	c := Config{Listen: "127.0.0.1:1080"}
	if err := c.Validate(); err != nil {
		t.Fatalf("minimal config refused: %v", err)
	}
	if c.HandshakeTimeout != 10*time.Second || c.ConnectTimeout != 10*time.Second || c.IdleTimeout != time.Hour {
		t.Errorf("defaults: handshake %v, connect %v, idle %v; want 10s, 10s, 1h",
			c.HandshakeTimeout, c.ConnectTimeout, c.IdleTimeout)
	}
	c = Config{Listen: ":1080", Network: "lab", HandshakeTimeout: time.Second, ConnectTimeout: 2 * time.Second, IdleTimeout: time.Minute}
	if err := c.Validate(); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	if c.HandshakeTimeout != time.Second || c.ConnectTimeout != 2*time.Second || c.IdleTimeout != time.Minute {
		t.Errorf("set values overwritten: %+v", c)
	}
	for _, tc := range []struct {
		name string
		c    Config
		want []string
	}{
		{"no listen", Config{}, []string{"listen"}},
		{"bad listen", Config{Listen: "127.0.0.1"}, []string{"listen"}},
		{"bad network", Config{Listen: ":1080", Network: "bad net!"}, []string{"network"}},
		{"negative handshake", Config{Listen: ":1080", HandshakeTimeout: -time.Second}, []string{"handshake_timeout"}},
		{"negative connect", Config{Listen: ":1080", ConnectTimeout: -time.Second}, []string{"connect_timeout"}},
		{"negative idle", Config{Listen: ":1080", IdleTimeout: -time.Second}, []string{"idle_timeout"}},
		{"all at once", Config{Network: "bad net!", IdleTimeout: -1}, []string{"listen", "network", "idle_timeout"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.c.Validate()
			if err == nil {
				t.Fatalf("%+v accepted", tc.c)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w+":") {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
}

func TestDaemonConfigValidate(t *testing.T) {
	d := DaemonConfig{Config: Config{Listen: ":1080"}, LookupAPI: "http://127.0.0.1:7070"}
	if err := d.Validate(); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	if d.DrainGrace != 30*time.Second || d.HandshakeTimeout != 10*time.Second {
		t.Errorf("defaults: drain %v, handshake %v", d.DrainGrace, d.HandshakeTimeout)
	}
	err := (&DaemonConfig{DrainGrace: -1, Log: config.Log{Level: "loud"}}).Validate()
	if err == nil {
		t.Fatal("empty daemon config accepted")
	}
	for _, w := range []string{"listen:", "lookup_api:", "drain_grace:", "log.level:"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not name %q", err, w)
		}
	}
}
