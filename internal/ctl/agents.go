package ctl

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strconv"
	"time"

	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/registry"
)

// agentJSON is an agent session in -o json output. Derived sessions (from
// the registry's routes, no admin API) have no remote, version or stream
// counts, and their start is read from the generation (the session's
// start time in ns).
type agentJSON struct {
	Agent        string    `json:"agent"`
	Session      string    `json:"session"`
	Generation   uint64    `json:"generation"`
	Server       string    `json:"server"`
	Remote       string    `json:"remote"`
	Started      time.Time `json:"started"`
	Version      int       `json:"version"`
	Routes       []string  `json:"routes"` // "[network/]ip:port -> proxy ip:port"
	Streams      int64     `json:"streams"`
	YamuxStreams int       `json:"yamux_streams"`
	Derived      bool      `json:"derived"`
}

func (c *command) agents(ctx context.Context) int {
	ctx, cancel := c.ctx(ctx)
	defer cancel()
	var out []agentJSON
	if c.src.api != nil {
		infos, err := c.src.api.agents(ctx)
		if err != nil {
			return c.fail("list agents from api %s: %v", c.src.api.base, err)
		}
		// The server id is not in /v1/agents: take it from the session's
		// routes, when they can be read.
		servers := map[string]string{}
		if rs, err := c.src.routes.List(ctx); err == nil {
			for _, r := range rs {
				servers[r.Session] = r.Server
			}
		}
		out = fromAPI(infos, servers)
	} else {
		rs, err := c.src.routes.List(ctx)
		if err != nil {
			return c.fail("list routes from %s: %v", c.src.routesFrom, err)
		}
		out = deriveAgents(rs)
		fmt.Fprintf(c.stderr, "note: no admin API given, so these sessions are derived from the %d routes in %s: "+
			"only sessions that hold routes are shown; remote address, version and streams need -api\n", len(rs), c.src.routesFrom)
	}
	if c.json() {
		return c.writeJSON(out)
	}
	if len(out) == 0 {
		fmt.Fprintln(c.stderr, "no agents")
		return exitOK
	}
	writeAgentTable(c.stdout, out, c.now)
	return exitOK
}

func fromAPI(infos []server.AgentInfo, servers map[string]string) []agentJSON {
	out := make([]agentJSON, 0, len(infos))
	for _, ai := range infos {
		routes := ai.Routes
		if routes == nil {
			routes = []string{}
		}
		out = append(out, agentJSON{Agent: ai.Agent, Session: ai.Session, Generation: ai.Generation,
			Server: servers[ai.Session], Remote: ai.Remote, Started: ai.Started.UTC(), Version: ai.Version,
			Routes: routes, Streams: ai.Streams, YamuxStreams: ai.Yamux})
	}
	sortAgents(out)
	return out
}

// deriveAgents groups routes by (agent, session, server): one entry per
// session that holds routes.
func deriveAgents(rs []registry.Route) []agentJSON {
	type id struct{ agent, session, server string }
	sortRoutes(rs)
	byID := map[id]*agentJSON{}
	out := []agentJSON{}
	var order []id
	for _, r := range rs {
		k := id{r.Agent, r.Session, r.Server}
		a := byID[k]
		if a == nil {
			a = &agentJSON{Agent: r.Agent, Session: r.Session, Server: r.Server, Generation: r.Generation,
				Started: time.Unix(0, int64(r.Generation)).UTC(), Routes: []string{}, Derived: true}
			byID[k] = a
			order = append(order, k)
		}
		a.Routes = append(a.Routes, r.Key.String()+" -> "+addrString(r.Proxy))
	}
	for _, k := range order {
		out = append(out, *byID[k])
	}
	sortAgents(out)
	return out
}

func sortAgents(as []agentJSON) {
	sort.SliceStable(as, func(i, j int) bool {
		if as[i].Agent != as[j].Agent {
			return as[i].Agent < as[j].Agent
		}
		if as[i].Server != as[j].Server {
			return as[i].Server < as[j].Server
		}
		return as[i].Generation < as[j].Generation
	})
}

func writeAgentTable(w io.Writer, as []agentJSON, now time.Time) {
	tw := newTable(w)
	fmt.Fprintln(tw, "AGENT\tSESSION\tSERVER\tREMOTE\tUP\tVERSION\tROUTES\tSTREAMS\tGENERATION")
	for _, a := range as {
		remote, version, streams := a.Remote, "", ""
		if !a.Derived {
			version, streams = strconv.Itoa(a.Version), strconv.FormatInt(a.Streams, 10)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%d\n", orDash(a.Agent), shortSession(a.Session),
			orDash(a.Server), orDash(remote), age(now, a.Started), orDash(version), len(a.Routes),
			orDash(streams), a.Generation)
	}
	_ = tw.Flush()
}
