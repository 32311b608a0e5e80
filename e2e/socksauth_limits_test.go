package e2e

import (
	"net"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// max_conns_per_source on the in-process front end: with the cap reached
// by connections carrying data, one more from the same source is closed
// at once (log line, counter) while the others keep working; once one
// closes, the source may connect again.
func TestSocksPerSourceCap(t *testing.T) {
	const max = 3
	echo := testutil.EchoTarget(t)
	var logs testutil.LogBuffer
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, logger(&logs), withSocksUsers(max))
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil)
	waitRoute(t, reg, echo, "")
	addr := srv.SocksAddr().String()

	var held []net.Conn
	for range max {
		c, rep := socksConnect(t, addr, echo)
		if rep != 0 {
			t.Fatalf("reply %d", rep)
		}
		saEcho(t, c, "held")
		held = append(held, c)
	}
	extra := saDial(t, addr, "127.0.0.1")
	_ = extra.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _ = extra.Write([]byte{5, 1, 0})
	if n, err := extra.Read(make([]byte, 2)); n != 0 || err == nil {
		t.Fatalf("connection over the cap: read %d, %v; want it closed unanswered", n, err)
	}
	testutil.Eventually(t, 2*time.Second, "cap log line", func() bool {
		return saLogHas(&logs, `msg="connection refused: too many connections from this source"`, "client=127.0.0.1:",
			"max_conns_per_source=3")
	})
	// Another source is counted on its own.
	other := saDial(t, addr, "127.0.0.7")
	_ = other.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = other.Write([]byte{5, 1, 0})
	if b := make([]byte, 2); func() error { _, err := other.Read(b); return err }() != nil || b[1] != 0 {
		t.Fatal("another source was refused")
	}
	other.Close()
	for _, c := range held {
		saEcho(t, c, "still served")
	}
	held[0].Close()
	testutil.Eventually(t, 5*time.Second, "the closed connection untracked", func() bool {
		return scrape(t, srv.APIAddr())[`vpcreach_server_socks_connections_open`] == max-1
	})
	if c, rep := socksConnect(t, addr, echo); rep != 0 {
		t.Fatalf("below the cap again: reply %d", rep)
	} else {
		saEcho(t, c, "new")
	}
	if m := scrape(t, srv.APIAddr()); m[`vpcreach_server_socks_connections_refused_total{reason="per_source_cap"}`] != 1 {
		t.Fatalf("per_source_cap counter %v, want 1", m[`vpcreach_server_socks_connections_refused_total{reason="per_source_cap"}`])
	}
	for _, c := range held[1:] {
		saEcho(t, c, "at the end")
	}
}
