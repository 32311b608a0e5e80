package e2e

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/agent"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// Live reload of the agent's targets: one added and one removed on the
// same tunnel session; a connection open through the removed one goes on;
// a change that needs a restart is refused and changes nothing.
func TestAgentReloadTargets(t *testing.T) {
	first, second := testutil.EchoTarget(t), testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil)
	var cfg agent.Config
	keep := func(c *agent.Config, _ *agent.Agent) {
		if c != nil {
			cfg = *c
		}
	}
	a := startAgent(t, []string{srv.ControlAddr().String()}, []string{first}, nil, keep)
	r1 := waitRoute(t, reg, first, "")
	testutil.Eventually(t, 5*time.Second, "session listed", func() bool { return len(srv.Agents()) == 1 })
	session := srv.Agents()[0].Session
	open, err := net.Dial("tcp", r1.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	echoOnce(t, open, "before reload")

	next := cfg
	next.Targets = []agent.TargetConfig{{Addr: second}}
	if err := next.Validate(); err != nil { // as a reload loads it
		t.Fatal(err)
	}
	if err := a.Apply(&next); err != nil {
		t.Fatal(err)
	}
	r2 := waitRoute(t, reg, second, "")
	c2, err := net.Dial("tcp", r2.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, c2, "added target")
	c2.Close()
	k1, _ := registry.ParseKey(first)
	testutil.Eventually(t, 5*time.Second, "removed target's route gone", func() bool {
		_, err := reg.Lookup(context.Background(), k1)
		return errors.Is(err, registry.ErrNotFound)
	})
	echoOnce(t, open, "still open after its target was removed")
	if ag := srv.Agents(); len(ag) != 1 || ag[0].Session != session {
		t.Fatalf("agents after reload = %+v; want the same session %s", ag, session)
	}
	if n := a.Stats.Reconnects.Load(); n != 0 {
		t.Fatalf("reload reconnected the tunnel (%d reconnects)", n)
	}

	bad := next
	bad.AgentID = "someone-else"
	bad.Targets = []agent.TargetConfig{{Addr: first}}
	if err := a.Apply(&bad); err == nil || !strings.Contains(err.Error(), "restart") {
		t.Fatalf("Apply with a new agent_id = %v; want it refused", err)
	}
	// Apply refuses before it changes anything: no add was sent.
	if _, err := reg.Lookup(context.Background(), k1); !errors.Is(err, registry.ErrNotFound) {
		t.Fatalf("a refused reload still claimed %s (%v)", first, err)
	}
}
