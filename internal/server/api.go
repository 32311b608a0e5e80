package server

import (
	"net/http"
	"sort"
	"time"

	"github.com/vpcreach/vpcreach/registry"
)

// AgentInfo is one live agent session, as the lookup API lists it.
type AgentInfo struct {
	Agent      string    `json:"agent"`
	Session    string    `json:"session"`
	Generation uint64    `json:"generation"`
	Remote     string    `json:"remote"`
	Started    time.Time `json:"started"`
	Version    int       `json:"version"`
	Routes     []string  `json:"routes"`
	Streams    int64     `json:"streams"`       // open data streams
	Yamux      int       `json:"yamux_streams"` // yamux streams, control stream included
}

// Agents lists the live agent sessions of this member.
func (s *Server) Agents() []AgentInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]AgentInfo, 0, len(s.sessions))
	for as := range s.sessions {
		ai := AgentInfo{Agent: as.agent, Session: as.id, Generation: as.gen, Remote: as.remote,
			Started: as.started.UTC(), Version: as.ts.Version, Streams: as.streams.Load(), Yamux: as.ts.Mux.NumStreams(), Routes: []string{}}
		for _, r := range as.routes {
			ai.Routes = append(ai.Routes, r.key.String()+" -> "+r.info.Proxy.String())
		}
		sort.Strings(ai.Routes)
		out = append(out, ai)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Agent < out[j].Agent })
	return out
}

// apiHandler serves the lookup API: the registry's routes and lookup
// (registry.NewHandler), plus this member's agents and counters.
func (s *Server) apiHandler() http.Handler {
	mux := http.NewServeMux()
	reg := registry.NewHandler(s.reg)
	mux.Handle("GET /v1/routes", reg)
	mux.Handle("GET /v1/lookup", reg)
	mux.HandleFunc("GET /v1/agents", func(w http.ResponseWriter, _ *http.Request) {
		registry.WriteJSON(w, http.StatusOK, s.Agents())
	})
	mux.HandleFunc("GET /v1/stats", func(w http.ResponseWriter, _ *http.Request) {
		registry.WriteJSON(w, http.StatusOK, s.Stats.Snapshot())
	})
	return mux
}
