package e2e

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// cutter is an in-test TCP relay in front of a server's control port
// whose live connections can be cut (reset) at once.
type cutter struct {
	ln    net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func newCutter(t *testing.T, to string) *cutter {
	c := &cutter{ln: testutil.Listen(t)}
	testutil.Serve(t, c.ln, func(in net.Conn) {
		out, err := net.Dial("tcp", to)
		if err != nil {
			in.Close()
			return
		}
		c.mu.Lock()
		c.conns = append(c.conns, in, out)
		c.mu.Unlock()
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); io.Copy(out, in); out.Close() }()
		go func() { defer wg.Done(); io.Copy(in, out); in.Close() }()
		wg.Wait()
	})
	return c
}

func (c *cutter) cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, x := range c.conns {
		netx.Reset(x)
	}
	c.conns = nil
}

func TestTunnelDropRemovesRoutesAndPortComesBack(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil)
	relay := newCutter(t, srv.ControlAddr().String())
	startAgent(t, []string{relay.ln.Addr().String()}, []string{echo}, nil)
	before := waitRoute(t, reg, echo, "")

	relay.cut()
	start := time.Now()
	// The agent may reconnect within milliseconds (full-jitter backoff):
	// the old session's route must be gone, maybe already replaced.
	testutil.Eventually(t, 5*time.Second, "route removed when the tunnel dropped", func() bool {
		r, err := reg.Lookup(context.Background(), before.Key)
		return errors.Is(err, registry.ErrNotFound) || err == nil && r.Session != before.Session
	})
	if d := time.Since(start); d > time.Second {
		t.Fatalf("route removed after %v; want at once", d)
	}
	after := waitRoute(t, reg, echo, "")
	if after.Session == before.Session || after.Generation <= before.Generation {
		t.Fatalf("route after reconnect is not a newer session: %+v", after)
	}
	if after.Proxy != before.Proxy {
		t.Fatalf("reconnected agent got port %v, want its old %v back", after.Proxy, before.Proxy)
	}
	c, err := net.Dial("tcp", after.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoOnce(t, c, "reconnected")
}
