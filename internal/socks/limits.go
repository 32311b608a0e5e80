package socks

import (
	"net"
	"net/netip"
	"sync"
	"time"
)

// sourceOf is the client IP of c, the key of the per-source cap.
func sourceOf(c net.Conn) string {
	a := c.RemoteAddr()
	if ta, ok := a.(*net.TCPAddr); ok {
		if ip, ok := netip.AddrFromSlice(ta.IP); ok {
			return ip.Unmap().String()
		}
	}
	if a == nil {
		return ""
	}
	if h, _, err := net.SplitHostPort(a.String()); err == nil {
		return h
	}
	return a.String()
}

// logLimit lets one log line per key through per interval; the lines it
// held back are counted in the next one. It holds at most maxKeys keys,
// so a flood of sources cannot grow it without bound.
type logLimit struct {
	every time.Duration
	now   func() time.Time

	mu     sync.Mutex
	last   map[string]*logMark
	pruned time.Time // last sweep of expired keys
}

type logMark struct {
	at         time.Time
	suppressed int
}

const maxLogKeys = 4096

func newLogLimit(every time.Duration) *logLimit {
	return &logLimit{every: every, now: time.Now, last: map[string]*logMark{}}
}

// allow reports whether a line for key may be logged now, and how many
// were held back since the last one.
func (l *logLimit) allow(key string) (bool, int) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	m := l.last[key]
	if m != nil && now.Sub(m.at) < l.every {
		m.suppressed++
		return false, 0
	}
	if m == nil {
		if len(l.last) >= maxLogKeys && now.Sub(l.pruned) >= l.every {
			for k, v := range l.last { // at most once per interval
				if now.Sub(v.at) >= l.every {
					delete(l.last, k)
				}
			}
			l.pruned = now
		}
		if len(l.last) >= maxLogKeys {
			return false, 0 // a flood of sources: drop the line
		}
		m = &logMark{}
		l.last[key] = m
	}
	n := m.suppressed
	m.at, m.suppressed = now, 0
	return true, n
}

// logLimited logs msg at info level unless a line of this kind from this
// client was logged within the last second, or more than logBurst lines
// from all sources were (a storm from many addresses). The lines held
// back are counted in the next one: suppressed (this source),
// suppressed_all (any source, the overall limit).
func (s *Server) logLimited(kind, client, msg string, args ...any) {
	src := client
	if h, _, err := net.SplitHostPort(client); err == nil {
		src = h
	}
	ok, held := s.logs.allow(kind + "|" + src)
	if !ok || !s.logsAll.Allow() {
		return
	}
	if held > 0 {
		args = append(args, "suppressed", held)
	}
	if n := s.logsAll.Suppressed(); n > 0 {
		args = append(args, "suppressed_all", n)
	}
	s.log.Info(msg, args...)
}

// logBurst is how many rate-limited lines all sources together may log
// per second.
const logBurst = 20
