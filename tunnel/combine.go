package tunnel

import (
	"encoding/binary"
	"fmt"
	"net"
	"runtime"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// combiner is the net.Conn a yamux session writes to. yamux writes each
// frame as two writes (header, then body) from its one send goroutine, and
// a stream's Write waits until both have returned. The combiner queues
// them and returns at once; one flusher goroutine writes all that has
// accumulated in a single syscall. There is no added delay (the flusher
// runs as soon as something is queued), and while one write is in the
// kernel the send goroutine keeps queueing the frames of other streams, so
// under load many frames share one syscall: at 50 concurrent clients this
// halves the writes on the tunnel. A data header is held (the flusher does
// not take it) until its body, the very next write, is queued, so a frame
// is not split across syscalls; the write after a data header is always its
// body, whatever it looks like, and the two go out in one write (over TLS,
// one record sequence rather than a 12-byte record of its own). A large
// body (inlineMin and up, bulk transfer) is never copied: once no write is
// in progress it goes out from the caller with all that is queued before
// it, its header last, whatever the size of the queue: one writev on a TCP
// socket; over TLS two writes, one extra record per large frame. A smaller
// body that does not fit behind its header in the queue (write_buffer below
// inlineMin) releases the header alone rather than wait for room that
// would never come.
type combiner struct {
	net.Conn
	max int

	mu       sync.Mutex
	cond     sync.Cond
	pending  []byte
	spare    []byte
	err      error
	closed   bool
	wantBody bool // the last write was a data header: the next is its body
	hold     bool // pending ends with a data header whose body is not queued
	writing  bool // a write syscall is in progress (flusher or inline)
	// contended counts small spliced frames that found a write in
	// progress, less yields that gathered nothing (0 to maxContended):
	// while positive, an idle frame yields first to gather others
	// (writeYielding).
	contended int
	bufs      net.Buffers
	done      chan struct{}

	// Read side, used only by yamux's receive goroutine.
	rbuf       []byte
	rpos, rlen int

	waiting int // writers (not the flusher) blocked in wait

	// Spliced frames (spliced.go); splices is nil when the session does
	// not use them.
	splices *spliceTable
	rc      syscall.RawConn
	pass    int  // bytes of the current yamux frame still to hand to yamux
	hdrOnly bool // after a large spliced body, read the next header alone
}

// wait blocks a writer on cond; writes that end wake it (wakeAfterWrite).
// Called with mu held.
func (w *combiner) wait() {
	w.waiting++
	w.cond.Wait()
	w.waiting--
}

// dead returns the connection's error, net.ErrClosed once closed, or
// nil. Called with mu held.
func (w *combiner) dead() error {
	switch {
	case w.err != nil:
		return w.err
	case w.closed:
		return net.ErrClosed
	}
	return nil
}

// endWrite ends a write from a caller of buf (from the queue): the
// buffer is recycled, an error is kept for good, waiters are woken. It
// returns the connection's error.
func (w *combiner) endWrite(buf []byte, err error) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writing = false
	w.recycle(buf)
	if err != nil && w.err == nil {
		w.err = err
	}
	w.wakeAfterWrite()
	return w.err
}

// wakeAfterWrite wakes whoever waits once a write from a caller
// (inline, yielding, spliced) is done: the flusher when something was
// queued meanwhile or the connection failed or is closing, writers waiting
// for the socket. With nobody to wake it wakes nobody, so a lone
// connection's writes do not wake the idle flusher each time. Called with
// mu held.
func (w *combiner) wakeAfterWrite() {
	if len(w.pending) > 0 || w.waiting > 0 || w.err != nil || w.closed {
		w.cond.Broadcast()
	}
}

// readBufSize is the read-ahead of the tunnel socket. yamux reads through
// a 4 KiB bufio.Reader; serving it from a larger buffer brings in many
// frames per syscall.
const readBufSize = 64 << 10

// Read serves yamux's reader from the read-ahead buffer. On a session
// with spliced frames it is a demultiplexer: it parses the frame headers,
// hands yamux its frames and takes the spliced ones out (readSpliced).
func (w *combiner) Read(p []byte) (int, error) {
	if w.splices != nil {
		n, err := w.readDemux(p)
		if err != nil { // the session's reader is done: so are its spliced streams
			w.splices.endAll()
		}
		return n, err
	}
	if w.rpos < w.rlen {
		n := copy(p, w.rbuf[w.rpos:w.rlen])
		w.rpos += n
		return n, nil
	}
	if len(p) >= readBufSize {
		return w.Conn.Read(p)
	}
	if w.rbuf == nil {
		w.rbuf = make([]byte, readBufSize)
	}
	n, err := w.Conn.Read(w.rbuf)
	if n == 0 {
		return 0, err
	}
	w.rlen = n
	w.rpos = copy(p, w.rbuf[:n])
	return w.rpos, nil // an error with data recurs on the next read
}

func (w *combiner) readDemux(p []byte) (int, error) {
	for w.pass == 0 {
		if err := w.fill(yamuxHeaderSize); err != nil {
			return 0, err
		}
		h := w.rbuf[w.rpos : w.rpos+yamuxHeaderSize]
		typ, flags := h[1], binary.BigEndian.Uint16(h[2:4])
		id, length := binary.BigEndian.Uint32(h[4:8]), binary.BigEndian.Uint32(h[8:12])
		if flags&flagSplice != 0 && (typ == typeData || typ == typeWindow) {
			w.rpos += yamuxHeaderSize
			if typ == typeWindow {
				if ss := w.splices.get(id); ss != nil {
					ss.grantCredit(length)
				}
				continue
			}
			if err := w.readSpliced(id, flags, length); err != nil {
				return 0, err
			}
			continue
		}
		if flags&(yamuxFlagFIN|yamuxFlagRST) != 0 {
			if ss := w.splices.get(id); ss != nil {
				ss.peerEnded()
			}
		}
		w.pass = yamuxHeaderSize
		if typ == typeData {
			w.pass += int(length)
		}
	}
	n := min(len(p), w.pass)
	if w.rpos == w.rlen && n >= readBufSize {
		// A large body: straight into yamux's buffer, never past the frame.
		m, err := w.Conn.Read(p[:n])
		w.pass -= m
		return m, err
	}
	if err := w.fill(1); err != nil {
		return 0, err
	}
	n = copy(p[:n], w.rbuf[w.rpos:w.rlen])
	w.rpos += n
	w.pass -= n
	return n, nil
}

// fill reads until at least need bytes are buffered. After a large
// spliced body it reads only what it needs (a header), so that the next
// body is not read into user space.
func (w *combiner) fill(need int) error {
	if w.rlen-w.rpos >= need {
		return nil
	}
	if w.rbuf == nil {
		w.rbuf = make([]byte, readBufSize)
	}
	if w.rpos > 0 {
		w.rlen = copy(w.rbuf, w.rbuf[w.rpos:w.rlen])
		w.rpos = 0
	}
	for w.rlen < need {
		max := len(w.rbuf)
		if w.hdrOnly {
			max = need
		}
		n, err := w.Conn.Read(w.rbuf[w.rlen:max])
		w.rlen += n
		if err != nil && w.rlen < need {
			return err
		}
	}
	w.hdrOnly = false
	return nil
}

// readSpliced takes in the body of a spliced data frame (or its end or
// abort marker) for stream id.
func (w *combiner) readSpliced(id uint32, flags uint16, length uint32) error {
	ss := w.splices.get(id)
	if length == 0 {
		switch {
		case ss == nil:
		case flags&flagSpliceAbort != 0:
			ss.pushMarker(segAbort)
		case flags&flagSpliceEOF != 0:
			ss.pushMarker(segEOF)
		}
		return nil
	}
	if length > MaxDataFrame {
		return fmt.Errorf("%w: spliced frame of %d bytes", ErrProtocol, length)
	}
	if err := ss.checkWindow(int(length)); err != nil {
		return err
	}
	n := int(length)
	if take := min(n, w.rlen-w.rpos); take > 0 {
		if ss != nil {
			ss.pushBytes(w.rbuf[w.rpos : w.rpos+take])
		}
		w.rpos += take
		n -= take
	}
	if n == 0 {
		return nil
	}
	w.rpos, w.rlen = 0, 0 // empty: the buffer is scratch space for drops
	for n > 0 {
		var moved int
		var ferr error
		err := w.rc.Read(func(fd uintptr) bool {
			var done bool
			moved, ferr, done = ss.recvBody(int(fd), n, w.rbuf)
			return done
		})
		if err == nil {
			err = ferr
		}
		if err != nil {
			return err
		}
		n -= moved
	}
	w.hdrOnly = length >= inlineMin
	return nil
}

func newCombiner(c net.Conn, max int) *combiner {
	w := &combiner{Conn: c, max: max, done: make(chan struct{})}
	w.cond.L = &w.mu
	go w.flush()
	return w
}

// maxContended caps combiner.contended.
const maxContended = 8

// inlineMin is the smallest data frame body written inline (see combiner).
const inlineMin = 16 << 10

// yamux frame header: version, type, flags(2), stream(4), length(4).
const yamuxHeaderSize = 12

func isDataHeader(p []byte) bool {
	return len(p) == yamuxHeaderSize && p[1] == 0 && (p[8]|p[9]|p[10]|p[11]) != 0
}

func (w *combiner) Write(p []byte) (int, error) {
	w.mu.Lock()
	if w.wantBody && len(p) >= inlineMin {
		// A large body: written with what is queued (its header last)
		// in one writev once no write is in progress, never copied.
		for w.dead() == nil && w.writing {
			w.wait()
		}
		if w.err == nil && !w.closed {
			return w.writeInline(p)
		}
	}
	for w.dead() == nil && len(w.pending) > 0 && len(w.pending)+len(p) > w.max {
		if w.hold {
			// The flusher is idle, waiting for this body: let it send
			// the header alone, or nobody makes room.
			w.hold = false
			w.cond.Broadcast()
		}
		w.wait()
	}
	if err := w.dead(); err != nil {
		w.mu.Unlock()
		return 0, err
	}
	w.pending = append(w.pending, p...)
	switch {
	case w.wantBody:
		// p is the body of the data header before it, even if it looks
		// like a header itself.
		w.wantBody, w.hold = false, false
		w.cond.Broadcast()
	case isDataHeader(p):
		w.wantBody, w.hold = true, true
	default:
		w.cond.Broadcast()
	}
	w.mu.Unlock()
	return len(p), nil
}

// writeInline writes what is queued (ending with the data header held
// for p) and p, in one writev on a TCP socket, without copying p and
// without waking the flusher. Called with mu held and no write in
// progress; returns with mu released.
func (w *combiner) writeInline(p []byte) (int, error) {
	buf := w.takePending()
	w.wantBody, w.hold = false, false
	w.bufs = append(w.bufs[:0], buf, p)
	w.writing = true
	bufs := w.bufs
	w.mu.Unlock()

	_, err := bufs.WriteTo(w.Conn)
	if err = w.endWrite(buf, err); err != nil {
		return 0, err
	}
	return len(p), nil
}

// takePending hands the queue to a writer and starts a new one in the
// spare buffer (recycle gives the written one back). Called with mu held.
func (w *combiner) takePending() []byte {
	buf := w.pending
	w.pending, w.spare = w.spare[:0], nil
	return buf
}

// recycle keeps a written queue buffer for the next one, unless it grew
// too large. Called with mu held.
func (w *combiner) recycle(buf []byte) {
	if cap(buf) <= 2*w.max {
		w.spare = buf[:0]
	} else {
		w.spare = nil
	}
}

func (w *combiner) flush() {
	defer close(w.done)
	w.mu.Lock()
	for {
		for (len(w.pending) == 0 || w.hold || w.writing) && !w.closed && w.err == nil {
			w.cond.Wait()
		}
		if w.writing { // closed while an inline write runs: let it finish
			w.cond.Wait()
			continue
		}
		if w.err != nil || (w.closed && len(w.pending) == 0) {
			w.mu.Unlock()
			return
		}
		buf := w.takePending()
		w.writing = true
		w.cond.Broadcast() // writers waiting for room
		w.mu.Unlock()

		_, err := w.Conn.Write(buf)

		w.mu.Lock()
		w.writing = false
		w.recycle(buf)
		if err != nil {
			w.err = err
		}
		w.cond.Broadcast() // a large body waiting for the socket; writers after an error
	}
}

// queueFrame queues a frame of this package's own (a spliced frame's
// credit or end marker), never between a yamux data header and its body.
func (w *combiner) queueFrame(p []byte) { _ = w.queueFrameErr(p) }

// queueFrameErr is queueFrame, reporting a dead connection.
func (w *combiner) queueFrameErr(p []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for w.dead() == nil && w.wantBody {
		w.wait()
	}
	if err := w.dead(); err != nil {
		return err
	}
	w.pending = append(w.pending, p...)
	w.cond.Broadcast()
	return nil
}

// writeDirect writes the frame p (a spliced frame's header and body)
// from the caller's goroutine when nothing is being written or queued
// (no hand-off to the flusher: the latency of a small request), and when
// it is large (inlineMin and up: uncopied, after what is queued); else it
// queues a copy, which the flusher sends with whatever accumulates while
// the current write is in the kernel.
func (w *combiner) writeDirect(p []byte) error {
	w.mu.Lock()
	large := len(p) >= inlineMin
	for w.dead() == nil && (w.wantBody || large && w.writing ||
		!large && len(w.pending) > 0 && len(w.pending)+len(p) > w.max) {
		w.wait()
	}
	if err := w.dead(); err != nil {
		w.mu.Unlock()
		return err
	}
	switch {
	case large && !w.writing:
		_, err := w.writeInline(p)
		return err
	case !w.writing && len(w.pending) == 0 && w.contended > 0:
		return w.writeYielding(p)
	case !w.writing && len(w.pending) == 0:
		_, err := w.writeInline(p)
		return err
	}
	if w.writing && w.contended < maxContended { // another's write is in progress
		w.contended++
	}
	w.pending = append(w.pending, p...)
	w.cond.Broadcast()
	w.mu.Unlock()
	return nil
}

// writeYielding writes the small frame p from the caller, with whatever
// other goroutines queue while it yields the processor once first: when
// others are ready to run (many connections at once), their frames share
// this write. It is used only while frames keep finding a write in
// progress (contended); yields that gather nothing wind that down, so a
// lone connection writes at once. Called with mu held, nothing queued and no
// write in progress; returns with mu released.
func (w *combiner) writeYielding(p []byte) error {
	w.pending = append(w.pending, p...)
	w.writing = true
	w.mu.Unlock()
	runtime.Gosched()
	w.mu.Lock()
	buf := w.takePending()
	w.hold = false          // a yamux data header may end buf: its body follows
	if len(buf) == len(p) { // gathered nothing
		w.contended--
	}
	w.mu.Unlock()

	_, err := w.Conn.Write(buf)
	return w.endWrite(buf, err)
}

// writeSpliced writes what is queued, then hdr, then n bytes from the
// pipe p, with nothing in between; the pipe holds exactly n bytes.
func (w *combiner) writeSpliced(hdr []byte, p int, n int) error {
	w.mu.Lock()
	for w.dead() == nil && (w.writing || w.wantBody) {
		w.wait()
	}
	if err := w.dead(); err != nil {
		w.mu.Unlock()
		return err
	}
	w.pending = append(w.pending, hdr...)
	buf := w.takePending()
	w.hold = false
	w.writing = true
	w.mu.Unlock()

	return w.endWrite(buf, w.sendSpliced(buf, p, n))
}

// sendSpliced writes buf (MSG_MORE: the body follows) and splices n bytes
// from pipe p to the socket.
func (w *combiner) sendSpliced(buf []byte, p int, n int) error {
	var serr error
	err := w.rc.Write(func(fd uintptr) bool {
		for len(buf) > 0 {
			m, err := unix.SendmsgN(int(fd), buf, nil, nil, unix.MSG_MORE)
			switch err {
			case nil:
				buf = buf[m:]
			case syscall.EINTR:
			case syscall.EAGAIN:
				return false
			default:
				serr = err
				return true
			}
		}
		for n > 0 {
			m, err, done := spliceNB(p, int(fd), n)
			switch {
			case !done:
				return false
			case err != nil:
				serr = err
				return true
			}
			n -= int(m)
		}
		return true
	})
	if err == nil {
		err = serr
	}
	return err
}

// closeFlushTimeout bounds how long Close spends writing what is queued.
const closeFlushTimeout = time.Second

// Close writes what is queued (a last control message, such as a
// refusal, must reach the peer), for at most closeFlushTimeout, then
// closes the connection and stops the flusher.
func (w *combiner) Close() error {
	w.mu.Lock()
	w.closed = true
	w.cond.Broadcast()
	w.mu.Unlock()
	_ = w.Conn.SetWriteDeadline(time.Now().Add(closeFlushTimeout))
	<-w.done
	return w.Conn.Close()
}
