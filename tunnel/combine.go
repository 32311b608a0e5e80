package tunnel

import (
	"net"
	"sync"
	"time"
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
	bufs     net.Buffers
	done     chan struct{}

	// Read side, used only by yamux's receive goroutine.
	rbuf       []byte
	rpos, rlen int
}

// readBufSize is the read-ahead of the tunnel socket. yamux reads through
// a 4 KiB bufio.Reader; serving it from a larger buffer brings in many
// frames per syscall.
const readBufSize = 64 << 10

// Read serves yamux's reader from the read-ahead buffer.
func (w *combiner) Read(p []byte) (int, error) {
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

func newCombiner(c net.Conn, max int) *combiner {
	w := &combiner{Conn: c, max: max, done: make(chan struct{})}
	w.cond.L = &w.mu
	go w.flush()
	return w
}

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
		for w.err == nil && !w.closed && w.writing {
			w.cond.Wait()
		}
		if w.err == nil && !w.closed {
			return w.writeInline(p)
		}
	}
	for w.err == nil && !w.closed && len(w.pending) > 0 && len(w.pending)+len(p) > w.max {
		if w.hold {
			// The flusher is idle, waiting for this body: let it send
			// the header alone, or nobody makes room.
			w.hold = false
			w.cond.Broadcast()
		}
		w.cond.Wait()
	}
	if w.err != nil || w.closed {
		err := w.err
		w.mu.Unlock()
		if err == nil {
			err = net.ErrClosed
		}
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
	buf := w.pending
	w.pending, w.spare = w.spare[:0], nil
	w.wantBody, w.hold = false, false
	w.bufs = append(w.bufs[:0], buf, p)
	w.writing = true
	bufs := w.bufs
	w.mu.Unlock()

	_, err := bufs.WriteTo(w.Conn)

	w.mu.Lock()
	w.writing = false
	w.recycle(buf)
	if err != nil && w.err == nil {
		w.err = err
	}
	err = w.err
	w.cond.Broadcast() // the flusher, if anything was queued meanwhile
	w.mu.Unlock()
	if err != nil {
		return 0, err
	}
	return len(p), nil
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
		buf := w.pending
		w.pending = w.spare[:0]
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
