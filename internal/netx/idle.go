package netx

import (
	"errors"
	"os"
	"sync/atomic"
	"time"
)

// Idle tracks the last activity of a connection pair, for idle timeouts
// that count traffic in either direction. The zero value with a zero
// timeout disables the check.
type Idle struct {
	Timeout time.Duration
	last    atomic.Int64
}

// NewIdle returns a tracker that starts now.
func NewIdle(timeout time.Duration) *Idle {
	i := &Idle{Timeout: timeout}
	i.Touch()
	return i
}

// Touch records activity.
func (i *Idle) Touch() {
	if i.Timeout > 0 {
		i.last.Store(time.Now().UnixNano())
	}
}

// Deadline is the time at which the pair goes idle, or zero.
func (i *Idle) Deadline() time.Time {
	if i.Timeout <= 0 {
		return time.Time{}
	}
	return time.Unix(0, i.last.Load()).Add(i.Timeout)
}

// Expired reports whether err is a deadline error and the pair has been
// idle for the whole timeout. When err is a deadline error but there was
// traffic meanwhile, it returns false and the caller extends its deadline
// to Deadline() and reads again.
func (i *Idle) Expired(err error) (expired, isTimeout bool) {
	if !IsTimeout(err) || i.Timeout <= 0 {
		return false, false
	}
	return !time.Now().Before(i.Deadline()), true
}

// IsTimeout reports whether err is a deadline or timeout error.
func IsTimeout(err error) bool {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return true
	}
	var te interface{ Timeout() bool }
	return errors.As(err, &te) && te.Timeout()
}
