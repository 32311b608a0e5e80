package tunnel

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"

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
}

// SpliceCounted is Splice that also adds the bytes to c (nil: none) as
// each chunk passes, so long-lived connections show in the counters.
func SpliceCounted(user net.Conn, stream net.Conn, idle time.Duration, c *Counters) SpliceResult {
	sp := &splice{user: user, stream: stream, idle: netx.NewIdle(idle), counters: c,
		done: make(chan struct{}), aborted: make(chan struct{})}
	if ys, ok := stream.(*yamux.Stream); ok {
		sp.ys = ys
	}
	sp.watchIdle()
	go sp.down()
	sp.up()
	<-sp.done
	sp.stopWatch()
	res := SpliceResult{Up: sp.nUp, Down: sp.nDown}
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
			sp.nUp += int64(n)
			if sp.counters != nil {
				sp.counters.Up.Add(int64(n))
			}
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
		sp.nDown += int64(len(chunk))
		if sp.counters != nil {
			sp.counters.Down.Add(int64(len(chunk)))
		}
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
