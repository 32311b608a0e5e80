package server

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/internal/proxyproto"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/tunnel"
)

// Config is the proxy server's configuration file.
type Config struct {
	// ServerID names this member in routes and logs. Default: hostname.
	ServerID string `yaml:"server_id"`
	// Control is the listen address for agent tunnels (what the VIP
	// points at).
	Control string `yaml:"control"`
	// ProxyProtocolFrom lists the load balancers (addresses or CIDRs)
	// whose connections to the control listener start with a PROXY
	// protocol v2 header (haproxy send-proxy-v2): logs and caps then see
	// the real agent address. Other peers are never parsed for one.
	ProxyProtocolFrom []string `yaml:"proxy_protocol_from"`
	// MaxTunnelsPerSource caps the control connections (handshaking or
	// live) from one source address, the real one behind a balancer.
	// Agents behind one NAT share a source: size it for that. Default 256.
	MaxTunnelsPerSource int `yaml:"max_tunnels_per_source"`
	// Advertise is this member's own address: proxy ports bind to it and
	// routes name it.
	Advertise string `yaml:"advertise"`
	// Relay is the port of the relay listener socks5d connects to, on the
	// advertised address; 0 picks a free port (routes name the real one).
	Relay int `yaml:"relay_port"`
	// Admin is the admin listener: the JSON lookup API (/v1/...),
	// Prometheus metrics (/metrics), /healthz and /readyz. Empty: off.
	// Keep it on loopback or a management network.
	Admin string `yaml:"admin"`
	// API is the earlier name of Admin, still accepted.
	API string `yaml:"api"`
	// ProxyBind is the address proxy ports bind to (default: advertise),
	// e.g. 0.0.0.0 behind a NAT that forwards the advertised address.
	ProxyBind string `yaml:"proxy_bind"`
	// ProxyAllow lists the source CIDRs allowed on the proxy ports; others
	// are reset with a log line and a counter. Empty: everyone.
	ProxyAllow []string `yaml:"proxy_allow"`
	// RelayAllow is the same for the relay port (where socks5d connects).
	RelayAllow []string `yaml:"relay_allow"`
	// Ports is the proxy port range, "lo-hi".
	Ports string `yaml:"port_range"`
	// Registry is the route store: memory (default, one server) or redis
	// (a cluster).
	Registry config.Registry `yaml:"registry"`
	// Cache tunes the in-process SOCKS5 front end's route cache (redis).
	Cache socks.CacheConfig `yaml:"cache"`
	// Token is the shared agent token: every agent holding it has one
	// identity.
	Token config.Secret `yaml:"token"`
	// TokensFile names a YAML map of agent id -> token: each agent its
	// own identity (the agent id). Re-read on SIGHUP.
	TokensFile string `yaml:"tokens_file"`
	// TLS puts TLS 1.3 on the control listener; with client_ca_file,
	// mutual TLS (the identity is the certificate's common name).
	// Certificate files are re-read on SIGHUP.
	TLS *ServerTLS `yaml:"tls"`
	// InsecureNoAuth lets a server without any credential start: every
	// agent is accepted. For labs only.
	InsecureNoAuth bool `yaml:"insecure_no_auth"`
	// MinAgentVersion is the oldest protocol an agent may speak. Version
	// 2 sends its token in the hello (replayable without TLS); raise it to
	// 3 once every agent is upgraded. Default 2.
	MinAgentVersion int `yaml:"min_agent_version"`
	// Policy lists, per identity, what it may expose; identities not
	// listed may expose nothing. Without it, every identity may expose
	// anything. Re-read on SIGHUP; what no longer passes is revoked.
	Policy []PolicyRule `yaml:"policy"`
	// Lease is the TTL of registered routes; they are renewed every
	// Lease/3. Default 15 s.
	Lease time.Duration `yaml:"lease"`
	// Quarantine keeps a released port from going to another target.
	// Default: lease + 15 s (socks5d cache TTL).
	Quarantine time.Duration `yaml:"quarantine"`
	// IdleTimeout closes user connections idle this long. Default 1 h.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
	// StatusTimeout bounds the wait for the agent's answer to a stream
	// (its dial). Default 10 s.
	StatusTimeout time.Duration `yaml:"status_timeout"`
	// DrainGrace is how long a draining server waits for agents to move
	// and connections to finish. Default 30 s.
	DrainGrace time.Duration `yaml:"drain_grace"`
	// Tunnel tunes the yamux sessions.
	Tunnel tunnel.Settings `yaml:"tunnel"`
	// Socks5, when its listen address is set, runs the SOCKS5 front end in
	// this process (single-server mode).
	Socks5 *socks.Config `yaml:"socks5"`
	Log    config.Log    `yaml:"log"`

	// Filled by Validate.
	advertise      netip.Addr
	proxyBind      netip.Addr
	proxyAllow     netx.Prefixes
	relayAllow     netx.Prefixes
	portLo, portHi int
	balancers      proxyproto.Trusted
}

// Validate fills defaults and checks every field, reporting all problems.
func (c *Config) Validate() error {
	var p config.Problems
	if c.ServerID == "" {
		c.ServerID, _ = os.Hostname()
	}
	if c.Control == "" {
		p.Addf("control", "required (listen address for agent tunnels, e.g. 0.0.0.0:7000)")
	} else if _, _, err := net.SplitHostPort(c.Control); err != nil {
		p.Addf("control", "%v", err)
	}
	if t, err := proxyproto.ParseTrusted(c.ProxyProtocolFrom); err != nil {
		p.Addf("proxy_protocol_from", "%v", err)
	} else {
		c.balancers = t
	}
	var err error
	if c.proxyAllow, err = netx.ParsePrefixes(c.ProxyAllow); err != nil {
		p.Addf("proxy_allow", "%v", err)
	}
	if c.relayAllow, err = netx.ParsePrefixes(c.RelayAllow); err != nil {
		p.Addf("relay_allow", "%v", err)
	}
	if c.MaxTunnelsPerSource == 0 {
		c.MaxTunnelsPerSource = 256
	} else if c.MaxTunnelsPerSource < 0 {
		p.Addf("max_tunnels_per_source", "must be positive")
	}
	if a, err := netip.ParseAddr(c.Advertise); err != nil || a.IsUnspecified() {
		p.Addf("advertise", "required: this member's own IP address (got %q)", c.Advertise)
	} else {
		c.advertise = a.Unmap()
	}
	c.proxyBind = c.advertise
	if c.ProxyBind != "" {
		if a, err := netip.ParseAddr(c.ProxyBind); err != nil {
			p.Addf("proxy_bind", "%v", err)
		} else {
			c.proxyBind = a.Unmap()
		}
	}
	if c.Relay < 0 || c.Relay > 65535 {
		p.Addf("relay_port", "must be a port 0-65535, 0 for any free port (got %d)", c.Relay)
	}
	switch {
	case c.API != "" && c.Admin != "" && c.API != c.Admin:
		p.Addf("api", "is the old name of admin: set only admin")
	case c.API != "":
		c.Admin = c.API
	}
	if c.Admin != "" {
		if _, _, err := net.SplitHostPort(c.Admin); err != nil {
			p.Addf("admin", "%v", err)
		}
	}
	lo, hi, err := parseRange(c.Ports)
	if err != nil {
		p.Addf("port_range", "%v", err)
	} else if c.Relay != 0 && c.Relay >= lo && c.Relay <= hi {
		p.Addf("relay_port", "%d lies inside port_range %s", c.Relay, c.Ports)
	}
	c.portLo, c.portHi = lo, hi
	switch {
	case c.MinAgentVersion == 0:
		c.MinAgentVersion = tunnel.Version2
	case c.MinAgentVersion < tunnel.MinVersion || c.MinAgentVersion > tunnel.MaxVersion:
		p.Addf("min_agent_version", "must be %d-%d", tunnel.MinVersion, tunnel.MaxVersion)
	}
	if c.Token.IsSet() && c.TokensFile != "" {
		p.Addf("tokens_file", "set token (one shared) or tokens_file (per agent), not both")
	}
	if c.TLS != nil && (c.TLS.CertFile == "" || c.TLS.KeyFile == "") {
		p.Addf("tls", "cert_file and key_file are required")
	}
	if a, err := loadAuth(c); err != nil {
		p.Addf("auth", "%v", err)
	} else if !a.hasCredential() && !c.InsecureNoAuth {
		p.Addf("token", "no authentication configured: set token, tokens_file or tls.client_ca_file (or insecure_no_auth: true for a lab)")
	}
	c.Registry.Validate(&p, "registry", "memory")
	c.Cache.Validate(&p)
	p.Duration(&c.Lease, 15*time.Second, "lease")
	p.Duration(&c.Quarantine, c.Lease+15*time.Second, "quarantine")
	p.Duration(&c.IdleTimeout, time.Hour, "idle_timeout")
	p.Duration(&c.StatusTimeout, 10*time.Second, "status_timeout")
	p.Duration(&c.DrainGrace, 30*time.Second, "drain_grace")
	c.Tunnel = c.Tunnel.WithDefaults()
	if c.Socks5 != nil {
		if err := c.Socks5.Validate(); err != nil {
			p.Addf("socks5", "%v", err)
		}
	}
	c.Log.Validate(&p)
	return p.Err()
}

func parseRange(s string) (int, int, error) {
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		return 0, 0, fmt.Errorf("%q is not lo-hi (e.g. 20000-20999)", s)
	}
	lo, err1 := strconv.Atoi(strings.TrimSpace(a))
	hi, err2 := strconv.Atoi(strings.TrimSpace(b))
	if err1 != nil || err2 != nil || lo < 1 || hi > 65535 || lo > hi {
		return 0, 0, fmt.Errorf("%q is not lo-hi with 1 <= lo <= hi <= 65535", s)
	}
	return lo, hi, nil
}

// RelayAddr is the relay listener's address.
func (c *Config) RelayAddr() netip.AddrPort {
	return netip.AddrPortFrom(c.advertise, uint16(c.Relay))
}

// Config returns the configuration the server started with.
func (s *Server) Config() Config { return s.cfg }

// allowed reports whether the remote address of c is in list (empty: all).
func allowed(list netx.Prefixes, c net.Conn) bool {
	if len(list) == 0 {
		return true
	}
	ap, err := netip.ParseAddrPort(c.RemoteAddr().String())
	return err == nil && list.Contains(ap.Addr())
}
