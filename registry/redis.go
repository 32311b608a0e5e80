package registry

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Redis key format (documented in README.md; any Redis client can read it):
//
//	<prefix>route:{<key>}   a hash, one per target, with a lease (PEXPIRE)
//	<prefix>events          the pub/sub channel of change events
//
// <key> is Key.String(): "10.1.0.5:6379", "vpc-a/10.1.0.5:6379" or
// "[2001:db8::5]:443". The braces are the Redis Cluster hash tag: each
// route key is alone in its slot, so no script ever touches two slots, and
// listing walks every master. Hash fields: network, target, proxy, relay,
// agent, identity, server, session, generation (decimal uint64) and
// registered (RFC 3339 with nanoseconds, UTC).
const (
	// DefaultPrefix is the key prefix unless configured otherwise.
	DefaultPrefix = "vpcreach:"
	routeInfix    = "route:{"
	eventsSuffix  = "events"
)

// RedisOptions configures a Redis registry. Exactly one topology:
// standalone (one address), Sentinel (MasterName and sentinel addresses)
// or Cluster (Cluster set, seed addresses).
type RedisOptions struct {
	Addrs      []string
	MasterName string
	Cluster    bool
	Username   string
	Password   string
	// SentinelPassword authenticates to the sentinels, when they need it.
	SentinelPassword string
	DB               int
	TLS              *tls.Config
	// Prefix starts every key; DefaultPrefix if empty. Letters, digits
	// and ":._-/" only, so it is safe in a SCAN pattern and a hash tag.
	Prefix string
	// DialTimeout, ReadTimeout and WriteTimeout bound each operation; a
	// down Redis must fail fast so callers fall back (serve locally,
	// serve stale). Defaults 1 s, 1 s, 1 s.
	DialTimeout  time.Duration
	ReadTimeout  time.Duration
	WriteTimeout time.Duration
	PoolSize     int
	// Log receives go-redis's own log lines (reconnects and the like).
	// It is process-wide: the last registry opened with one sets it.
	Log *slog.Logger
}

// Redis is the registry backend shared by a cluster of proxy servers.
type Redis struct {
	c        redis.UniversalClient
	prefix   string
	channel  string
	ownsConn bool
}

// ValidPrefix checks a key prefix.
func ValidPrefix(p string) error {
	if len(p) > 64 {
		return fmt.Errorf("registry: key prefix %q longer than 64 bytes", p)
	}
	for _, c := range p {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune(":._-/", c)) {
			return fmt.Errorf("registry: key prefix %q: only letters, digits and \":._-/\"", p)
		}
	}
	return nil
}

// NewRedis connects a Redis registry. It does not wait for Redis: a server
// must start (and serve its agents locally) while Redis is down.
func NewRedis(o RedisOptions) (*Redis, error) {
	if len(o.Addrs) == 0 {
		return nil, errors.New("registry: redis needs at least one address")
	}
	if o.Cluster && o.MasterName != "" {
		return nil, errors.New("registry: redis is either a cluster or a sentinel master, not both")
	}
	if !o.Cluster && o.MasterName == "" && len(o.Addrs) > 1 {
		return nil, errors.New("registry: several redis addresses need cluster or a sentinel master name")
	}
	if o.Cluster && o.DB != 0 {
		return nil, errors.New("registry: redis cluster has only database 0")
	}
	def := func(d *time.Duration) {
		if *d == 0 {
			*d = time.Second
		}
	}
	def(&o.DialTimeout)
	def(&o.ReadTimeout)
	def(&o.WriteTimeout)
	if o.Log != nil {
		redis.SetLogger(redisLog{o.Log.With("part", "redis")})
	}
	c := redis.NewUniversalClient(&redis.UniversalOptions{
		Addrs:                 o.Addrs,
		MasterName:            o.MasterName,
		IsClusterMode:         o.Cluster,
		Username:              o.Username,
		Password:              o.Password,
		SentinelPassword:      o.SentinelPassword,
		DB:                    o.DB,
		TLSConfig:             o.TLS,
		DialTimeout:           o.DialTimeout,
		ReadTimeout:           o.ReadTimeout,
		WriteTimeout:          o.WriteTimeout,
		ContextTimeoutEnabled: true,
		PoolSize:              o.PoolSize,
		// One retry: callers have their own loops (renewal, cache) and
		// must learn quickly that Redis is gone.
		MaxRetries: 1,
	})
	r, err := NewRedisClient(c, o.Prefix)
	if err != nil {
		c.Close()
		return nil, err
	}
	r.ownsConn = true
	return r, nil
}

// NewRedisClient uses an existing client (the caller keeps owning it:
// Close does not close it). prefix "" means DefaultPrefix.
func NewRedisClient(c redis.UniversalClient, prefix string) (*Redis, error) {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	if err := ValidPrefix(prefix); err != nil {
		return nil, err
	}
	return &Redis{c: c, prefix: prefix, channel: prefix + eventsSuffix}, nil
}

// KeyName is the Redis key of a route.
func (r *Redis) KeyName(k Key) string { return r.prefix + routeInfix + k.String() + "}" }

// Channel is the pub/sub channel of change events.
func (r *Redis) Channel() string { return r.channel }

// Ping checks that Redis answers (all masters of a cluster).
func (r *Redis) Ping(ctx context.Context) error {
	if cc, ok := r.c.(*redis.ClusterClient); ok {
		return cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return c.Ping(ctx).Err() })
	}
	return r.c.Ping(ctx).Err()
}

// Close closes the client if NewRedis made it.
func (r *Redis) Close() error {
	if r.ownsConn {
		return r.c.Close()
	}
	return nil
}

// registerScript writes a route if the ownership rules admit it.
// KEYS[1] route key. ARGV: ttl ms, channel, event, identity, session,
// generation, proxy, relay, then the hash's field/value pairs.
// Generations are decimal strings (uint64 does not fit Lua's doubles) and
// sessions compare byte by byte, as Route.Newer does in Go.
var registerScript = redis.NewScript(`
local function less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local cur = redis.call('HMGET', KEYS[1], 'identity', 'generation', 'session', 'proxy', 'relay')
local changed = true
if cur[3] then
  if cur[3] == ARGV[5] then
    changed = cur[4] ~= ARGV[7] or cur[5] ~= ARGV[8]
  else
    if cur[1] ~= ARGV[4] then return 'owned' end
    local g, cg = ARGV[6], cur[2] or ''
    local newer
    if #g ~= #cg then newer = #g > #cg
    elseif g ~= cg then newer = less(cg, g)
    else newer = less(cur[3], ARGV[5]) end
    if not newer then return 'stale' end
    redis.call('DEL', KEYS[1])
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if changed then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 'ok'
`)

// deregisterScript deletes a route if it is still the given session's.
// KEYS[1] route key. ARGV: session, channel, event.
var deregisterScript = redis.NewScript(`
if redis.call('HGET', KEYS[1], 'session') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
`)

// wireEvent is the JSON of a pub/sub message.
type wireEvent struct {
	Type  string `json:"type"` // "put" or "delete"
	Key   string `json:"key"`
	Route *Route `json:"route,omitempty"`
}

func (r *Redis) Register(ctx context.Context, rt Route, ttl time.Duration) error {
	if ttl < time.Millisecond {
		return fmt.Errorf("registry: lease %v shorter than 1 ms", ttl)
	}
	if rt.Registered.IsZero() {
		rt.Registered = time.Now()
	}
	rt.Registered = rt.Registered.UTC()
	ev, err := json.Marshal(wireEvent{Type: "put", Key: rt.Key.String(), Route: &rt})
	if err != nil {
		return err
	}
	gen := strconv.FormatUint(rt.Generation, 10)
	proxy, relay := apString(rt.Proxy), apString(rt.Relay)
	args := []any{ttl.Milliseconds(), r.channel, ev, rt.Identity, rt.Session, gen, proxy, relay,
		"network", rt.Network, "target", rt.Addr.String(), "proxy", proxy, "relay", relay,
		"agent", rt.Agent, "identity", rt.Identity, "server", rt.Server, "session", rt.Session,
		"generation", gen, "registered", rt.Registered.Format(time.RFC3339Nano)}
	res, err := registerScript.Run(ctx, r.c, []string{r.KeyName(rt.Key)}, args...).Text()
	if err != nil {
		return fmt.Errorf("registry: redis register %v: %w", rt.Key, err)
	}
	switch res {
	case "ok":
		return nil
	case "owned":
		return ErrOwned
	case "stale":
		return ErrStale
	}
	return fmt.Errorf("registry: redis register %v: unexpected reply %q", rt.Key, res)
}

// Renew is Register: the script extends a lease held by the same session
// and re-creates a record that vanished.
func (r *Redis) Renew(ctx context.Context, rt Route, ttl time.Duration) error {
	return r.Register(ctx, rt, ttl)
}

func (r *Redis) Deregister(ctx context.Context, k Key, session string) error {
	ev, err := json.Marshal(wireEvent{Type: "delete", Key: k.String()})
	if err != nil {
		return err
	}
	if err := deregisterScript.Run(ctx, r.c, []string{r.KeyName(k)}, session, r.channel, ev).Err(); err != nil {
		return fmt.Errorf("registry: redis deregister %v: %w", k, err)
	}
	return nil
}

func (r *Redis) Lookup(ctx context.Context, k Key) (Route, error) {
	name := r.KeyName(k)
	m, err := r.c.HGetAll(ctx, name).Result()
	if err != nil {
		return Route{}, fmt.Errorf("registry: redis lookup %v: %w", k, err)
	}
	if len(m) == 0 {
		return Route{}, ErrNotFound
	}
	return parseRecord(name, m)
}

func (r *Redis) List(ctx context.Context) ([]Route, error) {
	var (
		mu  sync.Mutex
		out []Route
	)
	walk := func(ctx context.Context, c redis.Cmdable) error {
		rs, err := r.listNode(ctx, c)
		mu.Lock()
		out = append(out, rs...)
		mu.Unlock()
		return err
	}
	var err error
	if cc, ok := r.c.(*redis.ClusterClient); ok {
		err = cc.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error { return walk(ctx, c) })
	} else {
		err = walk(ctx, r.c)
	}
	if err != nil {
		return nil, fmt.Errorf("registry: redis list: %w", err)
	}
	return out, nil
}

// listNode lists the routes on one node: SCAN for the keys, then their
// hashes in one pipeline. A key that expired in between is skipped.
func (r *Redis) listNode(ctx context.Context, c redis.Cmdable) ([]Route, error) {
	var out []Route
	match := r.prefix + routeInfix + "*"
	var cursor uint64
	for {
		keys, next, err := c.Scan(ctx, cursor, match, 512).Result()
		if err != nil {
			return out, err
		}
		if len(keys) > 0 {
			cmds, err := c.Pipelined(ctx, func(p redis.Pipeliner) error {
				for _, k := range keys {
					p.HGetAll(ctx, k)
				}
				return nil
			})
			if err != nil {
				return out, err
			}
			for i, cmd := range cmds {
				m, _ := cmd.(*redis.MapStringStringCmd).Result()
				if len(m) == 0 {
					continue
				}
				rt, err := parseRecord(keys[i], m)
				if err != nil {
					return out, err
				}
				out = append(out, rt)
			}
		}
		if cursor = next; cursor == 0 {
			return out, nil
		}
	}
}

// Watch subscribes to the events channel. go-redis re-subscribes after a
// lost connection; events published meanwhile are lost, so a resubscription
// is passed on as EventReset and caches treat what they hold as unverified.
func (r *Redis) Watch(ctx context.Context) (<-chan Event, error) {
	ps := r.c.Subscribe(ctx, r.channel)
	if _, err := ps.Receive(ctx); err != nil {
		ps.Close()
		return nil, fmt.Errorf("registry: redis subscribe: %w", err)
	}
	in := ps.ChannelWithSubscriptions(redis.WithChannelHealthCheckInterval(5*time.Second),
		redis.WithChannelSize(256))
	out := make(chan Event, 256)
	go func() {
		defer close(out)
		defer ps.Close()
		for {
			var m any
			var ok bool
			select {
			case <-ctx.Done():
				return
			case m, ok = <-in:
				if !ok {
					return
				}
			}
			var ev Event
			switch m := m.(type) {
			case *redis.Subscription:
				ev.Type = EventReset
			case *redis.Message:
				if ev, ok = decodeEvent(m.Payload); !ok {
					continue
				}
			default:
				continue
			}
			select {
			case out <- ev:
			case <-ctx.Done():
				return
			}
		}
	}()
	return out, nil
}

func decodeEvent(payload string) (Event, bool) {
	var w wireEvent
	if json.Unmarshal([]byte(payload), &w) != nil {
		return Event{}, false
	}
	k, err := ParseKey(w.Key)
	if err != nil {
		return Event{}, false
	}
	switch {
	case w.Type == "put" && w.Route != nil && w.Route.Key == k:
		return Event{Type: EventPut, Key: k, Route: *w.Route}, true
	case w.Type == "delete":
		return Event{Type: EventDelete, Key: k}, true
	}
	return Event{}, false
}

// parseRecord decodes a route hash; name is its key, for errors.
func parseRecord(name string, m map[string]string) (Route, error) {
	bad := func(field string, err error) (Route, error) {
		return Route{}, fmt.Errorf("registry: bad record %s: field %s: %v", name, field, err)
	}
	var rt Route
	var err error
	if rt.Key, err = ParseKey(m["target"]); err != nil {
		return bad("target", err)
	}
	if rt.Network = m["network"]; rt.Network != "" {
		if err := ValidNetwork(rt.Network); err != nil {
			return bad("network", err)
		}
	}
	if rt.Proxy, err = parseAP(m["proxy"]); err != nil {
		return bad("proxy", err)
	}
	if rt.Relay, err = parseAP(m["relay"]); err != nil {
		return bad("relay", err)
	}
	if rt.Generation, err = strconv.ParseUint(m["generation"], 10, 64); err != nil {
		return bad("generation", err)
	}
	if rt.Registered, err = time.Parse(time.RFC3339Nano, m["registered"]); err != nil {
		return bad("registered", err)
	}
	rt.Agent, rt.Identity, rt.Server, rt.Session = m["agent"], m["identity"], m["server"], m["session"]
	if rt.Session == "" {
		return bad("session", errors.New("empty"))
	}
	return rt, nil
}

// apString encodes an optional address: "" when unset.
func apString(ap netip.AddrPort) string {
	if !ap.IsValid() {
		return ""
	}
	return ap.String()
}

func parseAP(s string) (netip.AddrPort, error) {
	if s == "" {
		return netip.AddrPort{}, nil
	}
	return netip.ParseAddrPort(s)
}

// redisLog sends go-redis's log lines to slog.
type redisLog struct{ l *slog.Logger }

func (l redisLog) Printf(ctx context.Context, format string, v ...any) {
	l.l.Warn(fmt.Sprintf(format, v...))
}
