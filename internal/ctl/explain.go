package ctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"syscall"
	"time"

	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// hintNoRoute is the advice when a target has no route.
const hintNoRoute = "no agent exposes this target (is the agent running and is the target in its config?)"

// Bounds of the explain steps.
const (
	// maxConnectTimeout caps the TCP connects of steps 2 and 3 (socks5d's
	// relay_dial_timeout default): a lost host fails fast.
	maxConnectTimeout = 2 * time.Second
	// minAgentWait is the least step 4 waits for the member's answer: the
	// server waits status_timeout (10 s) for the agent, which answers
	// "unreachable" after its dial_timeout (5 s). Waiting less would
	// report our own timeout instead of their answer.
	minAgentWait = 12 * time.Second
	// explainClient is the client name the member and agent log.
	explainClient = "vpcreachctl-explain"
)

// Step results.
const (
	resultOK      = "ok"
	resultFail    = "fail"
	resultSkipped = "skipped"
)

// stepJSON is one step of explain.
type stepJSON struct {
	Step      int     `json:"step"`
	Name      string  `json:"name"`
	Result    string  `json:"result"` // ok, fail or skipped
	Detail    string  `json:"detail"`
	Hint      string  `json:"hint"`
	ElapsedMS float64 `json:"elapsed_ms"`
}

// explainJSON is explain's -o json output.
type explainJSON struct {
	Target     string     `json:"target"`
	Source     string     `json:"source"`
	OK         bool       `json:"ok"`
	FailedStep int        `json:"failed_step"` // 0 when the path works
	Route      *routeJSON `json:"route"`       // null without a route
	Steps      []stepJSON `json:"steps"`
}

func (c *command) explain(ctx context.Context, key registry.Key) int {
	res := c.walk(ctx, key)
	if c.json() {
		if code := c.writeJSON(res); code != exitOK {
			return code
		}
	} else {
		writeExplain(c.stdout, res)
	}
	if !res.OK {
		return exitFail
	}
	return exitOK
}

// walk runs the steps in order and stops at the first failure; the
// steps after it are skipped.
func (c *command) walk(ctx context.Context, key registry.Key) explainJSON {
	res := explainJSON{Target: key.String(), Source: c.src.routesFrom, Steps: []stepJSON{
		{Step: 1, Name: "route"},
		{Step: 2, Name: "member alive"},
		{Step: 3, Name: "proxy port open"},
		{Step: 4, Name: "agent and target"},
	}}
	for i := range res.Steps {
		res.Steps[i].Result = resultSkipped
	}
	connectTimeout := min(c.o.timeout, maxConnectTimeout)
	var route registry.Route
	steps := []func(*stepJSON) bool{
		func(s *stepJSON) bool { // 1: is there a route?
			lctx, cancel := c.ctx(ctx)
			defer cancel()
			r, err := c.src.routes.Lookup(lctx, key)
			switch {
			case errors.Is(err, registry.ErrNotFound):
				s.Detail = "no route for " + key.String()
				s.Hint = hintNoRoute
				return false
			case err != nil:
				s.Detail = fmt.Sprintf("cannot read routes from %s: %v", c.src.routesFrom, err)
				s.Hint = "is the proxyserver's admin listener up and reachable from here?"
				if c.src.redis != nil {
					s.Hint = "is Redis up and reachable from here, with the right password and prefix?"
				}
				return false
			}
			route = r
			ro := routeOut(r, c.now)
			res.Route = &ro
			s.Detail = fmt.Sprintf("%s -> %s (agent %s, server %s, session %s, generation %d, registered %s ago)",
				key, orDash(addrString(r.Proxy)), orDash(r.Agent), orDash(r.Server), shortSession(r.Session),
				r.Generation, age(c.now, r.Registered))
			return true
		},
		func(s *stepJSON) bool { // 2: does the member answer on its relay port?
			if !route.Relay.IsValid() {
				s.Detail = "the route names no relay port"
				s.Hint = "the record was written by something other than a proxyserver of this version"
				return false
			}
			if err := probe(ctx, route.Relay.String(), connectTimeout); err != nil {
				s.Detail = fmt.Sprintf("cannot connect to relay port %s of server %s: %v", route.Relay, orDash(route.Server), err)
				s.Hint = "the member is down or its relay port is firewalled from here; a dead member's routes " +
					"expire within its lease (15 s by default) and the agent reconnects through the VIP"
				return false
			}
			s.Detail = fmt.Sprintf("relay port %s of server %s accepts connections", route.Relay, orDash(route.Server))
			return true
		},
		func(s *stepJSON) bool { // 3: is the proxy port open?
			if err := probe(ctx, route.Proxy.String(), connectTimeout); err != nil {
				s.Detail = fmt.Sprintf("cannot connect to proxy port %s: %v", route.Proxy, err)
				s.Hint = "the member closed this port (the agent's session there ended and the record is stale " +
					"until its lease expires) or a firewall blocks the proxy port range from here"
				return false
			}
			s.Detail = fmt.Sprintf("proxy port %s accepts connections (the member forwards them to the target)", route.Proxy)
			return true
		},
		func(s *stepJSON) bool { // 4: agent connected, target reachable?
			return c.relayStep(ctx, route, connectTimeout, s)
		},
	}
	res.OK = true
	for i, f := range steps {
		s := &res.Steps[i]
		start := time.Now()
		ok := f(s)
		s.ElapsedMS = math.Round(float64(time.Since(start))/float64(time.Millisecond)*10) / 10
		if !ok {
			s.Result = resultFail
			res.OK, res.FailedStep = false, s.Step
			break
		}
		s.Result = resultOK
	}
	return res
}

// probe opens a TCP connection to addr and closes it. A reset during
// the connect counts as open: the port accepted, and the member reset the
// connection at once (on a proxy port: its forward to the target failed,
// which step 4 tells apart), all before the dial returned.
func probe(ctx context.Context, addr string, timeout time.Duration) error {
	d := net.Dialer{Timeout: timeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if errors.Is(err, syscall.ECONNRESET) {
		return nil
	}
	if err != nil {
		return err
	}
	return conn.Close()
}

// relayStep connects through the member's relay port with the preamble
// socks5d sends, and turns the member's answer into a result.
func (c *command) relayStep(ctx context.Context, route registry.Route, connectTimeout time.Duration, s *stepJSON) bool {
	wait := max(c.o.timeout, minAgentWait)
	rctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	conn, st, err := socks.Relay(rctx, route, explainClient, connectTimeout)
	if st == tunnel.StatusOK {
		// A reset, not a close: the relay carries framed data, and a plain
		// FIN without the end marker does not end the member's stream (the
		// stream, the agent's copy and its target connection would wait for
		// the idle timeout). A reset aborts the whole chain at once.
		netx.Reset(conn)
		s.Detail = "the agent dialled the target through the tunnel; explain's connection to it was reset at once"
		return true
	}
	member := fmt.Sprintf("server %s (relay %s)", orDash(route.Server), route.Relay)
	switch {
	case errors.Is(err, socks.ErrMemberDown) && rctx.Err() != nil:
		s.Detail = fmt.Sprintf("no answer from %s within %s", member, wait)
		s.Hint = "the agent's dial of the target hangs or the tunnel is stuck; an agent answers " +
			"'unreachable' after its dial_timeout (5 s by default)"
	case errors.Is(err, socks.ErrMemberDown):
		s.Detail = fmt.Sprintf("member unreachable: %v", err)
		s.Hint = "the member dropped the relay connection without an answer: it is stopping or crashed"
	case st == tunnel.StatusRefused:
		s.Detail = fmt.Sprintf("the target refused the connection: the agent %s reached its host, but nothing accepts on %s",
			orDash(route.Agent), route.Addr)
		s.Hint = "start the service on the target, or correct the port in the agent's targets"
	case st == tunnel.StatusUnreachable:
		s.Detail = fmt.Sprintf("target unreachable: the agent %s could not reach %s (or its tunnel just ended)",
			orDash(route.Agent), route.Addr)
		s.Hint = "check the target from the agent's host: a timeout or no route there (firewall, security group, host down)"
	case st == tunnel.StatusStale, st == tunnel.StatusNoRoute:
		s.Detail = fmt.Sprintf("%s answered %q: the member no longer owns this route at generation %d (stale registry record)",
			member, st, route.Generation)
		s.Hint = "the agent's session there ended or a newer session took over; the record is replaced or " +
			"expires within the lease: run explain again"
	case st == tunnel.StatusNotExposed:
		s.Detail = fmt.Sprintf("the agent %s does not expose %s", orDash(route.Agent), route.Addr)
		s.Hint = "the target is no longer in the agent's config, but its route was not withdrawn"
	case st == tunnel.StatusBusy:
		s.Detail = fmt.Sprintf("%s answered %q: the agent's session is at its stream limit", member, st)
		s.Hint = "tunnel.max_streams streams are open on this session; 'vpcreachctl -api ... agents' shows them"
	case st == tunnel.StatusDraining:
		s.Detail = fmt.Sprintf("%s answered %q: the agent or the member is shutting down or moving", member, st)
		s.Hint = "retry in a few seconds: the agent opens its new session before the old one goes"
	case st == tunnel.StatusBadHeader:
		s.Detail = fmt.Sprintf("%s could not decode explain's relay preamble", member)
		s.Hint = "vpcreachctl and the proxyserver are of different protocol versions"
	default:
		s.Detail = fmt.Sprintf("%s answered %q: %v", member, st, err)
		s.Hint = "the proxyserver's log has the reason (search for the target)"
	}
	return false
}

func writeExplain(w io.Writer, res explainJSON) {
	fmt.Fprintf(w, "explain %s (routes from %s)\n", res.Target, res.Source)
	tw := newTable(w)
	fmt.Fprintln(tw, "STEP\tRESULT\tDETAIL")
	for _, s := range res.Steps {
		result := s.Result
		switch s.Result {
		case resultFail:
			result = "FAIL"
		case resultSkipped:
			result = "-"
		}
		detail := s.Detail
		if s.Result != resultSkipped {
			detail += " (" + millis(time.Duration(s.ElapsedMS*float64(time.Millisecond))) + ")"
		} else {
			detail = "not run"
		}
		fmt.Fprintf(tw, "%d %s\t%s\t%s\n", s.Step, s.Name, result, detail)
		if s.Hint != "" {
			fmt.Fprintf(tw, "\t\thint: %s\n", s.Hint)
		}
	}
	_ = tw.Flush()
	if res.OK {
		fmt.Fprintf(w, "path ok: clients reach %s at %s (proxy port) or through socks5d\n", res.Target, res.Route.Proxy)
	} else {
		fmt.Fprintf(w, "path fails at step %d (%s)\n", res.FailedStep, res.Steps[res.FailedStep-1].Name)
	}
}
