package tunnel

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"
	"golang.org/x/sys/unix"

	"github.com/vpcreach/vpcreach/internal/netx"
)

// Data frames after the status byte: a 4-byte big-endian length, then that
// many bytes. Two lengths are markers: frameEOF is a clean half-close of
// the sender's direction, frameAbort a reset. A stream that ends (yamux FIN
// or error) without frameEOF was aborted: a truncated transfer never looks
// complete.
const (
	frameEOF   = 0xFFFFFFFF
	frameAbort = 0xFFFFFFFE
)

// SpliceResult reports how a spliced connection ended.
type SpliceResult struct {
	Up, Down int64 // bytes user->stream and stream->user
	Aborted  bool  // either side reset, errored or went idle
	Err      error // the first cause of an abort
}

// Splice joins a user-side connection (TCP: a client on a proxy port, a
// relay connection, or the agent's connection to its target) with a tunnel
// stream whose status byte has been exchanged. It copies both ways with the
// data framing above, propagates half-close, turns an abort on either side
// into a reset on the other, and ends a pair idle for longer than idle
// (zero: never). It returns when both directions are done, having closed
// both user and stream.
func Splice(user net.Conn, stream net.Conn, idle time.Duration) SpliceResult {
	return SpliceCounted(user, stream, idle, nil)
}

// Counters count spliced bytes as they pass (for metrics), shared by every
// connection of a component.
type Counters struct {
	Up, Down atomic.Int64 // user->stream, stream->user
	// Spliced counts streams carried as spliced frames (spliced.go).
	Spliced atomic.Int64
}

// SpliceCounted is Splice that also adds the bytes to c (nil: none) as
// each chunk passes, so long-lived connections show in the counters.
func SpliceCounted(user net.Conn, stream net.Conn, idle time.Duration, c *Counters) SpliceResult {
	return spliceWith(user, stream, idle, c, nil)
}

// Splice is SpliceCounted for a stream of this session. A stream prepared
// for spliced frames (PrepareSpliced) carries its data as such both ways
// (spliced.go); user must then be a *net.TCPConn.
func (s *Session) Splice(user net.Conn, stream net.Conn, idle time.Duration, c *Counters) SpliceResult {
	return spliceWith(user, stream, idle, c, s.comb)
}

// PrepareSpliced readies stream to carry spliced frames; it must run
// before the peer can send on the stream: on the server before it writes
// a stream header with Spliced set (and only when the user side is a
// *net.TCPConn), on the agent before it answers such a header with
// StatusOK. It reports false on a session without spliced frames. A
// prepared stream that never reaches Splice must be forgotten
// (ForgetSpliced).
func (s *Session) PrepareSpliced(stream net.Conn) bool {
	ys, ok := stream.(*yamux.Stream)
	if !ok || !s.Spliced() {
		return false
	}
	return s.comb.splices.register(ys.StreamID(), s.comb) != nil
}

// ForgetSpliced undoes PrepareSpliced for a stream that will not be
// spliced (its status was not OK, or its user went away first).
func (s *Session) ForgetSpliced(stream net.Conn) {
	if ys, ok := stream.(*yamux.Stream); ok && s.Spliced() {
		if ss := s.comb.splices.get(ys.StreamID()); ss != nil {
			ss.release(s.comb.splices)
		}
	}
}

func spliceWith(user net.Conn, stream net.Conn, idle time.Duration, c *Counters, comb *combiner) SpliceResult {
	sp := &splice{user: user, stream: stream, idle: netx.NewIdle(idle), counters: c,
		done: make(chan struct{}), aborted: make(chan struct{})}
	if ys, ok := stream.(*yamux.Stream); ok {
		sp.ys = ys
		if comb != nil && comb.splices != nil {
			sp.ss = comb.splices.get(ys.StreamID())
		}
	}
	if sp.ss != nil {
		if c != nil {
			c.Spliced.Add(1)
		}
		defer sp.ss.release(comb.splices)
		tc, ok := user.(*net.TCPConn)
		var err error
		if ok {
			sp.urc, err = tc.SyscallConn()
		}
		if !ok || err != nil { // a caller's mistake: PrepareSpliced is for TCP users
			netx.Reset(user)
			_ = stream.Close()
			return SpliceResult{Aborted: true, Err: fmt.Errorf("%w: spliced stream with a %T user", ErrProtocol, user)}
		}
		sp.ss.attach(sp.deliverUser, sp.idle, c)
	}
	sp.watchIdle()
	go sp.down()
	sp.up()
	<-sp.done
	sp.stopWatch()
	res := SpliceResult{Up: sp.nUp, Down: sp.nDown}
	if sp.ss != nil {
		sp.ss.rmu.Lock()
		res.Down += sp.ss.delivered
		sp.ss.rmu.Unlock()
	}
	select {
	case <-sp.aborted:
		res.Aborted, res.Err = true, sp.err
	default:
		_ = user.Close()
	}
	_ = stream.Close()
	return res
}

type splice struct {
	user, stream net.Conn
	ys           *yamux.Stream
	idle         *netx.Idle
	watchdog     *time.Timer   // aborts the pair once idle (nil: no timeout)
	finished     atomic.Bool   // both directions done: the watchdog stands down
	done         chan struct{} // closed when down() returns
	nUp, nDown   int64
	counters     *Counters
	ss           *splicedStream  // nil: no spliced frames on this stream
	urc          syscall.RawConn // the user socket, with ss
	once         sync.Once
	aborted      chan struct{}
	err          error // set once, before aborted is closed
}

// abort resets the user side and unblocks every pending operation on
// both. Only the first cause is kept.
func (sp *splice) abort(err error) {
	sp.once.Do(func() {
		sp.err = err
		close(sp.aborted)
		netx.Reset(sp.user)
		if sp.ss != nil {
			sp.ss.stop()
		}
		now := time.Now()
		_ = sp.stream.SetReadDeadline(now)
		_ = sp.stream.SetWriteDeadline(now)
	})
}

func (sp *splice) isAborted() bool {
	select {
	case <-sp.aborted:
		return true
	default:
		return false
	}
}

// watchIdle starts the idle watchdog: one timer per pair that fires at
// the idle deadline and either re-arms for the deadline traffic has pushed
// out since, or aborts the pair. Reads and writes carry no deadline of
// their own, so a yamux stream read does not arm a timer of its own on
// every wait.
func (sp *splice) watchIdle() {
	if sp.idle.Timeout <= 0 {
		return
	}
	// Created far in the future and then reset, so that sp.watchdog is
	// set before the callback can run.
	sp.watchdog = time.AfterFunc(time.Duration(math.MaxInt64), sp.checkIdle)
	sp.watchdog.Reset(sp.idle.Timeout)
}

func (sp *splice) checkIdle() {
	if sp.finished.Load() {
		return
	}
	if d := time.Until(sp.idle.Deadline()); d > 0 {
		sp.watchdog.Reset(d)
		return
	}
	sp.abort(fmt.Errorf("idle for %v", sp.idle.Timeout))
}

func (sp *splice) stopWatch() {
	if sp.watchdog != nil {
		sp.finished.Store(true)
		sp.watchdog.Stop()
	}
}

// read is c.Read, its error replaced by the abort's cause once the pair
// was aborted.
func (sp *splice) read(c net.Conn, b []byte) (int, error) {
	n, err := c.Read(b)
	if err != nil && err != io.EOF {
		err = sp.cause(err)
	}
	return n, err
}

// cause is the abort's cause once the pair was aborted (the watchdog's
// idle timeout, say), else err.
func (sp *splice) cause(err error) error {
	if sp.isAborted() {
		return sp.err
	}
	return err
}

// readFull is io.ReadFull through read.
func (sp *splice) readFull(c net.Conn, b []byte) error {
	for off := 0; off < len(b); {
		n, err := sp.read(c, b[off:])
		off += n
		if err == io.EOF && off > 0 && off < len(b) {
			return io.ErrUnexpectedEOF
		}
		if err != nil && off < len(b) {
			return err
		}
	}
	return nil
}

// up copies user -> stream. It is the only writer of the stream.
func (sp *splice) up() {
	if sp.ss != nil {
		sp.upSpliced()
		return
	}
	rd := netx.NewReadable(sp.user)
	for {
		bp, n, err := sp.readUser(rd)
		if n > 0 {
			sp.idle.Touch()
			buf := *bp
			binary.BigEndian.PutUint32(buf, uint32(n))
			_, werr := sp.stream.Write(buf[:4+n])
			netx.PutBuf(bp)
			if werr != nil {
				sp.abort(fmt.Errorf("write to tunnel: %w", werr))
				return
			}
			sp.count(n)
		} else if bp != nil {
			netx.PutBuf(bp)
		}
		switch {
		case err == nil:
		case err == io.EOF:
			var eof [4]byte
			binary.BigEndian.PutUint32(eof[:], frameEOF)
			if _, werr := sp.stream.Write(eof[:]); werr != nil {
				sp.abort(fmt.Errorf("write to tunnel: %w", werr))
				return
			}
			// The end marker is the half-close. The stream itself stays
			// open until Splice returns: a yamux Close would start its
			// StreamCloseTimeout, which resets the stream while the other
			// direction may still be moving data.
			return
		default:
			sp.sendAbort(err)
			return
		}
	}
}

// readUser reads the next chunk of the user side into a pooled buffer
// (at offset 4, room for the frame header). On a raw
// socket it is one syscall per chunk and holds no buffer while waiting.
func (sp *splice) readUser(rd *netx.Readable) (*[]byte, int, error) {
	var bp *[]byte
	var n int
	var err error
	if rd != nil {
		bp, n, err = rd.ReadBuf(4)
	} else {
		bp = netx.GetBuf()
		n, err = sp.user.Read((*bp)[4 : 4+netx.BufSize])
	}
	if err != nil && err != io.EOF {
		err = sp.cause(err)
	}
	return bp, n, err
}

// sendAbort tells the peer that this direction was reset, then aborts.
func (sp *splice) sendAbort(cause error) {
	if !sp.isAborted() {
		var ab [4]byte
		binary.BigEndian.PutUint32(ab[:], frameAbort)
		_ = sp.stream.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = sp.stream.Write(ab[:])
	}
	sp.abort(cause)
}

// down copies stream -> user.
func (sp *splice) down() {
	defer close(sp.done)
	if sp.ss != nil {
		sp.downSpliced()
		return
	}
	var hdr [4]byte
	for {
		if err := sp.readFull(sp.stream, hdr[:]); err != nil {
			if err == io.EOF {
				err = fmt.Errorf("%w: stream ended without end marker", ErrAborted)
			}
			sp.abort(err)
			return
		}
		n := binary.BigEndian.Uint32(hdr[:])
		switch {
		case n == frameEOF:
			netx.CloseWrite(sp.user)
			return
		case n == frameAbort:
			sp.abort(ErrAborted)
			return
		case n > MaxDataFrame:
			sp.abort(fmt.Errorf("%w: data frame of %d bytes", ErrProtocol, n))
			return
		}
		if err := sp.copyFrame(int(n)); err != nil {
			sp.abort(err)
			return
		}
	}
}

func (sp *splice) copyFrame(n int) error {
	n0 := n
	bp := netx.GetBufFor(n > netx.BufSize)
	defer netx.PutBuf(bp)
	buf := (*bp)[:len(*bp)-4]
	for n > 0 {
		chunk := buf
		if n < len(chunk) {
			chunk = chunk[:n]
		}
		if err := sp.readFull(sp.stream, chunk); err != nil {
			return err
		}
		sp.idle.Touch()
		if _, err := sp.user.Write(chunk); err != nil {
			return fmt.Errorf("write to user: %w", err)
		}
		sp.countDown(len(chunk))
		n -= len(chunk)
	}
	// yamux keeps a stream's receive buffer (about twice its largest frame)
	// until Shrink. Keep it while a bulk transfer runs (full frames follow
	// one another: reallocating per frame would cost an allocation and a
	// zeroing per frame), free it after a short frame, which ends a burst:
	// an idle connection then pins no buffer.
	if sp.ys != nil && n0 < netx.BufSize {
		sp.ys.Shrink()
	}
	return nil
}

func (sp *splice) count(n int) {
	sp.nUp += int64(n)
	if sp.counters != nil {
		sp.counters.Up.Add(int64(n))
	}
}

func (sp *splice) countDown(n int) {
	sp.nDown += int64(n)
	if sp.counters != nil {
		sp.counters.Down.Add(int64(n))
	}
}

// upSpliced copies user -> stream as spliced frames within the credit
// the peer grants: small reads as frames written from a pooled buffer,
// and after a read of netx.BulkThreshold or more, spliced from the user
// socket into a pipe and from the pipe into the tunnel, until a splice
// moves less.
func (sp *splice) upSpliced() {
	ss := sp.ss
	rd := netx.NewReadable(sp.user)
	bulk := false
	for {
		credit := int(min(ss.waitCredit(), MaxDataFrame))
		if credit == 0 {
			sp.abort(sp.cause(fmt.Errorf("%w: the peer ended the stream", ErrAborted)))
			return
		}
		var n int
		var err, werr error
		if bulk && !ss.spipe.ok() {
			ss.spipe, _ = newPipe() // none left: stay on reads
		}
		if bulk && ss.spipe.ok() {
			n, err = sp.spliceUser(ss.spipe.w, credit)
			if n > 0 {
				werr = ss.c.writeSpliced(spliceHeader(typeData, flagSplice, ss.id, uint32(n)), ss.spipe.r, n)
			}
		} else {
			var bp *[]byte
			bp, n, err = rd.ReadBufMax(yamuxHeaderSize, credit)
			if n > 0 {
				copy(*bp, spliceHeader(typeData, flagSplice, ss.id, uint32(n)))
				werr = ss.c.writeDirect((*bp)[:yamuxHeaderSize+n])
			}
			if bp != nil {
				netx.PutBuf(bp)
			}
		}
		if n > 0 {
			if werr != nil {
				sp.abort(fmt.Errorf("write to tunnel: %w", werr))
				return
			}
			sp.idle.Touch()
			ss.spend(n)
			sp.count(n)
			bulk = n >= netx.BulkThreshold
		}
		switch {
		case err == nil:
		case err == io.EOF:
			if werr := ss.c.queueFrameErr(spliceHeader(typeData, flagSplice|flagSpliceEOF, ss.id, 0)); werr != nil {
				sp.abort(fmt.Errorf("write to tunnel: %w", werr))
			}
			return
		default:
			if !sp.isAborted() {
				ss.c.queueFrame(spliceHeader(typeData, flagSplice|flagSpliceAbort, ss.id, 0))
			}
			sp.abort(sp.cause(err))
			return
		}
	}
}

// spliceUser splices up to max bytes from the user socket into the
// (empty) pipe w, waiting for data; io.EOF at the end.
func (sp *splice) spliceUser(w int, max int) (int, error) {
	var n int64
	var serr error
	err := sp.urc.Read(func(fd uintptr) bool {
		var done bool
		n, serr, done = spliceNB(int(fd), w, max)
		return done
	})
	switch {
	case err != nil:
		return 0, err
	case serr != nil:
		return 0, &net.OpError{Op: "splice", Net: "tcp", Err: serr}
	case n == 0:
		return 0, io.EOF
	}
	return int(n), nil
}

// downSpliced copies the spliced frames of the stream's receive queue to
// the user, granting the peer credit as they drain.
func (sp *splice) downSpliced() {
	ss := sp.ss
	for {
		s, ended, ok := ss.take()
		if !ok {
			if ended {
				sp.abort(fmt.Errorf("%w: stream ended without end marker", ErrAborted))
			} else {
				sp.abort(sp.cause(net.ErrClosed))
			}
			return
		}
		var m int
		var err error
		switch s.kind {
		case segEOF:
			ss.consumed(0)
			netx.CloseWrite(sp.user)
			return
		case segAbort:
			ss.consumed(0)
			sp.abort(ErrAborted)
			return
		case segPipe:
			m, err = sp.spliceToUser(ss.rpipe.r, s.n)
		case segHeap:
			m, err = sp.user.Write((*s.bp)[s.off : s.off+s.n])
		}
		if m > 0 {
			sp.idle.Touch()
			sp.countDown(m)
			if grant := ss.consumed(m); grant > 0 {
				ss.grant(grant)
			}
		}
		if err != nil {
			sp.abort(fmt.Errorf("write to user: %w", sp.cause(err)))
			return
		}
	}
}

// spliceNB is one non-blocking splice(2) of up to n bytes from in to out
// for a RawConn callback: done is false when it would block (EAGAIN: the
// callback waits and retries); EINTR is retried at once.
func spliceNB(in, out, n int) (m int64, err error, done bool) {
	for {
		m, err = unix.Splice(in, nil, out, nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		switch err {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return 0, nil, false
		}
		return m, err, true
	}
}

// deliverUser writes p to the user socket without waiting for room, for
// the session's reader (pushBytes), and returns what the socket took.
func (sp *splice) deliverUser(p []byte) int {
	var m int
	_ = sp.urc.Write(func(fd uintptr) bool {
		for {
			n, err := unix.Write(int(fd), p)
			if err == syscall.EINTR {
				continue
			}
			if err == nil {
				m = n
			}
			return true
		}
	})
	return m
}

// spliceToUser splices up to n bytes (all in the pipe) from pipe r to the
// user socket, waiting for room.
func (sp *splice) spliceToUser(r int, n int) (int, error) {
	var m int64
	var serr error
	err := sp.urc.Write(func(fd uintptr) bool {
		var done bool
		m, serr, done = spliceNB(r, int(fd), n)
		return done
	})
	if err == nil && serr != nil {
		err = &net.OpError{Op: "splice", Net: "tcp", Err: serr}
	}
	return int(m), err
}
