package agent

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// Config is the agent's configuration file.
type Config struct {
	// AgentID names the agent. Default: the hostname.
	AgentID string `yaml:"agent_id"`
	// Servers are the proxy cluster's addresses (the VIP), host:port,
	// tried in turn.
	Servers []string `yaml:"servers"`
	// Token is the agent's token (shared, or its own with per-agent
	// tokens). Proven by challenge, never sent. Optional with a client
	// certificate (mutual TLS).
	Token config.Secret `yaml:"token"`
	// TLS connects with TLS 1.3 and verifies the server's certificate
	// (ca_file, server_name: default the first server's host); cert_file
	// and key_file are the client certificate for mutual TLS.
	TLS *config.TLSFiles `yaml:"tls"`
	// Targets are the addresses this agent exposes, and the only ones it
	// ever dials.
	Targets []TargetConfig `yaml:"targets"`
	// DialTimeout bounds a dial to a target. Default 5 s.
	DialTimeout time.Duration `yaml:"dial_timeout"`
	// ConnectTimeout bounds a dial to a server. Default 5 s.
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
	// IdleTimeout closes target connections idle this long. Default 1 h.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// DrainGrace is how long open connections may finish on SIGTERM or
	// after a move. Default 30 s.
	DrainGrace time.Duration `yaml:"drain_grace"`
	// BackoffMax caps the reconnect backoff. Default 15 s.
	BackoffMax time.Duration `yaml:"backoff_max"`
	// Admin is the admin listener (metrics, /healthz, /readyz = tunnel
	// up); empty: off.
	Admin  string          `yaml:"admin"`
	Tunnel tunnel.Settings `yaml:"tunnel"`
	Log    config.Log      `yaml:"log"`
}

// TargetConfig is one exposed target.
type TargetConfig struct {
	// Addr is ip:port, or :port for this host's address on its route to
	// the server.
	Addr string `yaml:"addr"`
	// Network is the registry network ("" is the default network).
	Network string `yaml:"network"`
	// ProxyPort asks the server for a fixed proxy port (0: any).
	ProxyPort uint16 `yaml:"proxy_port"`
}

// Validate fills defaults and checks every field, reporting all problems.
func (c *Config) Validate() error {
	var p config.Problems
	if c.AgentID == "" {
		c.AgentID, _ = os.Hostname()
	}
	if c.AgentID == "" || len(c.AgentID) > tunnel.MaxIDLen {
		p.Addf("agent_id", "must be 1-%d bytes", tunnel.MaxIDLen)
	}
	if len(c.Servers) == 0 {
		p.Addf("servers", "required: at least one proxy server address (host:port)")
	}
	for i, s := range c.Servers {
		if _, _, err := net.SplitHostPort(s); err != nil {
			p.Addf(fmt.Sprintf("servers[%d]", i), "%v", err)
		}
	}
	switch {
	case c.Token.IsSet():
		if _, err := c.Token.Read(); err != nil {
			p.Addf("token", "%v", err)
		}
	case c.TLS == nil || c.TLS.CertFile == "":
		p.Addf("token", "required (token.file or token.env) unless tls has a client certificate")
	}
	if c.TLS != nil {
		if _, err := c.TLS.Config(); err != nil {
			p.Addf("tls", "%v", err)
		}
	}
	if len(c.Targets) == 0 {
		p.Addf("targets", "required: at least one target")
	}
	if len(c.Targets) > tunnel.MaxTargets {
		p.Addf("targets", "at most %d", tunnel.MaxTargets)
	}
	seen := map[string]bool{}
	for i, t := range c.Targets {
		key := fmt.Sprintf("targets[%d]", i)
		// Duplicates are found on the parsed address, so that two
		// spellings of one target (10.0.0.5:22, [::ffff:10.0.0.5]:22,
		// 10.0.0.5:022; :22, 0.0.0.0:22, [::]:22) are caught here rather
		// than refused by the server as "target listed twice".
		dup := t.Addr
		if pt, err := t.parse(); err != nil {
			p.Addf(key+".addr", "%v", err)
		} else if pt.Addr.Addr().IsUnspecified() {
			dup = fmt.Sprintf(":%d", pt.Addr.Port())
		} else {
			dup = pt.Addr.String()
		}
		if t.Network != "" {
			if err := registry.ValidNetwork(t.Network); err != nil {
				p.Addf(key+".network", "%v", err)
			}
		}
		if seen[t.Network+"/"+dup] {
			p.Addf(key, "duplicate target %s", t.Addr)
		}
		seen[t.Network+"/"+dup] = true
	}
	p.Duration(&c.DialTimeout, 5*time.Second, "dial_timeout")
	p.Duration(&c.ConnectTimeout, 5*time.Second, "connect_timeout")
	p.Duration(&c.IdleTimeout, time.Hour, "idle_timeout")
	p.Duration(&c.DrainGrace, 30*time.Second, "drain_grace")
	if c.Admin != "" {
		if _, _, err := net.SplitHostPort(c.Admin); err != nil {
			p.Addf("admin", "%v", err)
		}
	}
	p.Duration(&c.BackoffMax, 15*time.Second, "backoff_max")
	c.Tunnel = c.Tunnel.WithDefaults()
	c.Log.Validate(&p)
	return p.Err()
}

// parse returns the target with an unspecified IP when Addr is ":port".
func (t TargetConfig) parse() (tunnel.Target, error) {
	host, port, err := net.SplitHostPort(t.Addr)
	if err != nil {
		return tunnel.Target{}, fmt.Errorf("%q is not ip:port or :port", t.Addr)
	}
	ip := netip.IPv4Unspecified()
	if host != "" {
		if ip, err = netip.ParseAddr(host); err != nil {
			return tunnel.Target{}, fmt.Errorf("%q: the host must be an IP address (no DNS names)", t.Addr)
		}
	}
	ap, err := netip.ParseAddrPort(net.JoinHostPort(ip.String(), port))
	if err != nil || ap.Port() == 0 {
		return tunnel.Target{}, fmt.Errorf("%q: bad port", t.Addr)
	}
	return tunnel.Target{Network: t.Network, Addr: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), Port: t.ProxyPort}, nil
}
