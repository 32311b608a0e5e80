package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/vpcreach/vpcreach/registry"
)

// Registry selects the route store of a proxy server or socks5d.
type Registry struct {
	// Type is "memory" (one proxy server; the default of the proxy server)
	// or "redis" (a cluster sharing one Redis).
	Type  string `yaml:"type"`
	Redis Redis  `yaml:"redis"`
}

// Redis configures the Redis registry: one address (standalone), sentinel
// addresses with master_name (Sentinel), or seed addresses with cluster.
type Redis struct {
	Addrs            []string  `yaml:"addrs"`
	MasterName       string    `yaml:"master_name"`
	Cluster          bool      `yaml:"cluster"`
	Username         string    `yaml:"username"`
	Password         Secret    `yaml:"password"`
	SentinelPassword Secret    `yaml:"sentinel_password"`
	DB               int       `yaml:"db"`
	TLS              *TLSFiles `yaml:"tls"`
	// Prefix starts every key (default "vpcreach:").
	Prefix       string        `yaml:"prefix"`
	DialTimeout  time.Duration `yaml:"dial_timeout"`
	ReadTimeout  time.Duration `yaml:"read_timeout"`
	WriteTimeout time.Duration `yaml:"write_timeout"`
	PoolSize     int           `yaml:"pool_size"`
}

// TLSFiles configures a TLS client: the CA that signs the server's
// certificate (system roots if empty), the name to verify, and an optional
// client certificate.
type TLSFiles struct {
	CAFile     string `yaml:"ca_file"`
	CertFile   string `yaml:"cert_file"`
	KeyFile    string `yaml:"key_file"`
	ServerName string `yaml:"server_name"`
}

// Validate checks the registry settings; key is where they sit in the file
// (e.g. "registry") and def the type when none is given ("" leaves it
// empty).
func (r *Registry) Validate(p *Problems, key, def string) {
	if r.Type == "" {
		r.Type = def
	}
	switch r.Type {
	case "", "memory": // "": not configured, the caller decides
	case "redis":
		r.Redis.validate(p, key+".redis")
	default:
		p.Addf(key+".type", "%q is not memory or redis", r.Type)
	}
}

func (c *Redis) validate(p *Problems, key string) {
	switch {
	case len(c.Addrs) == 0:
		p.Addf(key+".addrs", "required: redis address(es) host:port")
	case c.Cluster && c.MasterName != "":
		p.Addf(key, "cluster and master_name exclude each other")
	case !c.Cluster && c.MasterName == "" && len(c.Addrs) > 1:
		p.Addf(key+".addrs", "several addresses need cluster: true or a sentinel master_name")
	}
	for _, a := range c.Addrs {
		if _, _, err := net.SplitHostPort(a); err != nil {
			p.Addf(key+".addrs", "%v", err)
		}
	}
	if c.Cluster && c.DB != 0 {
		p.Addf(key+".db", "redis cluster has only database 0")
	}
	if c.DB < 0 {
		p.Addf(key+".db", "must be >= 0")
	}
	for _, s := range []struct {
		name string
		s    Secret
	}{{"password", c.Password}, {"sentinel_password", c.SentinelPassword}} {
		if s.s.IsSet() {
			if _, err := s.s.ReadAny(); err != nil {
				p.Addf(key+"."+s.name, "%v", err)
			}
		}
	}
	if c.Prefix != "" {
		if err := registry.ValidPrefix(c.Prefix); err != nil {
			p.Addf(key+".prefix", "%v", err)
		}
	}
	p.Duration(&c.DialTimeout, time.Second, key+".dial_timeout")
	p.Duration(&c.ReadTimeout, time.Second, key+".read_timeout")
	p.Duration(&c.WriteTimeout, time.Second, key+".write_timeout")
	if c.PoolSize < 0 {
		p.Addf(key+".pool_size", "must be >= 0")
	}
	if c.TLS != nil {
		if _, err := c.TLS.Config(); err != nil {
			p.Addf(key+".tls", "%v", err)
		}
	}
}

// CertPool reads the PEM certificates in path (the file of config key
// key) into a pool; a file with none is an error.
func CertPool(key, path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s %s: no PEM certificate in it", key, path)
	}
	return pool, nil
}

// Config loads the TLS files.
func (t *TLSFiles) Config() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if t.CAFile != "" {
		pool, err := CertPool("ca_file", t.CAFile)
		if err != nil {
			return nil, err
		}
		cfg.RootCAs = pool
	}
	if (t.CertFile == "") != (t.KeyFile == "") {
		return nil, errors.New("cert_file and key_file go together")
	}
	if t.CertFile != "" {
		c, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, err
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return cfg, nil
}

// Open opens the configured registry. Validate must have passed.
func (r *Registry) Open(log *slog.Logger) (registry.Registry, error) {
	if r.Type != "redis" {
		return registry.NewMemory(nil), nil
	}
	c := r.Redis
	o := registry.RedisOptions{Addrs: c.Addrs, MasterName: c.MasterName, Cluster: c.Cluster,
		Username: c.Username, DB: c.DB, Prefix: c.Prefix, DialTimeout: c.DialTimeout,
		ReadTimeout: c.ReadTimeout, WriteTimeout: c.WriteTimeout, PoolSize: c.PoolSize, Log: log}
	var err error
	if c.Password.IsSet() {
		if o.Password, err = c.Password.ReadAny(); err != nil {
			return nil, fmt.Errorf("registry.redis.password: %w", err)
		}
	}
	if c.SentinelPassword.IsSet() {
		if o.SentinelPassword, err = c.SentinelPassword.ReadAny(); err != nil {
			return nil, fmt.Errorf("registry.redis.sentinel_password: %w", err)
		}
	}
	if c.TLS != nil {
		if o.TLS, err = c.TLS.Config(); err != nil {
			return nil, fmt.Errorf("registry.redis.tls: %w", err)
		}
	}
	return registry.NewRedis(o)
}
