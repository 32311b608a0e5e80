package registry

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// CacheOptions configures a Cache.
type CacheOptions struct {
	// Fresh is how long a looked-up route is used without asking the
	// store again. Default 5 s.
	Fresh time.Duration
	// MaxStale is how much longer a route may be served while the store
	// errors (Redis down). Default 5 min.
	MaxStale time.Duration
	// Now is the clock (nil: time.Now).
	Now func() time.Time
}

// CacheStats counts what a Cache did.
type CacheStats struct {
	Hits, Misses, Stale, Errors atomic.Int64
}

// Cache is a read-through route cache: the lookup path of socks5d and of
// SDK users that look up often. A route is served from memory while fresh;
// after that the store is asked again, and if the store errors the cached
// route is served stale up to MaxStale. Change events (Run) update entries
// as they happen; they are hints, the fresh TTL is the backstop. A missing
// route is not cached.
type Cache struct {
	src      Reader
	fresh    time.Duration
	maxStale time.Duration
	now      func() time.Time
	Stats    CacheStats

	mu      sync.Mutex
	entries map[Key]*cacheEntry
	seq     uint64    // bumped by every event
	swept   time.Time // last sweep of entries too old to serve
}

type cacheEntry struct {
	route Route
	at    time.Time // when the store (or an event) last confirmed it
	seq   uint64    // the event that wrote it; 0 for a lookup
	// unverified entries were confirmed before a possible gap in events:
	// they are re-checked at the next lookup but may still serve stale.
	unverified bool
	// deleted marks a tombstone: a delete event, kept so that a lookup in
	// flight across it does not bring the route back.
	deleted bool
}

// NewCache returns a cache in front of src.
func NewCache(src Reader, o CacheOptions) *Cache {
	if o.Fresh <= 0 {
		o.Fresh = 5 * time.Second
	}
	if o.MaxStale < 0 {
		o.MaxStale = 0
	} else if o.MaxStale == 0 {
		o.MaxStale = 5 * time.Minute
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Cache{src: src, fresh: o.Fresh, maxStale: o.MaxStale, now: o.Now, entries: map[Key]*cacheEntry{}}
}

// Lookup returns k's route from the cache or the store.
func (c *Cache) Lookup(ctx context.Context, k Key) (Route, error) {
	now := c.now()
	c.mu.Lock()
	e := c.entries[k]
	var cached *cacheEntry
	if e != nil && !e.deleted {
		cp := *e
		cached = &cp
	}
	seq := c.seq
	c.mu.Unlock()
	if cached != nil && !cached.unverified && now.Sub(cached.at) < c.fresh {
		c.Stats.Hits.Add(1)
		return cached.route, nil
	}
	c.Stats.Misses.Add(1)
	r, err := c.src.Lookup(ctx, k)
	switch {
	case err == nil:
		c.store(k, r, seq)
		return r, nil
	case errors.Is(err, ErrNotFound):
		c.drop(k, seq)
		return Route{}, err
	}
	c.Stats.Errors.Add(1)
	if cached != nil && now.Sub(cached.at) < c.fresh+c.maxStale {
		c.Stats.Stale.Add(1)
		return cached.route, nil
	}
	return Route{}, err
}

// store caches a looked-up route unless an event about k arrived while the
// lookup was in flight (the event is newer than what the lookup read).
func (c *Cache) store(k Key, r Route, seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[k]; e != nil && e.seq > seq {
		return
	}
	c.entries[k] = &cacheEntry{route: r, at: c.now()}
	c.sweep()
}

func (c *Cache) drop(k Key, seq uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[k]; e != nil && e.seq <= seq {
		delete(c.entries, k)
	}
}

// Invalidate drops k's cached route if it is still r: a connect through r
// failed, so the next Lookup asks the store.
func (c *Cache) Invalidate(k Key, r Route) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e := c.entries[k]; e != nil && !e.deleted && e.route == r {
		delete(c.entries, k)
	}
}

// List asks the store; listing is not cached.
func (c *Cache) List(ctx context.Context) ([]Route, error) { return c.src.List(ctx) }

// Len is the number of cached routes.
func (c *Cache) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, e := range c.entries {
		if !e.deleted {
			n++
		}
	}
	return n
}

// Apply applies one change event.
func (c *Cache) Apply(ev Event) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq++
	defer c.sweep()
	switch ev.Type {
	case EventPut:
		c.entries[ev.Key] = &cacheEntry{route: ev.Route, at: c.now(), seq: c.seq}
	case EventDelete:
		c.entries[ev.Key] = &cacheEntry{at: c.now(), seq: c.seq, deleted: true}
	case EventReset:
		for _, e := range c.entries {
			e.unverified = true
		}
	}
}

// sweep drops entries too old to serve even stale and old tombstones, at
// most once per fresh+max-stale. Called with mu held, whenever an entry is
// written: nothing grows without a sweep coming due.
func (c *Cache) sweep() {
	now := c.now()
	if now.Sub(c.swept) < c.fresh+c.maxStale {
		return
	}
	c.swept = now
	for k, e := range c.entries {
		if now.Sub(e.at) >= c.fresh+c.maxStale || e.deleted && now.Sub(e.at) >= c.fresh {
			delete(c.entries, k)
		}
	}
}

// Watcher is the event source of a cache (Registry has it).
type Watcher interface {
	Watch(ctx context.Context) (<-chan Event, error)
}

// Follow keeps the cache up to date with w's events until ctx ends (see
// the package function Follow).
func (c *Cache) Follow(ctx context.Context, w Watcher, log *slog.Logger) {
	Follow(ctx, w, log, c.Apply)
}

// Follow passes w's events to apply until ctx ends. It subscribes, and
// subscribes again with a backoff (250 ms doubling to 5 s) while the
// store is down or when a subscription ends. Every subscription starts
// with EventReset: what was learnt across the gap must be re-checked.
func Follow(ctx context.Context, w Watcher, log *slog.Logger, apply func(Event)) {
	backoff := 250 * time.Millisecond
	for ctx.Err() == nil {
		ch, err := w.Watch(ctx)
		if err != nil {
			log.Warn("registry events unavailable; retrying", "err", err, "retry_in", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		backoff = 250 * time.Millisecond
		apply(Event{Type: EventReset})
		for ev := range ch {
			apply(ev)
		}
	}
}
