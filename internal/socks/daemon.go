package socks

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"reflect"
	"strings"
	"sync/atomic"
	"time"

	"github.com/vpcreach/vpcreach/internal/admin"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/registry"
)

// DaemonConfig is the configuration file of the standalone socks5d.
type DaemonConfig struct {
	Config `yaml:",inline"`
	// LookupAPI is the proxy server's lookup API base URL (in-memory
	// mode), e.g. http://10.0.0.2:7070. Either it or a redis registry.
	LookupAPI string `yaml:"lookup_api"`
	// Registry reads routes from the cluster's Redis (type: redis).
	Registry config.Registry `yaml:"registry"`
	// Cache tunes the route cache in front of the registry.
	Cache CacheConfig `yaml:"cache"`
	// Admin is the admin listener (metrics, /healthz, /readyz); empty: off.
	Admin string `yaml:"admin"`
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
	c.Registry.Validate(&p, "registry", "")
	switch {
	case c.Registry.Type == "memory":
		p.Addf("registry.type", "socks5d has no registry of its own: use redis, or lookup_api for a single proxy server")
	case c.LookupAPI == "" && c.Registry.Type == "":
		p.Addf("lookup_api", "required unless registry.type is redis: the proxy server's lookup API URL (e.g. http://127.0.0.1:7070)")
	case c.LookupAPI != "" && c.Registry.Type != "":
		p.Addf("lookup_api", "set lookup_api or registry, not both")
	}
	c.Cache.Validate(&p)
	if c.Admin != "" {
		if _, _, err := net.SplitHostPort(c.Admin); err != nil {
			p.Addf("admin", "%v", err)
		}
	}
	p.Duration(&c.DrainGrace, 30*time.Second, "drain_grace")
	c.Log.Validate(&p)
	return p.Err()
}

// CacheConfig tunes the route cache (Redis mode).
type CacheConfig struct {
	// Fresh is how long a route is used without asking Redis. Change
	// events from Redis pub/sub update it sooner. Default 5 s.
	Fresh time.Duration `yaml:"fresh"`
	// MaxStale is how much longer a route is served while Redis errors.
	// Default 5 min.
	MaxStale time.Duration `yaml:"max_stale"`
}

// Validate fills defaults.
func (c *CacheConfig) Validate(p *config.Problems) {
	p.Duration(&c.Fresh, 5*time.Second, "cache.fresh")
	p.Duration(&c.MaxStale, 5*time.Minute, "cache.max_stale")
}

// Options returns the registry cache options.
func (c CacheConfig) Options() registry.CacheOptions {
	return registry.CacheOptions{Fresh: c.Fresh, MaxStale: c.MaxStale}
}

// Daemon runs a standalone socks5d.
type Daemon struct {
	cfg   DaemonConfig
	srv   *Server
	log   *slog.Logger
	reg   registry.Registry // nil in lookup API mode
	cache *registry.Cache
	admin *admin.Server
	// Bound, if set, receives the bound address once listening.
	Bound chan<- net.Addr
	ready chan struct{} // closed once listening
	grace atomic.Int64  // drain_grace, which Apply may change
}

// NewDaemon builds a standalone socks5d reading routes from Redis through
// a cache, or from a proxy server's lookup API.
func NewDaemon(cfg DaemonConfig, log *slog.Logger) (*Daemon, error) {
	d := &Daemon{cfg: cfg, log: log, ready: make(chan struct{})}
	d.grace.Store(int64(cfg.DrainGrace))
	var routes registry.Reader
	if cfg.LookupAPI != "" {
		routes = registry.NewAPIClient(cfg.LookupAPI, nil)
	} else {
		reg, err := cfg.Registry.Open(log)
		if err != nil {
			return nil, err
		}
		d.reg = reg
		d.cache = registry.NewCache(reg, cfg.Cache.Options())
		routes = d.cache
	}
	d.srv = New(cfg.Config, routes, log)
	return d, nil
}

// Run serves until ctx ends, then drains.
func (d *Daemon) Run(ctx, hard context.Context) error {
	if d.reg != nil {
		defer d.reg.Close()
	}
	ln, err := net.Listen("tcp", d.cfg.Listen)
	if err != nil {
		return err
	}
	source := d.cfg.LookupAPI
	if d.reg != nil {
		source = "redis " + strings.Join(d.cfg.Registry.Redis.Addrs, ",")
	}
	var stopping atomic.Bool
	if d.cfg.Admin != "" {
		a := admin.New(func() error {
			if stopping.Load() {
				return errors.New("draining")
			}
			return nil
		}, admin.Check{Name: "registry", Run: d.pingRegistry})
		d.srv.RegisterMetrics(a.Reg, "socks5d")
		as, err := admin.Listen(d.cfg.Admin, a.Mux, d.log)
		if err != nil {
			ln.Close()
			return fmt.Errorf("admin listener: %w", err)
		}
		d.admin = as
		defer as.Close()
	}
	d.log.Info("socks5d started", "listen", ln.Addr().String(), "routes", source, "users", len(d.cfg.Users))
	close(d.ready)
	if d.Bound != nil {
		d.Bound <- ln.Addr()
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = d.srv.Serve(ln) }()
	follow := make(chan struct{})
	fctx, stopFollow := context.WithCancel(context.Background())
	go func() {
		defer close(follow)
		if d.cache != nil {
			d.cache.Follow(fctx, d.reg, d.log)
		}
	}()
	<-ctx.Done()
	stopping.Store(true)
	d.srv.Shutdown(hard, time.Duration(d.grace.Load()))
	<-done
	stopFollow()
	<-follow
	d.log.Info("stopped")
	return nil
}

// Ready is closed once the daemon listens (systemd's READY=1).
func (d *Daemon) Ready() <-chan struct{} { return d.ready }

// AdminAddr is the admin listener's address (nil: off or not started).
func (d *Daemon) AdminAddr() net.Addr {
	if d.admin == nil {
		return nil
	}
	return d.admin.Addr()
}

// pingRegistry checks the route source: Redis answers, or the lookup API.
func (d *Daemon) pingRegistry(ctx context.Context) error {
	if p, ok := d.reg.(interface{ Ping(context.Context) error }); ok {
		return p.Ping(ctx)
	}
	return nil
}

// Reload is the SIGHUP fallback of a caller that has no new
// configuration to give (cli.Main calls Apply instead): nothing changes.
func (d *Daemon) Reload() {
	d.log.Info("reload: no new configuration given; configuration unchanged")
}

// Apply takes a reloaded configuration (loaded and validated): users and
// their ACLs, timeouts, network, max_conns_per_source and drain_grace
// change at once, without dropping open connections that the new users
// and ACLs still allow (Server.Apply closes the others). listen,
// lookup_api, registry, cache, admin and log need a restart: a change to
// any of them refuses the whole reload with an error naming them, and
// the running configuration stays.
func (d *Daemon) Apply(cfg *DaemonConfig) error {
	var keys []string
	for _, k := range []struct {
		name string
		same bool
	}{
		{"listen", cfg.Listen == d.cfg.Listen},
		{"lookup_api", cfg.LookupAPI == d.cfg.LookupAPI},
		{"registry", reflect.DeepEqual(cfg.Registry, d.cfg.Registry)},
		{"cache", cfg.Cache == d.cfg.Cache},
		{"admin", cfg.Admin == d.cfg.Admin},
		{"log", cfg.Log == d.cfg.Log},
	} {
		if !k.same {
			keys = append(keys, k.name)
		}
	}
	if len(keys) > 0 {
		return fmt.Errorf("%s changed: %w", strings.Join(keys, ", "), ErrRestartNeeded)
	}
	if err := d.srv.Apply(cfg.Config); err != nil {
		return err
	}
	d.grace.Store(int64(cfg.DrainGrace))
	return nil
}
