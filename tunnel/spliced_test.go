package tunnel

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vpcreach/vpcreach/internal/netx"
)

// fr is a yamux-shaped frame: its header and body (the length is the body's).
func fr(typ byte, flags uint16, id uint32, body []byte) []byte {
	return append(spliceHeader(typ, flags, id, uint32(len(body))), body...)
}

// marker is a zero-length spliced data frame.
func marker(id uint32, flags uint16) []byte { return spliceHeader(typeData, flagSplice|flags, id, 0) }

// ping is a frame for yamux: once it is read, all before it was taken in.
var ping = spliceHeader(2, 0, 0, 7)

func randBytes(n int, seed byte) []byte {
	b := make([]byte, n)
	_, _ = rand.NewChaCha8([32]byte{seed}).Read(b)
	return b
}

func locked[T any](mu *sync.Mutex, f func() T) T {
	mu.Lock()
	defer mu.Unlock()
	return f()
}

// demuxPair returns a combiner taking spliced frames out of what it reads
// from a loopback connection, and the raw peer end of that connection.
func demuxPair(t testing.TB, ln *net.TCPListener) (*combiner, *net.TCPConn) {
	t.Helper()
	a, b := tcpPairOn(t, ln)
	c := DefaultSettings().newCombiner(a, 1, 1)
	t.Cleanup(func() { c.Close() })
	if c.splices == nil || c.rc == nil {
		t.Fatal("newCombiner(tcp, 1, 1) does not take spliced frames")
	}
	return c, b
}

// registered registers id on c and grants it win bytes of receive window
// (the credit frame goes to the peer, which ignores it).
func registered(t testing.TB, c *combiner, id, win uint32) *splicedStream {
	t.Helper()
	ss := c.splices.register(id, c)
	if ss == nil {
		t.Fatal("register: the table is dead")
	}
	t.Cleanup(func() { ss.release(c.splices) })
	ss.credit, ss.rwin = 0, 0 // from nothing: each test grants what it needs
	if win > 0 {
		ss.grant(win)
	}
	return ss
}

// sendRaw writes p to peer in the background, then half-closes it if eof;
// the writer is stopped and waited for at the end of the test.
func sendRaw(t testing.TB, peer *net.TCPConn, p []byte, eof bool) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		if _, err := peer.Write(p); err == nil && eof {
			_ = peer.CloseWrite()
		}
	}()
	t.Cleanup(func() { _ = peer.SetWriteDeadline(time.Now()); <-done })
}

// readDemuxed reads n bytes from c in reads of bufSize bytes, as yamux does.
func readDemuxed(t *testing.T, c *combiner, n, bufSize int) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, bufSize)
	var got []byte
	for len(got) < n {
		m, err := c.Read(buf)
		if got = append(got, buf[:m]...); err != nil {
			t.Fatalf("Read after %d of %d bytes: %v", len(got), n, err)
		}
	}
	return got
}

func equalBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if !bytes.Equal(got, want) {
		i := 0
		for i < min(len(got), len(want)) && got[i] == want[i] {
			i++
		}
		t.Fatalf("%s: got %d bytes, want %d, first difference at %d", what, len(got), len(want), i)
	}
}

// queued is what a receive queue held: the data in order, how much of it
// came through the pipe, the segment kinds, and the markers ("eof@offset").
type queued struct {
	data  []byte
	pipe  int
	kinds []int
	marks []string
}

func (q *queued) mark(kind int) {
	q.marks = append(q.marks, fmt.Sprintf("%s@%d", map[int]string{segEOF: "eof", segAbort: "abort"}[kind], len(q.data)))
}

// drainQueue empties ss's receive queue as downSpliced does, without
// waiting; the pipe must then be empty.
func drainQueue(t testing.TB, ss *splicedStream) queued {
	t.Helper()
	var q queued
	for locked(&ss.rmu, func() int { return len(ss.segs) }) > 0 {
		s, _, ok := ss.take()
		if !ok {
			t.Fatal("take: not ok with segments queued")
		}
		q.kinds = append(q.kinds, s.kind)
		switch s.kind {
		case segPipe:
			b := make([]byte, s.n)
			for off := 0; off < s.n; {
				m, err := unix.Read(ss.rpipe.r, b[off:])
				if err != nil || m <= 0 {
					t.Fatalf("pipe segment of %d bytes: read at %d: %d, %v", s.n, off, m, err)
				}
				off += m
			}
			q.data, q.pipe = append(q.data, b...), q.pipe+s.n
		case segHeap:
			q.data = append(q.data, (*s.bp)[s.off:s.off+s.n]...)
		default:
			q.mark(s.kind)
		}
		ss.consumed(s.n)
	}
	if ss.rpipe.ok() {
		pipeEmpty(t, ss.rpipe.r)
	}
	return q
}

func pipeEmpty(t testing.TB, fd int) {
	t.Helper()
	if m, err := unix.Read(fd, make([]byte, 1)); err != syscall.EAGAIN {
		t.Fatalf("the pipe holds bytes no segment accounts for: read %d, %v", m, err)
	}
}

// interleaved returns yamux frames of stream 3 around a spliced body and a
// spliced credit (1234) for stream 5: the raw bytes, what yamux must get
// out of them, and what stream 5 must receive.
func interleaved(bodyLen, tailLen int) (wire, yamux, body []byte) {
	body = randBytes(bodyLen, 1)
	data, tail := fr(typeData, 0, 3, []byte("hello")), fr(typeData, 0, 3, randBytes(tailLen, 2))
	win := spliceHeader(typeWindow, 0, 3, 1<<20)
	wire = slices.Concat(data, fr(typeData, flagSplice, 5, body), win, spliceHeader(typeWindow, flagSplice, 5, 1234), tail)
	return wire, slices.Concat(data, win, tail), body
}

func TestSplicedInterleaving(t *testing.T) {
	ln := listen(t)
	for _, bufSize := range []int{4096, 1 << 20} {
		t.Run(fmt.Sprintf("buf=%d", bufSize), func(t *testing.T) {
			c, peer := demuxPair(t, ln)
			ss := registered(t, c, 5, 256<<10)
			wire, yamux, body := interleaved(200<<10, 70<<10)
			sendRaw(t, peer, wire, false)
			equalBytes(t, "handed to yamux", readDemuxed(t, c, len(yamux), bufSize), yamux)
			equalBytes(t, "stream 5 received", drainQueue(t, ss).data, body)
			if got := locked(&ss.smu, func() int64 { return ss.credit }); got != 1234 {
				t.Errorf("send credit = %d, want 1234", got)
			}
			if ss.rwin != 56<<10 {
				t.Errorf("receive window left = %d, want %d", ss.rwin, 56<<10)
			}
		})
	}
}

// oneSlotPipe gives ss, before any frame, a receive pipe of one slot.
func oneSlotPipe(t testing.TB, ss *splicedStream) {
	t.Helper()
	p, err := newPipe()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.FcntlInt(uintptr(p.w), unix.F_SETPIPE_SZ, 4096); err != nil {
		p.close()
		t.Fatal(err)
	}
	ss.rpipe = p // released with ss
}

// A pipe's capacity counts slots, and a slot spliced from a loopback socket
// holds a whole skb fragment: 3 MiB fit in a "1 MiB" pipe. With the pipe cut
// to one slot, what it cannot take must go to heap segments, in order.
func TestSplicedOverflowToHeap(t *testing.T) {
	c, peer := demuxPair(t, listen(t))
	ss := registered(t, c, 5, 4<<20)
	oneSlotPipe(t, ss)
	var wire, body []byte
	for i := range 3 {
		b := randBytes(MaxDataFrame, byte(10+i))
		body, wire = append(body, b...), append(wire, fr(typeData, flagSplice, 5, b)...)
	}
	sendRaw(t, peer, append(wire, ping...), false)
	equalBytes(t, "handed to yamux", readDemuxed(t, c, len(ping), 4096), ping)
	q := drainQueue(t, ss)
	equalBytes(t, "stream 5 received", q.data, body)
	if q.pipe == 0 || !slices.Contains(q.kinds, segHeap) {
		t.Errorf("%d of %d bytes through the pipe; segments %v", q.pipe, len(body), q.kinds)
	}
}

func TestSplicedDropsUnregistered(t *testing.T) {
	ln := listen(t)
	for _, tc := range []struct {
		name string
		id   uint32
		n    int
		stop bool // stream 5's splice is over
	}{
		{"unregistered/1B", 7, 1, false},
		{"unregistered/4KiB", 7, 4 << 10, false},
		{"unregistered/100KiB", 7, 100 << 10, false},
		{"unregistered/1MiB", 7, MaxDataFrame, false},
		{"stopped/100KiB", 5, 100 << 10, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, peer := demuxPair(t, ln)
			ss := registered(t, c, 5, 0) // no window: a counted body is an error
			if tc.stop {
				ss.stop()
			}
			after := fr(typeData, 0, 3, []byte("after the dropped body"))
			sendRaw(t, peer, slices.Concat(fr(typeData, flagSplice, tc.id, randBytes(tc.n, 3)), after), false)
			equalBytes(t, "handed to yamux", readDemuxed(t, c, len(after), 4096), after)
			if n := locked(&ss.rmu, func() int { return len(ss.segs) }); n != 0 {
				t.Errorf("stream 5 queued %d segments", n)
			}
		})
	}
}

func TestSplicedProtocolErrors(t *testing.T) {
	ln := listen(t)
	truncated := func(id uint32) []byte {
		return append(spliceHeader(typeData, flagSplice, id, 1000), randBytes(10, 7)...)
	}
	for _, tc := range []struct {
		name string
		win  uint32
		wire []byte
		eof  bool  // the peer half-closes after wire
		want error // errors.Is
	}{
		{"beyond window", 100, fr(typeData, flagSplice, 5, randBytes(101, 5)), false, ErrSpliceWindow},
		{"window spent", 300, slices.Concat(fr(typeData, flagSplice, 5, randBytes(200, 5)), fr(typeData, flagSplice, 5, randBytes(101, 6))), false, ErrSpliceWindow},
		{"over MaxDataFrame", 4 << 20, spliceHeader(typeData, flagSplice, 5, MaxDataFrame+1), false, ErrProtocol},
		{"over MaxDataFrame, unregistered", 0, spliceHeader(typeData, flagSplice, 7, MaxDataFrame+1), false, ErrProtocol},
		{"truncated body", 4 << 20, truncated(5), true, ErrProtocol},
		{"truncated body, unregistered", 0, truncated(7), true, ErrProtocol},
		{"clean EOF", 0, nil, true, io.EOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, peer := demuxPair(t, ln)
			ss := registered(t, c, 5, tc.win)
			sendRaw(t, peer, append(slices.Clip(ping), tc.wire...), tc.eof)
			equalBytes(t, "handed to yamux", readDemuxed(t, c, len(ping), 4096), ping)
			n, err := c.Read(make([]byte, 4096))
			if n != 0 || !errors.Is(err, tc.want) || (tc.want != ErrSpliceWindow && errors.Is(err, ErrSpliceWindow)) {
				t.Fatalf("Read = %d, %v; want 0, %v", n, err, tc.want)
			}
			if !locked(&ss.rmu, func() bool { return ss.ended }) {
				t.Error("stream 5 not ended after the read error")
			}
			if c.splices.register(9, c) != nil {
				t.Error("register succeeded after the read error")
			}
		})
	}
}

func TestSplicedEndMarkers(t *testing.T) {
	ln := listen(t)
	fin, otherFIN := spliceHeader(typeWindow, yamuxFlagFIN, 5, 0), spliceHeader(typeWindow, yamuxFlagFIN, 3, 0)
	rst := fr(typeData, yamuxFlagRST, 5, []byte("xyz"))
	for _, tc := range []struct {
		name        string
		wire, yamux []byte
		marks       []string
		ended       bool
	}{
		{"eof", marker(5, flagSpliceEOF), nil, []string{"eof@0"}, false},
		{"abort", marker(5, flagSpliceAbort), nil, []string{"abort@0"}, false},
		{"eof after data", slices.Concat(fr(typeData, flagSplice, 5, []byte("abc")), marker(5, flagSpliceEOF)), nil, []string{"eof@3"}, false},
		{"no marker flag", marker(5, 0), nil, nil, false},
		{"other stream", marker(7, flagSpliceEOF), nil, nil, false},
		{"eof then FIN", slices.Concat(marker(5, flagSpliceEOF), fin), fin, []string{"eof@0"}, true},
		{"RST", rst, rst, nil, true},
		{"FIN of another stream", otherFIN, otherFIN, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, peer := demuxPair(t, ln)
			ss := registered(t, c, 5, 64)
			sendRaw(t, peer, slices.Concat(tc.wire, ping), false)
			want := slices.Concat(tc.yamux, ping)
			equalBytes(t, "handed to yamux", readDemuxed(t, c, len(want), 4096), want)
			// drainQueue takes the markers first, even when the stream ended.
			if got := drainQueue(t, ss).marks; !slices.Equal(got, tc.marks) {
				t.Errorf("markers %q, want %q", got, tc.marks)
			}
			if !tc.ended {
				if locked(&ss.rmu, func() bool { return ss.ended }) {
					t.Error("stream 5 ended")
				}
			} else if _, ended, ok := ss.take(); !ended || ok {
				t.Errorf("take on the empty queue: ended %v, ok %v; want true, false", ended, ok)
			}
		})
	}
}

func TestSplicedWriteOrder(t *testing.T) {
	ln := listen(t)
	for _, tc := range []struct {
		name       string
		n          int
		yamuxFirst bool // a yamux data header is queued, its body not yet
	}{
		{"1B", 1, false}, {"60KiB", 60 << 10, false}, {"512KiB", 512 << 10, false}, {"after a data header", 4 << 10, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, peer := demuxPair(t, ln)
			p, err := newPipe()
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.close)
			body := randBytes(tc.n, 8)
			if m, err := unix.Write(p.w, body); m != tc.n {
				t.Skipf("the pipe takes only %d of %d bytes: %v", m, tc.n, err)
			}
			credit, eof := spliceHeader(typeWindow, flagSplice, 5, 999), marker(7, flagSpliceEOF)
			c.queueFrame(credit)
			c.queueFrame(eof)
			want := slices.Concat(credit, eof)
			if tc.yamuxFirst {
				h := yamuxHeader(typeData, 3, 5)
				_, _ = c.Write(h)
				want = slices.Concat(want, h, []byte("hello"))
			}
			hdr := spliceHeader(typeData, flagSplice, 9, uint32(tc.n))
			done := make(chan error, 1)
			go func() { done <- c.writeSpliced(hdr, p.r, tc.n) }()
			if tc.yamuxFirst {
				_, _ = c.Write([]byte("hello")) // an error shows in what the peer gets
			}
			want = slices.Concat(want, hdr, body)
			equalBytes(t, "the peer received", readN(t, peer, len(want), 5*time.Second), want)
			if err := <-done; err != nil {
				t.Fatalf("writeSpliced: %v", err)
			}
			pipeEmpty(t, p.r)
		})
	}
}

// demuxModel is what readDemux must make of in, with stream 5 registered
// and granted win bytes: the bytes for yamux, what stream 5 receives, the
// credit its sender gets, and whether it ends in a protocol error (else
// in io.EOF).
func demuxModel(in []byte, win int64) (out []byte, q queued, credit int64, protoErr bool) {
	for len(in) >= yamuxHeaderSize {
		typ, flags := in[1], binary.BigEndian.Uint16(in[2:])
		id, n := binary.BigEndian.Uint32(in[4:]), int64(binary.BigEndian.Uint32(in[8:]))
		if flags&flagSplice == 0 || typ > typeWindow {
			if typ != typeData {
				n = 0
			}
			take := min(yamuxHeaderSize+n, int64(len(in)))
			out, in = append(out, in[:take]...), in[take:]
			continue
		}
		in = in[yamuxHeaderSize:]
		switch {
		case typ == typeWindow && id == 5:
			credit += n
		case typ == typeWindow, n == 0 && id != 5:
		case n == 0 && flags&flagSpliceAbort != 0:
			q.mark(segAbort)
		case n == 0 && flags&flagSpliceEOF != 0:
			q.mark(segEOF)
		case n == 0:
		case n > MaxDataFrame, id == 5 && n > win:
			return out, q, credit, true
		default:
			if id == 5 {
				win -= n
				q.data = append(q.data, in[:min(n, int64(len(in)))]...)
			}
			if n > int64(len(in)) {
				return out, q, credit, true
			}
			in = in[n:]
		}
	}
	return out, q, credit, false
}

// FuzzSplicedDemux feeds raw bytes to a combiner reading spliced frames,
// with stream 5 registered, and checks what it hands yamux, what stream 5
// receives and how the read ends against demuxModel. ahead, if not 0,
// shrinks the read-ahead and the pipe so that small inputs reach the
// splice and heap paths (inputs of hundreds of KiB stall the minimizer).
func FuzzSplicedDemux(f *testing.F) {
	const window = 256 << 10
	small, _, _ := interleaved(300, 100)
	for _, s := range [][]byte{small, slices.Concat(marker(5, flagSpliceEOF), spliceHeader(typeWindow, yamuxFlagFIN, 5, 0), ping)} {
		f.Add(s, uint16(0), false)
		f.Add(s, uint16(50), true)
	}
	ln := listen(f)
	f.Fuzz(func(t *testing.T, in []byte, ahead uint16, big bool) {
		c, peer := demuxPair(t, ln)
		if ahead > 0 {
			c.rbuf = make([]byte, yamuxHeaderSize+int(ahead%1024))
		}
		ss := registered(t, c, 5, window)
		if ahead > 0 {
			oneSlotPipe(t, ss)
		}
		sendRaw(t, peer, in, true)
		buf := make([]byte, 4096)
		if big {
			buf = make([]byte, 1<<20)
		}
		_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
		var got []byte
		var err error
		for err == nil {
			var m int
			if m, err = c.Read(buf); m < 0 || m > len(buf) {
				t.Fatalf("Read returned %d for a buffer of %d", m, len(buf))
			}
			if got = append(got, buf[:m]...); len(got) > len(in) {
				t.Fatalf("Read returned %d bytes of %d sent", len(got), len(in))
			}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Read did not end within 2 s (%d bytes read)", len(got))
		}
		out, wantQ, credit, protoErr := demuxModel(in, window)
		equalBytes(t, "handed to yamux", got, out)
		if errors.Is(err, ErrProtocol) != protoErr || (!protoErr && err != io.EOF) {
			t.Fatalf("Read ended with %v; protocol error expected: %v", err, protoErr)
		}
		q := drainQueue(t, ss)
		equalBytes(t, "stream 5 received", q.data, wantQ.data)
		if !slices.Equal(q.marks, wantQ.marks) {
			t.Fatalf("markers %q, want %q", q.marks, wantQ.marks)
		}
		if got := locked(&ss.smu, func() int64 { return ss.credit }); got != credit {
			t.Fatalf("send credit %d, want %d", got, credit)
		}
		if c.splices.register(9, c) != nil {
			t.Fatal("register succeeded after the read error")
		}
	})
}

// With the splice's user side attached, the reader writes a small body
// straight to the user when nothing is queued before it (and counts it as
// drained); what the user socket does not take, and anything behind
// queued bytes, is queued, in order.
func TestSplicedDirectDelivery(t *testing.T) {
	c, _ := demuxPair(t, listen(t))
	ss := registered(t, c, 5, 1<<20)
	var user []byte
	room := 1 << 30
	deliver := func(p []byte) int { // a user socket taking room bytes
		m := min(len(p), room)
		user = append(user, p[:m]...)
		room -= m
		return m
	}
	var cnt Counters
	ss.attach(deliver, netx.NewIdle(0), &cnt)
	ss.pushBytes([]byte("one;"))
	if string(user) != "one;" || locked(&ss.rmu, func() int { return len(ss.segs) }) != 0 {
		t.Fatalf("user got %q, %d segments queued; want the body delivered, nothing queued", user, len(ss.segs))
	}
	room = 3 // the user socket takes part of the next body
	ss.pushBytes([]byte("two;"))
	ss.pushBytes([]byte("three;")) // behind the queued rest: queued too
	if string(user) != "one;two" {
		t.Fatalf("user got %q, want %q", user, "one;two")
	}
	if q := drainQueue(t, ss); string(q.data) != ";three;" {
		t.Fatalf("queued %q, want %q", q.data, ";three;")
	}
	if got := locked(&ss.rmu, func() int64 { return ss.delivered }); got != 7 || cnt.Down.Load() != 7 {
		t.Fatalf("delivered %d, counted %d; want 7", got, cnt.Down.Load())
	}
}
