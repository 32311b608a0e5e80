package agent

import (
	"errors"
	"net"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vpcreach/vpcreach/internal/admin"
)

// adminHandler: metrics, /healthz, and /readyz = a tunnel is up.
func (a *Agent) adminHandler() http.Handler {
	ad := admin.New(a.ready)
	reg := ad.Reg
	st := &a.Stats
	admin.GaugeOf(reg, "agent_sessions", "Live tunnel sessions (2 during a move).", &st.Sessions, nil)
	admin.Gauge(reg, "agent_tunnel_up", "1 while a tunnel is up.", func() float64 {
		if a.ready() == nil {
			return 1
		}
		return 0
	}, nil)
	admin.Counter(reg, "agent_reconnects_total", "Tunnels lost and reconnected.", &st.Reconnects, nil)
	admin.GaugeOf(reg, "agent_streams_open", "Open streams to targets.", &st.StreamsOpen, nil)
	admin.Counter(reg, "agent_streams_opened_total", "Streams connected to their target.", &st.StreamsTotal, nil)
	admin.Counter(reg, "agent_streams_at_cap_total", "Streams refused at the per-session cap.", &st.StreamsAtCap, nil)
	admin.Counter(reg, "agent_bytes_total", "Bytes carried, by direction.", &st.Bytes.Down, prometheus.Labels{"direction": "to_target"})
	admin.Counter(reg, "agent_bytes_total", "Bytes carried, by direction.", &st.Bytes.Up, prometheus.Labels{"direction": "from_target"})
	admin.Counter(reg, "agent_spliced_total", "Stream directions sent to the server as spliced frames (bulk, splice(2)).", &st.Bytes.Spliced, nil)
	name, help := "agent_dial_failures_total", "Streams refused before data, by reason."
	admin.Counter(reg, name, help, &st.DialRefused, prometheus.Labels{"reason": "refused"})
	admin.CounterFunc(reg, name, help, func() float64 { return float64(st.DialFailures.Load() - st.DialRefused.Load()) },
		prometheus.Labels{"reason": "unreachable"})
	admin.Counter(reg, name, help, &st.NotExposed, prometheus.Labels{"reason": "not_exposed"})
	return ad.Mux
}

func (a *Agent) ready() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	switch {
	case a.draining.Load():
		return errors.New("draining")
	case a.current == nil:
		return errors.New("no tunnel")
	}
	return nil
}

// AdminAddr is the admin listener's address (nil: off or not started).
func (a *Agent) AdminAddr() net.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.adminSrv == nil {
		return nil
	}
	return a.adminSrv.Addr()
}
