package registry

import (
	"context"
	"sync"
	"time"
)

// Memory is the in-memory registry of a single proxy server (the default).
// Leases expire on its clock; it is safe for concurrent use.
type Memory struct {
	now func() time.Time

	mu       sync.Mutex
	routes   map[Key]memEntry
	watchers map[chan Event]struct{}
}

type memEntry struct {
	route   Route
	expires time.Time
}

// NewMemory returns an empty registry. now is its clock (nil: time.Now).
func NewMemory(now func() time.Time) *Memory {
	if now == nil {
		now = time.Now
	}
	return &Memory{now: now, routes: map[Key]memEntry{}, watchers: map[chan Event]struct{}{}}
}

// live returns the unexpired entry of k. Called with mu held.
func (m *Memory) live(k Key) (memEntry, bool) {
	e, ok := m.routes[k]
	if ok && !m.now().Before(e.expires) {
		delete(m.routes, k)
		return e, false
	}
	return e, ok
}

func (m *Memory) Lookup(_ context.Context, k Key) (Route, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.live(k)
	if !ok {
		return Route{}, ErrNotFound
	}
	return e.route, nil
}

func (m *Memory) List(_ context.Context) ([]Route, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Route, 0, len(m.routes))
	for k := range m.routes {
		if e, ok := m.live(k); ok {
			out = append(out, e.route)
		}
	}
	return out, nil
}

func (m *Memory) Register(_ context.Context, r Route, ttl time.Duration) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if cur, ok := m.live(r.Key); ok && cur.route.Session != r.Session {
		if err := Admit(&cur.route, &r); err != nil {
			return err
		}
	}
	if r.Registered.IsZero() {
		r.Registered = m.now()
	}
	m.routes[r.Key] = memEntry{route: r, expires: m.now().Add(ttl)}
	m.notify(Event{Type: EventPut, Key: r.Key, Route: r})
	return nil
}

// Admit applies the ownership rules to a new route r against the live
// route cur of the same key held by another session.
func Admit(cur, r *Route) error {
	if cur.Identity != r.Identity {
		return ErrOwned
	}
	if !r.Newer(cur) {
		return ErrStale
	}
	return nil
}

func (m *Memory) Renew(ctx context.Context, r Route, ttl time.Duration) error {
	return m.Register(ctx, r, ttl)
}

func (m *Memory) Deregister(_ context.Context, k Key, session string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if cur, ok := m.live(k); ok && cur.route.Session == session {
		delete(m.routes, k)
		m.notify(Event{Type: EventDelete, Key: k})
	}
	return nil
}

// notify sends ev to every watcher that has room. Called with mu held.
func (m *Memory) notify(ev Event) {
	for ch := range m.watchers {
		select {
		case ch <- ev:
		default: // a slow watcher misses an event; its cache TTL covers it
		}
	}
}

func (m *Memory) Watch(ctx context.Context) (<-chan Event, error) {
	ch := make(chan Event, 256)
	m.mu.Lock()
	m.watchers[ch] = struct{}{}
	m.mu.Unlock()
	go func() {
		<-ctx.Done()
		m.mu.Lock()
		delete(m.watchers, ch)
		m.mu.Unlock()
		close(ch)
	}()
	return ch, nil
}

// Close is a no-op: the memory registry holds no outside resources.
func (m *Memory) Close() error { return nil }
