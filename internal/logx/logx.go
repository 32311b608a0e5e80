// Package logx holds logging helpers: a rate limiter for log lines that
// fire per connection, so that a scan or a storm cannot flood the log.
package logx

import (
	"sync"
	"time"
)

// Limiter allows Burst lines per Every (defaults: 10 per second) and
// counts what it suppressed. The zero Limiter is ready to use.
type Limiter struct {
	Burst int
	Every time.Duration

	mu         sync.Mutex
	start      time.Time
	n          int
	suppressed int64
}

// Allow reports whether a line may be logged now; when not, it counts the
// line as suppressed.
func (l *Limiter) Allow() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	burst, every := l.Burst, l.Every
	if burst <= 0 {
		burst = 10
	}
	if every <= 0 {
		every = time.Second
	}
	now := time.Now()
	if now.Sub(l.start) >= every {
		l.start, l.n = now, 0
	}
	if l.n >= burst {
		l.suppressed++
		return false
	}
	l.n++
	return true
}

// Suppressed returns how many lines were suppressed since the last call
// and resets the count: log it with the next line that is allowed.
func (l *Limiter) Suppressed() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.suppressed
	l.suppressed = 0
	return n
}
