package logx

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	l := &Limiter{Burst: 3, Every: time.Hour}
	allowed := 0
	for range 10 {
		if l.Allow() {
			allowed++
		}
	}
	if allowed != 3 {
		t.Fatalf("allowed %d of 10 with a burst of 3", allowed)
	}
	if n := l.Suppressed(); n != 7 {
		t.Fatalf("suppressed %d, want 7", n)
	}
	if n := l.Suppressed(); n != 0 {
		t.Fatalf("suppressed not reset: %d", n)
	}
	l.Every = time.Nanosecond // the window is over: allowed again
	if !l.Allow() {
		t.Fatal("not allowed after the window")
	}
}
