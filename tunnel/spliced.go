package tunnel

import (
	"encoding/binary"
	"fmt"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/vpcreach/vpcreach/internal/netx"
)

// Spliced frames (spec.md, "Spliced data frames"). On a plain TCP tunnel
// whose two ends both announced it in the handshake, a bulk stream's
// bytes move between the sockets with splice(2) and never pass through
// user space: the sender splices the user socket into a pipe and the pipe
// into the tunnel behind a frame header; the receiver's reader (the
// combiner, below yamux) splices the frame body from the tunnel into the
// stream's pipe, and the stream's copy loop splices that pipe into the
// user socket. Small reads go out as frames written from the stream's own
// goroutine (at once when the socket is idle, else queued for the
// flusher) and come in through pooled buffers: no hand-off through
// yamux's send and receive loops, which is most of a small request's
// latency through yamux. yamux never sees these frames: they carry
// flagSplice, and the combiner takes them out of what it hands to yamux.
// A stream carries spliced frames when the server's stream header says so
// (kind 2); both ends prepare the stream before the peer can send on it.
// Flow control is their own: each end starts with the window the other
// announced in the handshake and grants more (a window update frame with
// flagSplice) as it drains, so a slow user socket never blocks the
// tunnel's reader: what the pipe cannot hold is read into pooled buffers,
// bounded by the window.
const (
	flagSplice      = 0x8000 // a spliced data frame or a credit (window update)
	flagSpliceEOF   = 0x4000 // with flagSplice, length 0: the direction ended cleanly
	flagSpliceAbort = 0x2000 // with flagSplice, length 0: the direction was reset
	typeData        = 0
	typeWindow      = 1
	yamuxFlagFIN    = 0x4
	yamuxFlagRST    = 0x8

	// pipeSize is the capacity asked of each pipe (the default limit for
	// unprivileged processes, fs.pipe-max-size).
	pipeSize = 1 << 20
)

// ErrSpliceWindow is the error of a peer that sent more spliced bytes on a
// stream than it was granted.
var ErrSpliceWindow = fmt.Errorf("%w: spliced frame beyond the granted window", ErrProtocol)

// spliceHeader is the 12-byte yamux-shaped header of a spliced frame.
func spliceHeader(typ byte, flags uint16, id uint32, length uint32) []byte {
	var h [yamuxHeaderSize]byte
	h[1] = typ
	binary.BigEndian.PutUint16(h[2:], flags)
	binary.BigEndian.PutUint32(h[4:], id)
	binary.BigEndian.PutUint32(h[8:], length)
	return h[:]
}

// pipe is a kernel pipe, both ends non-blocking.
type pipe struct{ r, w int }

func newPipe() (pipe, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		return pipe{-1, -1}, err
	}
	_, _ = unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, pipeSize) // best effort
	return pipe{p[0], p[1]}, nil
}

func (p *pipe) ok() bool { return p.r >= 0 }

func (p *pipe) close() {
	if p.r >= 0 {
		_ = unix.Close(p.r)
		_ = unix.Close(p.w)
	}
	p.r, p.w = -1, -1
}

// spliceTable holds the streams of one session that take spliced frames.
type spliceTable struct {
	window     uint32 // what this side grants a stream
	peerWindow uint32 // what the peer grants a stream at its start

	mu   sync.Mutex
	m    map[uint32]*splicedStream
	dead bool // the session's reader has failed: no more registrations
}

func newSpliceTable(window, peerWindow uint32) *spliceTable {
	return &spliceTable{window: window, peerWindow: peerWindow, m: map[uint32]*splicedStream{}}
}

// register adds the stream id, with the credit both ways of a new
// stream; nil if the session is gone.
func (t *spliceTable) register(id uint32, c *combiner) *splicedStream {
	ss := &splicedStream{id: id, c: c, window: t.window, spipe: pipe{-1, -1}, rpipe: pipe{-1, -1},
		credit: int64(t.peerWindow), rwin: int64(t.window)}
	ss.scond.L = &ss.smu
	ss.rcond.L = &ss.rmu
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.dead {
		return nil
	}
	t.m[id] = ss
	return ss
}

func (t *spliceTable) get(id uint32) *splicedStream {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.m[id]
}

func (t *spliceTable) remove(ss *splicedStream) {
	t.mu.Lock()
	if t.m[ss.id] == ss {
		delete(t.m, ss.id)
	}
	t.mu.Unlock()
}

// endAll marks every stream's peer gone: the session's reader failed.
func (t *spliceTable) endAll() {
	t.mu.Lock()
	t.dead = true
	all := make([]*splicedStream, 0, len(t.m))
	for _, ss := range t.m {
		all = append(all, ss)
	}
	t.mu.Unlock()
	for _, ss := range all {
		ss.peerEnded()
	}
}

// Segment kinds of a stream's receive queue.
const (
	segPipe  = iota // n bytes in the stream's pipe
	segHeap         // bytes in a pooled buffer (the pipe was full)
	segEOF          // the peer's direction ended cleanly
	segAbort        // the peer's direction was reset
)

type segment struct {
	kind int
	n    int // segPipe, segHeap: bytes left
	bp   *[]byte
	off  int
}

// splicedStream is the spliced state of one stream: the send side (used
// by the splice's up loop), the receive queue (filled by the combiner's
// reader, drained by the down loop) and the credit both ways.
type splicedStream struct {
	id     uint32
	c      *combiner
	window uint32

	smu    sync.Mutex
	scond  sync.Cond
	credit int64 // bytes the peer lets us send
	sstop  bool
	sdead  bool // the peer ended the stream: no credit comes any more
	spipe  pipe // owned by the up loop

	rmu     sync.Mutex
	rcond   sync.Cond
	rpipe   pipe // created by the reader at the first large spliced body
	segs    []segment
	rwin    int64  // bytes the peer may still send (granted, not received)
	drained uint32 // bytes gone to the user, not yet granted back
	ended   bool   // the peer's stream ended (FIN, RST, session failure)
	rstop   bool   // the local splice is over: drop what arrives
	// The splice's user side, once it runs (attach): the reader writes
	// a small body straight to the user when nothing is queued before it.
	deliver   func(p []byte) int // a non-blocking write; bytes written
	idle      *netx.Idle
	counters  *Counters
	delivered int64 // bytes the reader wrote to the user
}

// attach gives the reader the splice's user side.
func (ss *splicedStream) attach(deliver func([]byte) int, idle *netx.Idle, c *Counters) {
	ss.rmu.Lock()
	ss.deliver, ss.idle, ss.counters = deliver, idle, c
	ss.rmu.Unlock()
}

// drain records m bytes gone to the user and returns the credit to grant
// back now (0: not yet, a quarter window at a time). Called with rmu held.
func (ss *splicedStream) drain(m int) uint32 {
	ss.drained += uint32(m)
	if ss.drained < ss.window/4 {
		return 0
	}
	d := ss.drained
	ss.drained = 0
	return d
}

// grantCredit adds delta to what this side may send (the peer's grant).
func (ss *splicedStream) grantCredit(delta uint32) {
	ss.smu.Lock()
	ss.credit += int64(delta)
	ss.scond.Broadcast()
	ss.smu.Unlock()
}

// waitCredit blocks until some credit is there; 0 once stopped, or once
// the peer ended the stream and the credit is spent.
func (ss *splicedStream) waitCredit() int64 {
	ss.smu.Lock()
	defer ss.smu.Unlock()
	for ss.credit <= 0 && !ss.sstop && !ss.sdead {
		ss.scond.Wait()
	}
	if ss.sstop || ss.credit <= 0 {
		return 0
	}
	return ss.credit
}

func (ss *splicedStream) spend(n int) {
	ss.smu.Lock()
	ss.credit -= int64(n)
	ss.smu.Unlock()
}

// grant sends the peer delta bytes of credit and opens the receive
// window by as much.
func (ss *splicedStream) grant(delta uint32) {
	ss.rmu.Lock()
	ss.rwin += int64(delta)
	ss.rmu.Unlock()
	ss.c.queueFrame(spliceHeader(typeWindow, flagSplice, ss.id, delta))
}

// stop wakes both loops for good (an abort, or the end of the splice).
func (ss *splicedStream) stop() { ss.set(&ss.sstop, &ss.rstop) }

// peerEnded records that the peer's end of the stream is gone (FIN, RST
// or a failed session): the receive queue ends after what it holds, and
// a sender waiting for credit gives up.
func (ss *splicedStream) peerEnded() { ss.set(&ss.sdead, &ss.ended) }

// set sets a flag of the send side and one of the receive side, each
// under its lock, and wakes both loops.
func (ss *splicedStream) set(send, recv *bool) {
	ss.smu.Lock()
	*send = true
	ss.scond.Broadcast()
	ss.smu.Unlock()
	ss.rmu.Lock()
	*recv = true
	ss.rcond.Broadcast()
	ss.rmu.Unlock()
}

// release frees the stream's pipes and buffers; both loops are done.
func (ss *splicedStream) release(t *spliceTable) {
	t.remove(ss)
	ss.stop()
	ss.rmu.Lock()
	ss.rpipe.close()
	for _, s := range ss.segs {
		if s.bp != nil {
			netx.PutBuf(s.bp)
		}
	}
	ss.segs = nil
	ss.rmu.Unlock()
	ss.spipe.close()
}

// push appends a segment. Called with rmu held.
func (ss *splicedStream) push(s segment) {
	if s.kind == segPipe && len(ss.segs) > 0 && ss.segs[len(ss.segs)-1].kind == segPipe {
		ss.segs[len(ss.segs)-1].n += s.n
	} else {
		ss.segs = append(ss.segs, s)
	}
	ss.rcond.Broadcast()
}

// pushMarker queues an end or abort marker.
func (ss *splicedStream) pushMarker(kind int) {
	ss.rmu.Lock()
	if !ss.rstop {
		ss.push(segment{kind: kind})
	}
	ss.rmu.Unlock()
}

// pushBytes passes p (body bytes the reader had already read) to the
// user: written straight to the user socket when nothing is queued before
// it and the socket takes it (no hand-off to the splice's goroutine: the
// latency of a small request), else queued in pooled buffers.
func (ss *splicedStream) pushBytes(p []byte) {
	ss.rmu.Lock()
	if ss.rstop {
		ss.rmu.Unlock()
		return
	}
	var grant uint32
	if len(ss.segs) == 0 && ss.deliver != nil {
		if m := ss.deliver(p); m > 0 {
			p = p[m:]
			ss.delivered += int64(m)
			ss.idle.Touch()
			if ss.counters != nil {
				ss.counters.Down.Add(int64(m))
			}
			grant = ss.drain(m)
		}
	}
	ss.queueBytes(p)
	ss.rmu.Unlock()
	if grant > 0 {
		ss.grant(grant)
	}
}

// queueBytes queues p in pooled buffers. Called with rmu held.
func (ss *splicedStream) queueBytes(p []byte) {
	for len(p) > 0 {
		bp := netx.GetBufFor(len(p) > netx.BufSize)
		m := copy(*bp, p)
		ss.push(segment{kind: segHeap, n: m, bp: bp})
		p = p[m:]
	}
}

// ensurePipe creates the receive pipe if it is not there and reports
// whether there is one; without (no descriptors left) the bytes go to
// buffers. Called with rmu held.
func (ss *splicedStream) ensurePipe() bool {
	if !ss.rpipe.ok() {
		ss.rpipe, _ = newPipe()
	}
	return ss.rpipe.ok()
}

// take returns the head of the receive queue, waiting for one; ok is
// false once the splice stopped, or the peer ended with nothing queued.
func (ss *splicedStream) take() (s segment, ended, ok bool) {
	ss.rmu.Lock()
	defer ss.rmu.Unlock()
	for len(ss.segs) == 0 && !ss.ended && !ss.rstop {
		ss.rcond.Wait()
	}
	if ss.rstop {
		return segment{}, false, false
	}
	if len(ss.segs) == 0 {
		return segment{}, true, false
	}
	return ss.segs[0], false, true
}

// consumed records that m bytes of the head segment left for the user,
// and returns the credit to grant back now.
func (ss *splicedStream) consumed(m int) (grant uint32) {
	ss.rmu.Lock()
	defer ss.rmu.Unlock()
	if len(ss.segs) == 0 {
		return 0
	}
	if m > 0 {
		grant = ss.drain(m)
	}
	h := &ss.segs[0]
	h.n -= m
	h.off += m
	if h.n <= 0 || h.kind == segEOF || h.kind == segAbort {
		if h.bp != nil {
			netx.PutBuf(h.bp)
		}
		ss.segs[0] = segment{}
		ss.segs = ss.segs[1:]
		if len(ss.segs) == 0 {
			ss.segs = nil
		}
	}
	return grant
}

// recvBody moves n body bytes of a spliced frame from the tunnel socket
// fd: into the stream's pipe (a large body), or into pooled buffers (a
// small one, or when the pipe is full), or nowhere (a stream that is not
// or no longer registered). It runs on the session's reader (yamux's
// receive goroutine) and never blocks on the user side. Called from a
// RawConn.Read callback: done is false when the socket has nothing yet.
func (ss *splicedStream) recvBody(fd int, n int, scratch []byte) (moved int, err error, done bool) {
	if ss != nil {
		ss.rmu.Lock()
		defer ss.rmu.Unlock()
	}
	if ss == nil || ss.rstop {
		if n > len(scratch) {
			n = len(scratch)
		}
		return readResult(readNB(fd, scratch[:n]))
	}
	if n >= inlineMin && ss.ensurePipe() {
		m, err, done := spliceNB(fd, ss.rpipe.w, n)
		switch {
		case done && err == nil && m > 0:
			ss.push(segment{kind: segPipe, n: int(m)})
			return int(m), nil, true
		case done && err == nil:
			return 0, errEOFTunnel, true
		case done:
			return 0, err, true
		}
		if ready, _ := netx.Peek(uintptr(fd)); !ready { // the socket is empty, not the pipe full
			return 0, nil, false
		}
	}
	bp := netx.GetBufFor(n > netx.BufSize)
	if n > len(*bp) {
		n = len(*bp)
	}
	moved, err, done = readResult(readNB(fd, (*bp)[:n]))
	if moved > 0 {
		ss.push(segment{kind: segHeap, n: moved, bp: bp})
	} else {
		netx.PutBuf(bp)
	}
	return moved, err, done
}

var errEOFTunnel = fmt.Errorf("%w: tunnel ended inside a spliced frame", ErrProtocol)

// readNB is one non-blocking read(2), EINTR retried.
func readNB(fd int, b []byte) (int, error) {
	for {
		m, err := unix.Read(fd, b)
		if err != syscall.EINTR {
			return m, err
		}
	}
}

// readResult turns a non-blocking read into recvBody's results: done is
// false when there was nothing to read (EAGAIN: wait for the socket).
func readResult(m int, err error) (int, error, bool) {
	switch {
	case err == syscall.EAGAIN:
		return 0, nil, false
	case err != nil:
		return 0, err, true
	case m == 0:
		return 0, errEOFTunnel, true
	}
	return m, nil, true
}

// checkWindow takes n bytes off what the peer may still send.
func (ss *splicedStream) checkWindow(n int) error {
	if ss == nil {
		return nil
	}
	ss.rmu.Lock()
	defer ss.rmu.Unlock()
	if ss.rstop {
		return nil // dropped anyway
	}
	if int64(n) > ss.rwin {
		return ErrSpliceWindow
	}
	ss.rwin -= int64(n)
	return nil
}
