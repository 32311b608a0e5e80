package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/registry"
)

// errUsage marks source errors that are the caller's flags' fault.
var errUsage = errors.New("usage")

type usageError struct{ msg string }

func (e usageError) Error() string   { return e.msg }
func (e usageError) Is(t error) bool { return t == errUsage }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

// source is where routes and agents come from: a proxy server's lookup
// API, Redis, or both (routes from Redis, agents from the API).
type source struct {
	routes     registry.Reader
	routesFrom string     // for messages: "api http://..." or "redis ..."
	api        *apiSource // nil without an API
	redis      *registry.Redis
}

// Close releases the Redis client and idle HTTP connections.
func (s *source) Close() error {
	if s.api != nil {
		s.api.transport.CloseIdleConnections()
	}
	if s.redis != nil {
		return s.redis.Close()
	}
	return nil
}

// apiSource reads a proxy server's lookup API.
type apiSource struct {
	base      string
	transport *http.Transport
	client    *http.Client
	*registry.APIClient
}

func newAPISource(raw string, o options) (*apiSource, error) {
	base, err := apiURL(raw)
	if err != nil {
		return nil, err
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	hc := &http.Client{Transport: tr, Timeout: o.timeout}
	return &apiSource{base: base, transport: tr, client: hc, APIClient: registry.NewAPIClient(base, hc)}, nil
}

// apiURL normalises an admin listener address: a scheme is added when
// missing ("127.0.0.1:7070" works), a trailing slash dropped.
func apiURL(raw string) (string, error) {
	s := strings.TrimRight(strings.TrimSpace(raw), "/")
	if !strings.Contains(s, "://") {
		s = "http://" + s
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", usagef("-api %q: want a URL such as http://127.0.0.1:7070", raw)
	}
	return s, nil
}

// agents asks GET /v1/agents: the live sessions of that member.
func (a *apiSource) agents(ctx context.Context) ([]server.AgentInfo, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, a.base+"/v1/agents", nil)
	if err != nil {
		return nil, err
	}
	resp, err := a.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s/v1/agents: %s (is this a proxyserver's admin listener?)", a.base, resp.Status)
	}
	var out []server.AgentInfo
	if err := json.Unmarshal(body, &out); err != nil {
		return nil, fmt.Errorf("GET %s/v1/agents: %w", a.base, err)
	}
	return out, nil
}

// openSource builds the source from -api, -redis and -config.
func openSource(o options) (*source, error) {
	if o.redis == "" && (o.redisMaster != "" || o.redisCluster) {
		return nil, usagef("-redis-master and -redis-cluster need -redis")
	}
	apiAddr, redisFlags := o.api, o.redis != ""
	var fileReg *config.Registry
	if o.config != "" {
		fc, err := loadFileConfig(o.config)
		if err != nil {
			return nil, err
		}
		if apiAddr == "" {
			apiAddr = fc.api
		}
		if !redisFlags && fc.registry.Type == "redis" {
			fileReg = &fc.registry
		}
		if apiAddr == "" && !redisFlags && fileReg == nil {
			return nil, fmt.Errorf("%s: nothing to read: no admin (proxyserver), lookup_api (socks5d) or redis registry in it", o.config)
		}
	}
	if apiAddr == "" && !redisFlags && fileReg == nil {
		return nil, usagef("no source: give -api URL, -redis host:port or -config PATH")
	}

	s := &source{}
	if apiAddr != "" {
		a, err := newAPISource(apiAddr, o)
		if err != nil {
			return nil, err
		}
		s.api = a
		s.routes, s.routesFrom = a, "api "+a.base
	}
	switch {
	case redisFlags:
		r, err := openRedisFlags(o)
		if err != nil {
			s.Close()
			return nil, err
		}
		s.redis = r
		s.routesFrom = fmt.Sprintf("redis %s (prefix %s)", o.redis, o.redisPrefix)
	case fileReg != nil:
		reg, err := fileReg.Open(nil)
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("%s: %w", o.config, err)
		}
		s.redis = reg.(*registry.Redis)
		prefix := fileReg.Redis.Prefix
		if prefix == "" {
			prefix = registry.DefaultPrefix
		}
		s.routesFrom = fmt.Sprintf("redis %s (prefix %s, from %s)", strings.Join(fileReg.Redis.Addrs, ","), prefix, o.config)
	}
	if s.redis != nil {
		s.routes = s.redis
	}
	return s, nil
}

func openRedisFlags(o options) (*registry.Redis, error) {
	if o.redisCluster && o.redisMaster != "" {
		return nil, usagef("-redis-cluster and -redis-master exclude each other")
	}
	var addrs []string
	for _, a := range strings.Split(o.redis, ",") {
		a = strings.TrimSpace(a)
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, usagef("-redis %q: %v", a, err)
		}
		addrs = append(addrs, a)
	}
	if len(addrs) > 1 && !o.redisCluster && o.redisMaster == "" {
		return nil, usagef("-redis: several addresses need -redis-cluster or -redis-master NAME")
	}
	if err := registry.ValidPrefix(o.redisPrefix); err != nil {
		return nil, usagef("-redis-prefix: %v", err)
	}
	ro := registry.RedisOptions{Addrs: addrs, MasterName: o.redisMaster, Cluster: o.redisCluster,
		Prefix: o.redisPrefix, Password: os.Getenv(EnvRedisPassword),
		SentinelPassword: os.Getenv(EnvRedisSentinelPassword),
		DialTimeout:      o.timeout, ReadTimeout: o.timeout, WriteTimeout: o.timeout}
	return registry.NewRedis(ro)
}

// fileConfig is what vpcreachctl takes from a proxyserver or socks5d
// file. Decoding is lenient (the binaries' own loaders are strict): the
// rest of the file is not ours to judge.
type fileConfig struct {
	api      string
	registry config.Registry
}

func loadFileConfig(path string) (fileConfig, error) {
	var raw struct {
		Admin     string          `yaml:"admin"`
		API       string          `yaml:"api"`
		LookupAPI string          `yaml:"lookup_api"`
		Registry  config.Registry `yaml:"registry"`
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return fileConfig{}, err
	}
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return fileConfig{}, fmt.Errorf("%s: %w", path, err)
	}
	var p config.Problems
	raw.Registry.Validate(&p, "registry", "")
	if err := p.Err(); err != nil {
		return fileConfig{}, fmt.Errorf("%s: %w", path, err)
	}
	fc := fileConfig{registry: raw.Registry}
	switch {
	case raw.LookupAPI != "":
		fc.api = raw.LookupAPI
	case raw.Admin != "":
		fc.api = adminURL(raw.Admin)
	case raw.API != "":
		fc.api = adminURL(raw.API)
	}
	return fc, nil
}

// adminURL turns a listen address into a URL to reach it from this host:
// a wildcard host becomes loopback.
func adminURL(listen string) string {
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "http://" + listen // apiURL reports it
	}
	if a, err := netip.ParseAddr(host); host == "" || err == nil && a.IsUnspecified() {
		host = "127.0.0.1"
		if err == nil && a.Is6() {
			host = "::1"
		}
	}
	return "http://" + net.JoinHostPort(host, port)
}
