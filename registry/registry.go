// Package registry stores and looks up vpcreach routes: for every target an
// agent exposes, the four-tuple (proxy member IP, proxy port) -> (target IP,
// target port), with the identity, session and generation that own it.
//
// Two backends implement Registry: Memory (one proxy server, the
// zero-dependency default) and Redis (a cluster of proxy servers). Other
// programs use the package as the lookup SDK: a Reader answers "where do I
// connect to reach this target?", from a backend directly or from a proxy
// server's lookup API (NewAPIClient).
//
// Ownership rules (the registry contract):
//   - A route is keyed by (network, target IP, target port).
//   - Register writes a route only if no live route holds the key, or the
//     live one has the same session (a renewal), or an older (generation,
//     session) under the same identity. A newer one makes it fail with
//     ErrStale; another identity's live route with ErrOwned.
//   - Renew is Register for a route the caller already holds; it re-creates
//     a record that vanished (expired, or lost by a restart of the store).
//   - Deregister deletes a key only if its live route has the given session.
//   - Every write carries a lease (TTL); a route not renewed expires.
package registry

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"
)

// Errors. Compare with errors.Is.
var (
	ErrNotFound = errors.New("registry: no route")
	ErrStale    = errors.New("registry: a newer generation owns the route")
	ErrOwned    = errors.New("registry: another identity owns the route")
)

// Key identifies a target: a network name (an address space; empty is the
// default network) and the target's IP and port.
type Key struct {
	Network string         `json:"network,omitempty"`
	Addr    netip.AddrPort `json:"target"`
}

// String encodes the key as "ip:port" in the default network and
// "network/ip:port" otherwise; IPv6 addresses are in brackets.
func (k Key) String() string {
	if k.Network == "" {
		return k.Addr.String()
	}
	return k.Network + "/" + k.Addr.String()
}

// ParseKey parses the String form of a key.
func ParseKey(s string) (Key, error) {
	var k Key
	if i := strings.LastIndexByte(s, '/'); i >= 0 {
		k.Network, s = s[:i], s[i+1:]
		if err := ValidNetwork(k.Network); err != nil {
			return k, err
		}
	}
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return k, fmt.Errorf("registry: bad target %q: want ip:port", s)
	}
	k.Addr = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	return k, nil
}

// ValidNetwork checks a network name: 1-32 bytes of [a-zA-Z0-9._-].
func ValidNetwork(n string) error {
	if n == "" || len(n) > 32 {
		return fmt.Errorf("registry: network name %q must be 1-32 bytes", n)
	}
	for _, c := range n {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("registry: network name %q: only letters, digits, '.', '_' and '-'", n)
		}
	}
	return nil
}

// Route is one registered four-tuple and who owns it.
type Route struct {
	Key
	// Proxy is the member address and port that forwards to the target.
	Proxy netip.AddrPort `json:"proxy"`
	// Relay is the member's relay port, used by socks5d.
	Relay      netip.AddrPort `json:"relay"`
	Agent      string         `json:"agent"`
	Identity   string         `json:"identity"`
	Server     string         `json:"server"`
	Session    string         `json:"session"`
	Generation uint64         `json:"generation"`
	Registered time.Time      `json:"registered"`
}

// Newer reports whether r outranks o: a higher generation, the session id
// breaking ties.
func (r *Route) Newer(o *Route) bool {
	if r.Generation != o.Generation {
		return r.Generation > o.Generation
	}
	return r.Session > o.Session
}

// Reader looks routes up. It is the SDK surface for other programs.
type Reader interface {
	// Lookup returns the live route of a key, or ErrNotFound.
	Lookup(ctx context.Context, k Key) (Route, error)
	// List returns every live route, in no particular order.
	List(ctx context.Context) ([]Route, error)
}

// EventType says what happened to a key.
type EventType int

const (
	EventPut EventType = iota + 1
	EventDelete
	// EventReset says events may have been lost (the watcher's connection
	// to the store was re-established): treat every cached route as
	// unverified. Key and Route are empty.
	EventReset
)

// Event announces a change. Events are hints for caches: a watcher may
// miss some, so a cache keeps a TTL as well.
type Event struct {
	Type  EventType
	Key   Key
	Route Route // for EventPut
}

// Registry is a route store.
type Registry interface {
	Reader
	// Register writes r with a lease of ttl, following the ownership rules.
	Register(ctx context.Context, r Route, ttl time.Duration) error
	// Renew extends the lease of a route the caller holds, re-creating
	// it if it vanished; ErrStale or ErrOwned if someone else took it.
	Renew(ctx context.Context, r Route, ttl time.Duration) error
	// Deregister deletes k if its live route has session; it is not an
	// error if it does not.
	Deregister(ctx context.Context, k Key, session string) error
	// Watch streams change events until ctx ends; the channel is closed then.
	Watch(ctx context.Context) (<-chan Event, error)
	// Close releases the backend.
	Close() error
}
