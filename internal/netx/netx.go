// Package netx holds the socket plumbing every vpcreach component shares:
// socket options, resets, readiness waits that keep idle connections from
// pinning buffers, the buffer pool, a TCP-to-TCP joiner and an accept loop
// that survives temporary errors.
package netx

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// BufSize is the size of pooled copy buffers.
const BufSize = 128 << 10

// BulkBufSize is the size of the pooled buffers a bulk transfer moves in:
// a connection whose reads fill at least BulkThreshold bytes reads up to
// this much at a time, so each chunk costs one hand-off through the
// tunnel per MiB instead of one per 128 KiB.
const BulkBufSize = 1 << 20

// BulkThreshold is the read size from which a connection counts as bulk.
const BulkThreshold = 64 << 10

var (
	bufPool     = sync.Pool{New: func() any { b := make([]byte, BufSize+4); return &b }}
	bulkBufPool = sync.Pool{New: func() any { b := make([]byte, BulkBufSize+4); return &b }}
)

// GetBuf returns a pooled buffer of BufSize+4 bytes (room for a frame header).
func GetBuf() *[]byte { return bufPool.Get().(*[]byte) }

// GetBufFor returns a pooled buffer of BulkBufSize+4 bytes if bulk, else
// GetBuf().
func GetBufFor(bulk bool) *[]byte {
	if bulk {
		return bulkBufPool.Get().(*[]byte)
	}
	return GetBuf()
}

// PutBuf returns a buffer from GetBuf or GetBufFor to its pool.
func PutBuf(b *[]byte) {
	if len(*b) == BulkBufSize+4 {
		bulkBufPool.Put(b)
		return
	}
	bufPool.Put(b)
}

// Reset closes c so that the peer sees a reset (RST), not a clean EOF.
func Reset(c net.Conn) {
	if tc, ok := c.(interface{ SetLinger(int) error }); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// CloseWrite half-closes c if it can, and reports whether it did.
func CloseWrite(c net.Conn) bool {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite() == nil
	}
	return false
}

// KeepAlive sets TCP keepalive on c: first probe after idle, then every
// interval, count probes.
func KeepAlive(c net.Conn, idle, interval time.Duration, count int) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return
	}
	_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: idle, Interval: interval, Count: count})
}

// UserTimeout sets TCP_USER_TIMEOUT: data unacknowledged for d kills the
// connection, however the keepalive is set.
func UserTimeout(c net.Conn, d time.Duration) error {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	})
	return errors.Join(err, serr)
}

// Readable waits until a read on the connection behind rc would not block
// (data, EOF or an error are pending) without taking a buffer, so that an
// idle connection pins no memory. It honours the connection's read deadline.
// A socket error seen while waiting (a reset) is returned by Wait: the
// kernel reports it only once, so the following Read would see a clean EOF.
type Readable struct {
	rc   syscall.RawConn
	f    func(uintptr) bool
	err  syscall.Errno
	bulk bool // the last ReadBuf filled BulkThreshold or more
}

// NewReadable returns a waiter for c, or nil if c has no raw socket.
func NewReadable(c net.Conn) *Readable {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	r := &Readable{rc: rc}
	r.f = r.peek
	return r
}

func (r *Readable) peek(fd uintptr) bool {
	ready, e := Peek(fd)
	if e != 0 {
		r.err = e
	}
	return ready
}

// Peek reports whether a read on the non-blocking socket fd would not
// block (data, EOF or an error are pending), without reading; e is the
// pending socket error, if any.
func Peek(fd uintptr) (ready bool, e syscall.Errno) {
	var b [1]byte
	_, _, e = syscall.Syscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&b[0])), 1,
		syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
	switch e {
	case syscall.EAGAIN, syscall.EINTR:
		return false, 0
	}
	return true, e
}

// Wait blocks until the socket is readable. A nil waiter returns at once.
func (r *Readable) Wait() error {
	if r == nil {
		return nil
	}
	if err := r.rc.Read(r.f); err != nil {
		return err
	}
	if r.err != 0 {
		err := r.err
		r.err = 0
		return &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("recvfrom", err)}
	}
	return nil
}

// ReadBuf reads from the socket into a pooled buffer at offset off (up to
// BufSize bytes, or BulkBufSize after a read of BulkThreshold or more: the
// buffer's length less 4) in one syscall when data is there, and holds no buffer
// while it waits: the buffer is taken before each attempt and returned
// when the socket has nothing. It honours the read deadline. On success
// the caller owns bp and returns it with PutBuf; n == 0 with a nil error
// never happens (EOF is io.EOF). A nil waiter is an error.
func (r *Readable) ReadBuf(off int) (bp *[]byte, n int, err error) {
	return r.ReadBufMax(off, 0)
}

// ReadBufMax is ReadBuf reading at most max bytes (0: no limit) into the
// buffer at offset off.
func (r *Readable) ReadBufMax(off, max int) (bp *[]byte, n int, err error) {
	if r == nil {
		return nil, 0, errors.New("netx: no raw socket")
	}
	var errno syscall.Errno
	rerr := r.rc.Read(func(fd uintptr) bool {
		if bp == nil {
			bp = GetBufFor(r.bulk)
		}
		buf := (*bp)[off:]
		if size := len(*bp) - 4; len(buf) > size { // the buffer's nominal size
			buf = buf[:size]
		}
		if max > 0 && len(buf) > max {
			buf = buf[:max]
		}
		m, _, e := syscall.Syscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
		switch e {
		case syscall.EAGAIN:
			PutBuf(bp)
			bp = nil
			return false
		case syscall.EINTR:
			return false
		}
		n, errno = int(m), e
		return true
	})
	switch {
	case rerr != nil:
		err = rerr
	case errno != 0:
		err = &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", errno)}
	case n == 0:
		err = io.EOF
	}
	if err != nil && bp != nil {
		PutBuf(bp)
		bp = nil
	}
	r.bulk = n >= BulkThreshold
	return bp, n, err
}
