package socks

import (
	"errors"
	"fmt"
	"net"

	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/registry"
)

// ErrRestartNeeded marks a reload that changes settings only a restart
// can change; the running configuration stays.
var ErrRestartNeeded = errors.New("needs a restart")

// permit decides, against the newest users, whether the connection may
// CONNECT to key, and records the target when it may. It runs under mu,
// as Apply's re-check does, so a CONNECT either sees a reload's users or
// is seen by its re-check. It returns the user name for log lines.
func (s *Server) permit(st *connState, key registry.Key) (string, denial) {
	s.mu.Lock()
	defer s.mu.Unlock()
	u, why := s.live.Load().auth.permits(st.user, key)
	name := ""
	if st.user != nil {
		name = st.user.name
	}
	if why == allowed {
		st.user, st.key, st.connected = u, key, true
	}
	return name, why
}

// Apply swaps in cfg (which must have passed Validate): users and ACLs,
// timeouts, the network, max_conns_per_source. Connections that are
// open stay, except those a stricter cfg no longer allows, which are
// closed with a reset: a removed user, a changed password, a target the
// user's ACL no longer names, or a connection without a user once users
// are required. Revocation is immediate, not at the next CONNECT. Timeouts
// apply to connections accepted after the swap; listen cannot change
// (ErrRestartNeeded).
func (s *Server) Apply(cfg Config) error {
	s.applyMu.Lock()
	defer s.applyMu.Unlock()
	cur := s.live.Load()
	if cfg.Listen != cur.cfg.Listen {
		return fmt.Errorf("listen changed (%s -> %s): %w", cur.cfg.Listen, cfg.Listen, ErrRestartNeeded)
	}
	set, err := newSettings(cfg)
	if err != nil {
		return err
	}
	type victim struct {
		c    net.Conn
		user string
		key  registry.Key
	}
	var victims []victim
	s.mu.Lock()
	s.live.Store(set)
	for c, st := range s.conns {
		if !st.connected || st.revoked {
			continue // checked at its CONNECT, against set; or closed already
		}
		u, why := set.auth.permits(st.user, st.key)
		if why == allowed {
			st.user = u
			continue
		}
		st.revoked = true
		v := victim{c: c, key: st.key}
		if st.user != nil {
			v.user = st.user.name
		}
		victims = append(victims, v)
	}
	s.mu.Unlock()
	for _, v := range victims {
		netx.Reset(v.c)
		s.revoked.Add(1)
		s.log.Info("connection closed: no longer allowed after reload", "client", v.c.RemoteAddr().String(),
			"user", v.user, "target", v.key.String())
	}
	users := 0
	if set.auth != nil {
		users = len(set.auth.users)
	}
	s.log.Info("socks5 settings applied", "users", users, "auth_required", set.auth.required(),
		"connections_closed", len(victims))
	return nil
}
