package netx

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// tcpPair returns the two ends of a loopback TCP connection, both closed
// at cleanup.
func tcpPair(t *testing.T) (dialed, accepted *net.TCPConn) {
	t.Helper()
	ln := testutil.Listen(t)
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		ch <- result{c, err}
	}()
	d, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		ln.Close()
		<-ch
		t.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		d.Close()
		t.Fatal(r.err)
	}
	t.Cleanup(func() { d.Close(); r.c.Close() })
	return d.(*net.TCPConn), r.c.(*net.TCPConn)
}

// sockoptInt reads an integer socket option of c.
func sockoptInt(t *testing.T, c syscall.Conn, level, opt int) int {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return v
}

// readErr reads c until an error (with a safety deadline) and returns it.
func readErr(t *testing.T, c net.Conn) error {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, c)
	if err == nil {
		err = io.EOF // io.Copy hides a clean EOF
	}
	if IsTimeout(err) {
		t.Fatal("no reset or EOF within 10 s")
	}
	return err
}

func TestResetGivesPeerECONNRESET(t *testing.T) {
	a, b := tcpPair(t)
	Reset(a)
	if err := readErr(t, b); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("peer read after Reset: %v; want ECONNRESET", err)
	}
}

func TestCloseWrite(t *testing.T) {
	a, b := tcpPair(t)
	if !CloseWrite(a) {
		t.Fatal("CloseWrite on a TCPConn reported false")
	}
	if err := readErr(t, b); err != io.EOF {
		t.Fatalf("peer read after CloseWrite: %v; want EOF", err)
	}
	// The other direction still works.
	if _, err := b.Write([]byte("reply")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	_ = a.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(a, buf); err != nil || string(buf) != "reply" {
		t.Fatalf("read after half-close: %q, %v", buf, err)
	}

	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	if CloseWrite(p1) {
		t.Fatal("CloseWrite on net.Pipe reported true")
	}
}

func TestUserTimeout(t *testing.T) {
	a, _ := tcpPair(t)
	if err := UserTimeout(a, 7500*time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if got := sockoptInt(t, a, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT); got != 7500 {
		t.Fatalf("TCP_USER_TIMEOUT = %d ms; want 7500", got)
	}
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	if err := UserTimeout(p1, time.Second); err != nil {
		t.Fatalf("UserTimeout on a pipe: %v; want nil (no-op)", err)
	}
}

func TestKeepAlive(t *testing.T) {
	a, _ := tcpPair(t)
	KeepAlive(a, 30*time.Second, 10*time.Second, 3)
	for _, o := range []struct {
		name       string
		level, opt int
		want       int
	}{
		{"SO_KEEPALIVE", unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		{"TCP_KEEPIDLE", unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 30},
		{"TCP_KEEPINTVL", unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 10},
		{"TCP_KEEPCNT", unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 3},
	} {
		if got := sockoptInt(t, a, o.level, o.opt); got != o.want {
			t.Errorf("%s = %d; want %d", o.name, got, o.want)
		}
	}
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	KeepAlive(p1, time.Second, time.Second, 1) // no-op, must not panic
}

func TestReadableBlocksUntilData(t *testing.T) {
	c, peer := tcpPair(t)
	r := NewReadable(c)
	if r == nil {
		t.Fatal("NewReadable(TCPConn) = nil")
	}
	ch := make(chan error, 1)
	go func() { ch <- r.Wait() }()
	select {
	case err := <-ch:
		t.Fatalf("Wait returned %v on an idle socket", err)
	case <-time.After(100 * time.Millisecond):
	}
	if _, err := peer.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ch:
		if err != nil {
			t.Fatalf("Wait after data: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return after data arrived")
	}
	// Wait only peeked: the byte is still there.
	buf := make([]byte, 8)
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(buf); err != nil || string(buf[:n]) != "x" {
		t.Fatalf("read after Wait: %q, %v", buf[:n], err)
	}
	// An EOF is readable too.
	peer.CloseWrite()
	if err := r.Wait(); err != nil {
		t.Fatalf("Wait at EOF: %v", err)
	}
	if n, err := c.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("read at EOF: %d, %v", n, err)
	}
}

// The regression: the kernel reports a reset once, to whoever asks first.
// The readiness peek asks first, so Wait must return the reset; if it
// swallowed it, the following Read would see a clean EOF and a reset
// would be passed on as a half-close.
func TestReadableReportsReset(t *testing.T) {
	for _, pending := range []bool{false, true} {
		name := "reset while waiting"
		if pending {
			name = "reset before wait"
		}
		t.Run(name, func(t *testing.T) {
			c, peer := tcpPair(t)
			r := NewReadable(c)
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			ch := make(chan error, 1)
			if pending {
				Reset(peer)
				go func() { ch <- r.Wait() }()
			} else {
				go func() { ch <- r.Wait() }()
				Reset(peer)
			}
			err := <-ch
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("Wait after peer reset: %v; want an error wrapping ECONNRESET", err)
			}
			var oe *net.OpError
			if !errors.As(err, &oe) || oe.Op != "read" {
				t.Fatalf("Wait error %#v is not a read *net.OpError", err)
			}
			// The error is reported once; the next wait sees the socket
			// readable (at EOF) rather than the same error again.
			if err := r.Wait(); err != nil {
				t.Fatalf("second Wait: %v", err)
			}
		})
	}
}

func TestReadableHonoursDeadline(t *testing.T) {
	c, _ := tcpPair(t)
	r := NewReadable(c)
	start := time.Now()
	_ = c.SetReadDeadline(start.Add(50 * time.Millisecond))
	err := r.Wait()
	if !IsTimeout(err) || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Wait past the deadline: %v; want a timeout", err)
	}
	if el := time.Since(start); el < 40*time.Millisecond {
		t.Fatalf("Wait returned after %v, before the deadline", el)
	}
}

func TestReadableWithoutSocket(t *testing.T) {
	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	r := NewReadable(p1)
	if r != nil {
		t.Fatal("NewReadable(pipe) is not nil")
	}
	if err := r.Wait(); err != nil {
		t.Fatalf("nil waiter: %v", err)
	}
}

// A connection whose last read filled BulkThreshold or more reads into a
// bulk buffer next; after a small read it is back to small buffers.
func TestReadBufBulkMode(t *testing.T) {
	c, peer := tcpPair(t)
	r := NewReadable(c)
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	const total = 8 << 20
	go func() { _, _ = peer.Write(make([]byte, total)) }()
	bufLen := func(prev int) int {
		if prev >= BulkThreshold {
			return BulkBufSize + 4
		}
		return BufSize + 4
	}
	prev, got, bulkReads := 0, 0, 0
	for got < total {
		bp, n, err := r.ReadBuf(4)
		if err != nil {
			t.Fatalf("after %d bytes: %v", got, err)
		}
		if len(*bp) != bufLen(prev) {
			t.Fatalf("read after one of %d bytes used a %d-byte buffer, want %d", prev, len(*bp), bufLen(prev))
		}
		if len(*bp) == BulkBufSize+4 {
			bulkReads++
		}
		PutBuf(bp)
		got += n
		prev = n
	}
	if bulkReads == 0 {
		t.Fatal("8 MiB read without ever switching to bulk buffers")
	}
	for i := range 2 {
		if _, err := peer.Write([]byte("small")); err != nil {
			t.Fatal(err)
		}
		bp, n, err := r.ReadBuf(4)
		if err != nil || n != 5 {
			t.Fatalf("small read %d: %d, %v", i, n, err)
		}
		if len(*bp) != bufLen(prev) {
			t.Fatalf("small read %d used a %d-byte buffer, want %d", i, len(*bp), bufLen(prev))
		}
		PutBuf(bp)
		prev = n
	}
}
