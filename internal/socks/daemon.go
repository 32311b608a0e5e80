package socks

import (
	"context"
	"log/slog"
	"net"
	"time"

	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/registry"
)

// DaemonConfig is the configuration file of the standalone socks5d.
type DaemonConfig struct {
	Config `yaml:",inline"`
	// LookupAPI is the proxy server's lookup API base URL (in-memory
	// mode), e.g. http://10.0.0.2:7070.
	LookupAPI string `yaml:"lookup_api"`
	// DrainGrace is how long open connections may finish on SIGTERM.
	// Default 30 s.
	DrainGrace time.Duration `yaml:"drain_grace"`
	Log        config.Log    `yaml:"log"`
}

// Validate fills defaults and checks every field.
func (c *DaemonConfig) Validate() error {
	var p config.Problems
	if err := c.Config.Validate(); err != nil {
		p = append(p, err.Error())
	}
	if c.LookupAPI == "" {
		p.Addf("lookup_api", "required: the proxy server's lookup API URL (e.g. http://127.0.0.1:7070)")
	}
	p.Duration(&c.DrainGrace, 30*time.Second, "drain_grace")
	c.Log.Validate(&p)
	return p.Err()
}

// Daemon runs a standalone socks5d.
type Daemon struct {
	cfg DaemonConfig
	srv *Server
	log *slog.Logger
	// Ready, if set, receives the bound address once listening.
	Ready chan<- net.Addr
}

// NewDaemon builds a standalone socks5d reading routes from the lookup API.
func NewDaemon(cfg DaemonConfig, log *slog.Logger) *Daemon {
	return &Daemon{cfg: cfg, log: log, srv: New(cfg.Config, registry.NewAPIClient(cfg.LookupAPI, nil), log)}
}

// Run serves until ctx ends, then drains.
func (d *Daemon) Run(ctx, hard context.Context) error {
	ln, err := net.Listen("tcp", d.cfg.Listen)
	if err != nil {
		return err
	}
	d.log.Info("socks5d started", "listen", ln.Addr().String(), "lookup_api", d.cfg.LookupAPI)
	if d.Ready != nil {
		d.Ready <- ln.Addr()
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = d.srv.Serve(ln) }()
	<-ctx.Done()
	d.srv.Shutdown(hard, d.cfg.DrainGrace)
	<-done
	d.log.Info("stopped")
	return nil
}

// Reload is called on SIGHUP. Nothing is reloadable yet.
func (d *Daemon) Reload() {
	d.log.Info("reload: nothing to reload in this version; configuration unchanged")
}
