package statuspage

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"
	"unicode/utf8"
)

// Bounds on what one kept record may hold, so that a noisy or hostile
// input (a long error text, a record with many attributes) cannot make
// the ring large: at most DefaultRecent x (maxMsg + maxAttrs x maxValue)
// bytes, about 1 MiB.
const (
	DefaultRecent = 50   // records kept when NewRecent is given n <= 0
	maxMsg        = 1024 // bytes of a message
	maxAttrs      = 32   // attributes of a record
	maxValue      = 512  // bytes of an attribute's key or value
)

// Record is one kept log record, as the status page shows it.
type Record struct {
	Time    time.Time `json:"time"`
	Level   string    `json:"level"`
	Message string    `json:"msg"`
	Attrs   []Attr    `json:"attrs"`
}

// Attr is one attribute of a Record: group-qualified key ("a.b") and the
// value as text.
type Attr struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// ring is the store that a Recent and every handler derived from it
// (WithAttrs, WithGroup) share.
type ring struct {
	mu    sync.Mutex
	buf   []Record // len <= cap(buf); next is the slot to write
	next  int
	total int64 // records seen, kept or since overwritten
}

// Recent is an slog.Handler that keeps the last N records at Warn or
// above in memory for the status page, and passes every record on to the
// handler it wraps. Records below the wrapped handler's level are not
// passed on, but warnings and errors are kept even when the wrapped
// handler drops them.
//
// Wrap the process's handler once, at start-up, and build the logger
// from it: loggers derived with With or WithGroup share its records.
type Recent struct {
	next   slog.Handler // nil: discard
	ring   *ring
	attrs  []Attr // from WithAttrs, group-qualified
	groups string // open groups, "a.b." or ""
}

// NewRecent returns a handler that keeps the last n (DefaultRecent if n
// <= 0) warnings and errors and passes every record to next (nil: keep
// only).
func NewRecent(next slog.Handler, n int) *Recent {
	if n <= 0 {
		n = DefaultRecent
	}
	return &Recent{next: next, ring: &ring{buf: make([]Record, 0, n)}}
}

// RecentOf returns the Recent that log's handler is, or nil: the way a
// component finds the records of the logger it was given.
func RecentOf(log *slog.Logger) *Recent {
	if log == nil {
		return nil
	}
	r, _ := log.Handler().(*Recent)
	return r
}

// Enabled reports whether the wrapped handler wants level, or level is
// one that is kept.
func (r *Recent) Enabled(ctx context.Context, level slog.Level) bool {
	return level >= slog.LevelWarn || r.next != nil && r.next.Enabled(ctx, level)
}

// Handle keeps rec if it is a warning or an error, then passes it on if
// the wrapped handler wants its level.
func (r *Recent) Handle(ctx context.Context, rec slog.Record) error {
	if rec.Level >= slog.LevelWarn {
		r.keep(rec)
	}
	if r.next != nil && r.next.Enabled(ctx, rec.Level) {
		return r.next.Handle(ctx, rec)
	}
	return nil
}

func (r *Recent) keep(rec slog.Record) {
	kept := Record{Time: rec.Time, Level: rec.Level.String(), Message: clip(rec.Message, maxMsg),
		Attrs: make([]Attr, 0, min(len(r.attrs)+rec.NumAttrs(), maxAttrs))}
	kept.Attrs = append(kept.Attrs, r.attrs[:min(len(r.attrs), maxAttrs)]...)
	rec.Attrs(func(a slog.Attr) bool {
		kept.Attrs = appendAttr(kept.Attrs, r.groups, a)
		return len(kept.Attrs) < maxAttrs
	})
	g := r.ring
	g.mu.Lock()
	defer g.mu.Unlock()
	g.total++
	if len(g.buf) < cap(g.buf) {
		g.buf = append(g.buf, kept)
	} else {
		g.buf[g.next] = kept
	}
	g.next = (g.next + 1) % cap(g.buf)
}

// WithAttrs returns a handler that adds attrs to every record; it shares
// this handler's kept records.
func (r *Recent) WithAttrs(attrs []slog.Attr) slog.Handler {
	if len(attrs) == 0 {
		return r
	}
	c := *r
	if r.next != nil {
		c.next = r.next.WithAttrs(attrs)
	}
	c.attrs = slices.Clip(r.attrs)
	for _, a := range attrs {
		if len(c.attrs) >= maxAttrs {
			break
		}
		c.attrs = appendAttr(c.attrs, r.groups, a)
	}
	return &c
}

// WithGroup returns a handler that qualifies later attributes with name;
// it shares this handler's kept records.
func (r *Recent) WithGroup(name string) slog.Handler {
	if name == "" {
		return r
	}
	c := *r
	if r.next != nil {
		c.next = r.next.WithGroup(name)
	}
	c.groups = r.groups + name + "."
	return &c
}

// Records returns the kept records, newest first.
func (r *Recent) Records() []Record {
	g := r.ring
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]Record, 0, len(g.buf))
	for i := range len(g.buf) {
		out = append(out, g.buf[(g.next-1-i+2*cap(g.buf))%cap(g.buf)])
	}
	return out
}

// Total returns how many warnings and errors were seen since the start,
// including those no longer kept.
func (r *Recent) Total() int64 {
	r.ring.mu.Lock()
	defer r.ring.mu.Unlock()
	return r.ring.total
}

// Cap returns how many records are kept at most.
func (r *Recent) Cap() int { return cap(r.ring.buf) }

// appendAttr flattens a (resolving LogValuers and opening groups) onto
// out, with keys qualified by prefix; it stops at maxAttrs.
func appendAttr(out []Attr, prefix string, a slog.Attr) []Attr {
	a.Value = a.Value.Resolve()
	if a.Equal(slog.Attr{}) {
		return out
	}
	if a.Value.Kind() == slog.KindGroup {
		p := prefix
		if a.Key != "" {
			p += a.Key + "."
		}
		for _, ga := range a.Value.Group() {
			if len(out) >= maxAttrs {
				break
			}
			out = appendAttr(out, p, ga)
		}
		return out
	}
	if len(out) >= maxAttrs {
		return out
	}
	var v string
	if a.Value.Kind() == slog.KindTime {
		v = a.Value.Time().UTC().Format(time.RFC3339Nano)
	} else {
		v = a.Value.String()
	}
	return append(out, Attr{Key: clip(prefix+a.Key, maxValue), Value: clip(v, maxValue)})
}

// clip cuts s to at most n bytes at a rune boundary, marking the cut.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	i := n - len("…")
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + "…"
}
