package tunnel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// readN reads exactly n bytes from c within d.
func readN(t *testing.T, c net.Conn, n int, d time.Duration) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(d))
	defer c.SetReadDeadline(time.Time{})
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

// warmUp sends one control frame through w and reads it at b, so that the
// flusher has run and is parked waiting for work, as in a live session.
func warmUp(t *testing.T, w *combiner, b net.Conn) {
	t.Helper()
	ping := yamuxHeader(2, 0, 1)
	if _, err := w.Write(ping); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, b, len(ping), 2*time.Second); !bytes.Equal(got, ping) {
		t.Fatalf("warm-up: got %x", got)
	}
}

func yamuxHeader(typ byte, stream, length uint32) []byte {
	h := []byte{0, typ, 0, 0}
	h = binary.BigEndian.AppendUint32(h, stream)
	return binary.BigEndian.AppendUint32(h, length)
}

func TestCombinerConcurrentWriters(t *testing.T) {
	a, b := tcpPair(t)
	w := newCombiner(a, 4096)
	defer w.Close()

	const writers, perWriter = 16, 400
	// A frame: writer(2) seq(4) len(2) payload(len), payload bytes derived
	// from writer and seq. Lengths avoid 12 bytes, which the combiner
	// treats as a yamux data header awaiting its body.
	payload := func(id, seq int) []byte {
		n := 5 + (id*7919+seq*104729)%700
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(id + seq + i)
		}
		return p
	}
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for id := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := range perWriter {
				p := payload(id, seq)
				f := binary.BigEndian.AppendUint16(nil, uint16(id))
				f = binary.BigEndian.AppendUint32(f, uint32(seq))
				f = binary.BigEndian.AppendUint16(f, uint16(len(p)))
				f = append(f, p...)
				if n, err := w.Write(f); err != nil || n != len(f) {
					errs <- fmt.Errorf("writer %d: Write = %d, %v", id, n, err)
					return
				}
			}
		}()
	}

	next := make([]int, writers)
	_ = b.SetReadDeadline(time.Now().Add(20 * time.Second))
	for total := 0; total < writers*perWriter; total++ {
		var hdr [8]byte
		if _, err := io.ReadFull(b, hdr[:]); err != nil {
			t.Fatalf("after %d frames: %v", total, err)
		}
		id := int(binary.BigEndian.Uint16(hdr[:]))
		seq := int(binary.BigEndian.Uint32(hdr[2:]))
		n := int(binary.BigEndian.Uint16(hdr[6:]))
		if id >= writers {
			t.Fatalf("frame %d: corrupt writer id %d", total, id)
		}
		if seq != next[id] {
			t.Fatalf("writer %d: got seq %d, want %d", id, seq, next[id])
		}
		next[id]++
		p := make([]byte, n)
		if _, err := io.ReadFull(b, p); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(p, payload(id, seq)) {
			t.Fatalf("writer %d seq %d: payload corrupted", id, seq)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// A yamux data frame is a header write then a body write; the header is
// held for its body, and the pair goes out together.
func TestCombinerDataFrame(t *testing.T) {
	a, b := tcpPair(t)
	w := newCombiner(a, 1024)
	defer w.Close()
	warmUp(t, w, b)
	hdr := yamuxHeader(0, 1, 5)
	if _, err := w.Write(hdr); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	got := readN(t, b, len(hdr)+5, 2*time.Second)
	if !bytes.Equal(got, append(hdr, "hello"...)) {
		t.Fatalf("got %x", got)
	}
}

// A 12-byte body that happens to look like a data header is still a body:
// it must be flushed at once, not held for a body of its own.
func TestCombinerBodyLooksLikeHeader(t *testing.T) {
	a, b := tcpPair(t)
	w := newCombiner(a, 1024)
	defer w.Close()
	warmUp(t, w, b)
	hdr := yamuxHeader(0, 1, 12)
	body := yamuxHeader(0, 0x41424344, 0x45464748) // 12 bytes, type 0, non-zero "length"
	if _, err := w.Write(hdr); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(body); err != nil {
		t.Fatal(err)
	}
	got := readN(t, b, 24, 2*time.Second)
	if !bytes.Equal(got, append(hdr, body...)) {
		t.Fatalf("got %x", got)
	}
}

// A body larger than the buffer behind a held header must not deadlock.
func TestCombinerBodyLargerThanBuffer(t *testing.T) {
	a, b := tcpPair(t)
	w := newCombiner(a, 1024)
	defer w.Close()
	warmUp(t, w, b)
	hdr := yamuxHeader(0, 1, 8192)
	body := bytes.Repeat([]byte("x"), 8192)
	done := make(chan error, 1)
	go func() {
		if _, err := w.Write(hdr); err != nil {
			done <- err
			return
		}
		_, err := w.Write(body)
		done <- err
	}()
	got := readN(t, b, len(hdr)+len(body), 5*time.Second)
	if !bytes.Equal(got, append(hdr, body...)) {
		t.Fatal("data corrupted")
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A control frame (window update, ping, go away) goes out without waiting.
func TestCombinerControlFrame(t *testing.T) {
	a, b := tcpPair(t)
	w := newCombiner(a, 1024)
	defer w.Close()
	for _, h := range [][]byte{yamuxHeader(1, 1, 65536), yamuxHeader(2, 0, 7), yamuxHeader(0, 3, 0)} {
		if _, err := w.Write(h); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, b, len(h), 2*time.Second); !bytes.Equal(got, h) {
			t.Fatalf("got %x, want %x", got, h)
		}
	}
}

// failConn fails every write after the first n bytes.
type failConn struct {
	net.Conn
	err     error
	allowed atomic.Int64
}

func (c *failConn) Write(p []byte) (int, error) {
	if c.allowed.Add(-int64(len(p))) < 0 {
		return 0, c.err
	}
	return c.Conn.Write(p)
}

func TestCombinerStickyError(t *testing.T) {
	a, _ := tcpPair(t)
	boom := errors.New("boom")
	fc := &failConn{Conn: a, err: boom}
	fc.allowed.Store(10)
	w := newCombiner(fc, 1024)
	if _, err := w.Write([]byte("0123456789")); err != nil {
		t.Fatalf("first write: %v", err)
	}
	// The flusher's failure surfaces on a later Write, and stays.
	testutil.Eventually(t, 5*time.Second, "the write error", func() bool {
		_, err := w.Write([]byte("more"))
		return err != nil
	})
	for range 3 {
		if _, err := w.Write([]byte("again")); !errors.Is(err, boom) {
			t.Fatalf("Write after failure = %v, want %v", err, boom)
		}
	}
	select {
	case <-w.done:
	case <-time.After(5 * time.Second):
		t.Fatal("flusher still running after a write error")
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
}

// stuckConn's Write blocks, like a socket whose peer stopped reading,
// until the connection is closed or its write deadline passes.
type stuckConn struct {
	net.Conn
	entered   chan struct{} // closed when a Write first blocks
	enterOnce sync.Once

	mu       sync.Mutex
	deadline time.Time
	kick     chan struct{} // closed when the deadline changes
	closed   chan struct{}
}

func newStuckConn(c net.Conn) *stuckConn {
	return &stuckConn{Conn: c, entered: make(chan struct{}), kick: make(chan struct{}), closed: make(chan struct{})}
}

func (c *stuckConn) Write(p []byte) (int, error) {
	c.enterOnce.Do(func() { close(c.entered) })
	for {
		c.mu.Lock()
		dl, kick := c.deadline, c.kick
		c.mu.Unlock()
		var timeout <-chan time.Time
		if !dl.IsZero() {
			timer := time.NewTimer(time.Until(dl))
			defer timer.Stop()
			timeout = timer.C
		}
		select {
		case <-c.closed:
			return 0, net.ErrClosed
		case <-timeout:
			return 0, os.ErrDeadlineExceeded
		case <-kick:
		}
	}
}

func (c *stuckConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deadline = t
	close(c.kick)
	c.kick = make(chan struct{})
	return nil
}

func (c *stuckConn) Close() error {
	select {
	case <-c.closed:
	default:
		close(c.closed)
	}
	return c.Conn.Close()
}

// Close returns, within its flush timeout, even while the flusher is
// stuck writing to a peer that stopped reading; the flusher exits, parked
// writers are released and later writes fail.
func TestCombinerCloseWhileStuck(t *testing.T) {
	a, _ := tcpPair(t)
	sc := newStuckConn(a)
	w := newCombiner(sc, 1024)
	// The flusher takes this write and gets stuck in the socket; the
	// writer has already returned.
	if _, err := w.Write(yamuxHeader(2, 0, 1)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sc.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the first write did not reach the socket")
	}
	// Fill the queue so that a writer is parked too.
	writerDone := make(chan error, 1)
	go func() {
		var err error
		for err == nil {
			_, err = w.Write(make([]byte, 512))
		}
		writerDone <- err
	}()
	testutil.Eventually(t, 5*time.Second, "the queue to fill", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		return len(w.pending) > 512
	})
	start := time.Now()
	closed := make(chan error, 1)
	go func() { closed <- w.Close() }()
	select {
	case err := <-writerDone:
		if !errors.Is(err, net.ErrClosed) && !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("parked writer got %v, want net.ErrClosed or the flush timeout", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("parked writer not released by Close")
	}
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close: %v", err)
		}
	case <-time.After(closeFlushTimeout + 5*time.Second):
		t.Fatal("Close blocked")
	}
	if took := time.Since(start); took < closeFlushTimeout/2 {
		t.Errorf("Close returned after %v without trying to flush", took)
	}
	select {
	case <-w.done:
	default:
		t.Fatal("flusher still running after Close")
	}
	// The failed flush is the sticky error now.
	if _, err := w.Write([]byte("x")); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Write after Close = %v, want the flush timeout", err)
	}
}

// Close writes what is queued before it closes: a last message (such as
// a refusal) reaches the peer.
func TestCombinerCloseFlushes(t *testing.T) {
	a, b := tcpPair(t)
	w := newCombiner(a, 64<<10)
	type res struct {
		n   int64
		err error
	}
	got := make(chan res, 1)
	go func() {
		_ = b.SetReadDeadline(time.Now().Add(20 * time.Second))
		n, err := io.Copy(io.Discard, b)
		got <- res{n, err}
	}()
	var sent int64
	msg := bytes.Repeat([]byte("m"), 1000)
	for range 2000 {
		n, err := w.Write(msg)
		if err != nil {
			t.Fatal(err)
		}
		sent += int64(n)
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := w.Write(msg); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write after Close = %v, want net.ErrClosed", err)
	}
	r := <-got
	if r.err != nil || r.n != sent {
		t.Fatalf("peer read %d bytes (%v), %d were written", r.n, r.err, sent)
	}
}

// gateConn counts writes and holds the first one until released.
type gateConn struct {
	net.Conn
	entered chan struct{}
	release chan struct{}
	writes  atomic.Int32
}

func (c *gateConn) Write(p []byte) (int, error) {
	if c.writes.Add(1) == 1 {
		close(c.entered)
		<-c.release
	}
	return c.Conn.Write(p)
}

// Frames written while the flusher is in the kernel go out together in
// its next write: the writers do not wait for the socket, and ten data
// frames cost one more syscall, not ten.
func TestCombinerBatchesWhileWriting(t *testing.T) {
	a, b := tcpPair(t)
	gc := &gateConn{Conn: a, entered: make(chan struct{}), release: make(chan struct{})}
	w := newCombiner(gc, 64<<10)
	defer w.Close()
	first := yamuxHeader(2, 0, 1)
	if _, err := w.Write(first); err != nil {
		t.Fatal(err)
	}
	select {
	case <-gc.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the flusher did not write")
	}
	var want []byte
	for i := range 10 {
		body := bytes.Repeat([]byte{byte('a' + i)}, 100)
		hdr := yamuxHeader(0, uint32(i+1), uint32(len(body)))
		if _, err := w.Write(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(body); err != nil { // returns although the socket is blocked
			t.Fatal(err)
		}
		want = append(append(want, hdr...), body...)
	}
	close(gc.release)
	got := readN(t, b, len(first)+len(want), 5*time.Second)
	if !bytes.Equal(got, append(first, want...)) {
		t.Fatal("frames corrupted or reordered")
	}
	if n := gc.writes.Load(); n != 2 {
		t.Fatalf("%d writes to the socket, want 2 (the blocked one, then one for all ten frames)", n)
	}
}

// The combiner never keeps the caller's slice: yamux reuses its body
// buffer as soon as Write returns. Small bodies are copied into the queue,
// large ones written before Write returns.
func TestCombinerDoesNotRetainBody(t *testing.T) {
	for _, size := range []int{100, inlineMin, 4 * inlineMin, 1 << 20} { // the last larger than the queue
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			a, b := tcpPair(t)
			w := newCombiner(a, 256<<10)
			defer w.Close()
			warmUp(t, w, b)
			body := bytes.Repeat([]byte("x"), size)
			hdr := yamuxHeader(0, 1, uint32(size))
			if _, err := w.Write(hdr); err != nil {
				t.Fatal(err)
			}
			if _, err := w.Write(body); err != nil {
				t.Fatal(err)
			}
			for i := range body {
				body[i] = 'y'
			}
			got := readN(t, b, len(hdr)+size, 5*time.Second)
			if !bytes.Equal(got[len(hdr):], bytes.Repeat([]byte("x"), size)) {
				t.Fatal("the body changed after Write returned")
			}
		})
	}
}

// recordConn records the size of each write.
type recordConn struct {
	net.Conn
	mu     sync.Mutex
	writes []int
}

func (c *recordConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.writes = append(c.writes, len(p))
	c.mu.Unlock()
	return c.Conn.Write(p)
}

// Over a connection without writev (TLS), a small data frame goes out as
// one write, header and body together (one record sequence, not a 12-byte
// record of its own); a large one as two writes, its body not copied.
func TestCombinerWithoutWritev(t *testing.T) {
	a, b := tcpPair(t)
	rc := &recordConn{Conn: a}
	w := newCombiner(rc, 256<<10)
	defer w.Close()
	warmUp(t, w, b)
	for _, size := range []int{100, 4 * inlineMin} {
		body := bytes.Repeat([]byte("z"), size)
		hdr := yamuxHeader(0, 1, uint32(size))
		if _, err := w.Write(hdr); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Write(body); err != nil {
			t.Fatal(err)
		}
		readN(t, b, len(hdr)+len(body), 5*time.Second)
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if want := []int{12, 12 + 100, 12, 4 * inlineMin}; fmt.Sprint(rc.writes) != fmt.Sprint(want) {
		t.Fatalf("writes %v, want %v (warm-up, the small frame in one write, the large one as header then body)", rc.writes, want)
	}
}

// One writer, as yamux's send loop: control frames, small and large data
// frames (one larger than the queue) go out complete and in order.
func TestCombinerMixedFramesInOrder(t *testing.T) {
	a, b := tcpPair(t)
	w := newCombiner(a, 64<<10)
	defer w.Close()
	var writes [][]byte
	for i, size := range []int{0, 100, 1 << 20, 0, 20 << 10, 7, 200 << 10, 0} {
		if size == 0 {
			writes = append(writes, yamuxHeader(1, uint32(i), 4096)) // a window update
			continue
		}
		writes = append(writes, yamuxHeader(0, uint32(i), uint32(size)), bytes.Repeat([]byte{byte(i)}, size))
	}
	done := make(chan error, 1)
	go func() {
		for _, p := range writes {
			if _, err := w.Write(p); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	want := bytes.Join(writes, nil)
	if got := readN(t, b, len(want), 10*time.Second); !bytes.Equal(got, want) {
		t.Fatal("frames corrupted or reordered")
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A small spliced frame is written from its caller at once when nothing
// is in progress; one that finds a write in progress is queued (the caller
// does not wait) and counts as contention, after which an idle frame
// yields once to gather others, until yields gather nothing.
func TestCombinerDirectFrames(t *testing.T) {
	a, b := tcpPair(t)
	gc := &gateConn{Conn: a, entered: make(chan struct{}), release: make(chan struct{})}
	w := newCombiner(gc, 64<<10)
	defer w.Close()
	frame := func(i int) []byte {
		return append(spliceHeader(typeData, flagSplice, uint32(i), 5), fmt.Sprintf("msg%02d", i)...)
	}
	first := make(chan error, 1)
	go func() { first <- w.writeDirect(frame(1)) }() // inline, held in the socket
	select {
	case <-gc.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the first frame was not written from its caller")
	}
	var want []byte
	for i := 2; i <= 4; i++ {
		if err := w.writeDirect(frame(i)); err != nil { // queued: returns although the socket is held
			t.Fatal(err)
		}
		want = append(want, frame(i)...)
	}
	w.mu.Lock()
	contended := w.contended
	w.mu.Unlock()
	if contended != 3 {
		t.Fatalf("contended = %d after three frames found a write in progress, want 3", contended)
	}
	close(gc.release)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	got := readN(t, b, len(frame(1))+len(want), 5*time.Second)
	if !bytes.Equal(got, append(frame(1), want...)) {
		t.Fatal("frames corrupted or reordered")
	}
	// Idle again: each lone frame yields, gathers nothing and winds the
	// count down; then frames go out at once without yielding.
	for i := 5; i <= 9; i++ {
		if err := w.writeDirect(frame(i)); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, b, len(frame(i)), 5*time.Second); !bytes.Equal(got, frame(i)) {
			t.Fatalf("frame %d: got %q", i, got)
		}
	}
	w.mu.Lock()
	contended = w.contended
	w.mu.Unlock()
	if contended != 0 {
		t.Fatalf("contended = %d after lone frames, want 0", contended)
	}
}
