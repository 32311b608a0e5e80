package netx

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

type timeoutErr struct{ timeout bool }

func (e timeoutErr) Error() string { return "fake" }
func (e timeoutErr) Timeout() bool { return e.timeout }

func TestIsTimeout(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"EOF", io.EOF, false},
		{"reset", &net.OpError{Op: "read", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, false},
		{"deadline", os.ErrDeadlineExceeded, true},
		{"wrapped deadline", fmt.Errorf("x: %w", os.ErrDeadlineExceeded), true},
		{"op error deadline", &net.OpError{Op: "raw-read", Err: os.ErrDeadlineExceeded}, true},
		{"context deadline", context.DeadlineExceeded, true},
		{"Timeout() true", timeoutErr{true}, true},
		{"Timeout() false", timeoutErr{false}, false},
		{"joined", errors.Join(io.EOF, timeoutErr{true}), true},
	} {
		if got := IsTimeout(tc.err); got != tc.want {
			t.Errorf("%s: IsTimeout = %v; want %v", tc.name, got, tc.want)
		}
	}
}

func TestIdle(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name        string
		timeout     time.Duration
		last        time.Time // zero: NewIdle's own start
		err         error
		expired, to bool
	}{
		{"disabled, timeout error", 0, time.Time{}, os.ErrDeadlineExceeded, false, false},
		{"disabled, negative", -time.Second, time.Time{}, os.ErrDeadlineExceeded, false, false},
		{"other error", time.Minute, now.Add(-time.Hour), io.EOF, false, false},
		{"nil error", time.Minute, now.Add(-time.Hour), nil, false, false},
		{"recent traffic", time.Minute, now.Add(-time.Second), os.ErrDeadlineExceeded, false, true},
		{"just started", time.Minute, time.Time{}, os.ErrDeadlineExceeded, false, true},
		{"idle whole timeout", time.Minute, now.Add(-time.Minute - time.Second), os.ErrDeadlineExceeded, true, true},
		{"idle long ago", time.Minute, now.Add(-time.Hour), &net.OpError{Op: "read", Err: os.ErrDeadlineExceeded}, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			i := NewIdle(tc.timeout)
			if !tc.last.IsZero() {
				i.last.Store(tc.last.UnixNano())
			}
			expired, to := i.Expired(tc.err)
			if expired != tc.expired || to != tc.to {
				t.Fatalf("Expired = %v, %v; want %v, %v", expired, to, tc.expired, tc.to)
			}
			dl := i.Deadline()
			switch {
			case tc.timeout <= 0:
				if !dl.IsZero() {
					t.Fatalf("Deadline = %v with timeout %v; want zero", dl, tc.timeout)
				}
			case !tc.last.IsZero():
				if want := tc.last.Add(tc.timeout); !dl.Equal(want) {
					t.Fatalf("Deadline = %v; want %v", dl, want)
				}
			default:
				if dl.Before(now.Add(tc.timeout)) || dl.After(time.Now().Add(tc.timeout)) {
					t.Fatalf("Deadline = %v; want about now + %v", dl, tc.timeout)
				}
			}
		})
	}
}

func TestIdleTouchMovesDeadline(t *testing.T) {
	i := NewIdle(time.Minute)
	old := time.Now().Add(-time.Hour)
	i.last.Store(old.UnixNano())
	if exp, _ := i.Expired(os.ErrDeadlineExceeded); !exp {
		t.Fatal("not expired an hour after the last traffic")
	}
	before := time.Now()
	i.Touch()
	if dl := i.Deadline(); dl.Before(before.Add(time.Minute)) {
		t.Fatalf("Deadline after Touch = %v; want >= %v", dl, before.Add(time.Minute))
	}
	if exp, to := i.Expired(os.ErrDeadlineExceeded); exp || !to {
		t.Fatalf("Expired right after Touch = %v, %v; want false, true", exp, to)
	}

	var z Idle // zero value: disabled
	z.Touch()
	if z.last.Load() != 0 || !z.Deadline().IsZero() {
		t.Fatal("Touch on a disabled tracker recorded a time")
	}
	if exp, to := z.Expired(os.ErrDeadlineExceeded); exp || to {
		t.Fatalf("zero Idle Expired = %v, %v; want false, false", exp, to)
	}
}
