// Package notifytest is a fake systemd notify socket (sd_notify(3)) for
// tests: it sets NOTIFY_SOCKET, records every message, and lets a test
// wait for a given NAME=value line.
package notifytest

import (
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Socket is a listening notify socket.
type Socket struct {
	Path string

	mu     sync.Mutex
	msgs   []string // every datagram but Sync's, in order
	next   int      // the first message Await has not consumed
	wake   chan struct{}
	marks  int
	synced int // the last Sync mark received
}

// syncMark starts the datagrams Sync sends itself.
const syncMark = "X_NOTIFYTEST_SYNC="

// Listen opens a notify socket and points NOTIFY_SOCKET at it for the rest
// of t (t.Setenv: not with t.Parallel). Child processes started afterwards
// inherit it. The socket closes when t ends.
func Listen(t testing.TB) *Socket {
	t.Helper()
	// A short directory: a socket path must fit in 108 bytes.
	dir, err := os.MkdirTemp("", "sdnotify")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := &Socket{Path: filepath.Join(dir, "notify"), wake: make(chan struct{}, 1)}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: s.Path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("NOTIFY_SOCKET", s.Path)
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			m := string(buf[:n])
			s.mu.Lock()
			if v, ok := strings.CutPrefix(m, syncMark); ok {
				s.synced, _ = strconv.Atoi(v)
			} else {
				s.msgs = append(s.msgs, m)
			}
			s.mu.Unlock()
			select {
			case s.wake <- struct{}{}:
			default:
			}
		}
	}()
	t.Cleanup(func() { conn.Close(); <-done })
	return s
}

// Sync returns once every message sent to s before the call has been
// received: it sends s a marker and waits for it (a socket delivers in
// order), so that Count and Messages are exact at that point.
func (s *Socket) Sync(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	s.marks++
	mark := s.marks
	s.mu.Unlock()
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: s.Path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(syncMark + strconv.Itoa(mark))); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		s.mu.Lock()
		done := s.synced >= mark
		s.mu.Unlock()
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("notify socket: sync marker not received")
		}
		select {
		case <-s.wake:
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// Has reports whether message msg has the line want.
func Has(msg, want string) bool {
	return slices.Contains(strings.Split(msg, "\n"), want)
}

// Await consumes messages until one has the line want (such as
// "READY=1"), and returns it and the messages consumed before it. It fails
// t if none comes within timeout.
func (s *Socket) Await(t testing.TB, want string, timeout time.Duration) (msg string, before []string) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		for s.next < len(s.msgs) {
			m := s.msgs[s.next]
			s.next++
			if Has(m, want) {
				s.mu.Unlock()
				return m, before
			}
			before = append(before, m)
		}
		s.mu.Unlock()
		select {
		case <-s.wake:
		case <-deadline.C:
			t.Fatalf("no %q from the daemon within %v; messages meanwhile: %q", want, timeout, before)
		}
	}
}

// Count returns how many of the messages so far have the line want.
func (s *Socket) Count(want string) int {
	n := 0
	for _, m := range s.Messages() {
		if Has(m, want) {
			n++
		}
	}
	return n
}

// Messages returns every message so far, consumed or not.
func (s *Socket) Messages() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.msgs)
}
