package tunnel

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

// spliced is one user connection carried through the tunnel: the test
// holds near (a client of the server's proxy port) and far (the target
// the agent dialled); the two Splice calls hold the other ends.
type spliced struct {
	near, far *net.TCPConn
	nearRes   chan SpliceResult // the server side's Splice
	farRes    chan SpliceResult // the agent side's Splice
}

// openStream opens a data stream from the server and accepts it at the agent.
func openStream(t testing.TB, agent, server *Session) (srv, ag *yamux.Stream) {
	t.Helper()
	srv, err := server.Mux.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	ag, err = agent.Mux.AcceptStream()
	if err != nil {
		srv.Close()
		t.Fatal(err)
	}
	if srv.StreamID() != ag.StreamID() {
		srv.Close()
		ag.Close()
		t.Fatalf("opened stream %d, accepted %d", srv.StreamID(), ag.StreamID())
	}
	return srv, ag
}

func splicePair(t testing.TB, ln *net.TCPListener, agent, server *Session, idle time.Duration) *spliced {
	return splicePairCounted(t, ln, agent, server, idle, nil)
}

// splicePairCounted is splicePair with both ends counting bytes into c
// (nil: no counting), as the daemons do for their metrics.
func splicePairCounted(t testing.TB, ln *net.TCPListener, agent, server *Session, idle time.Duration, c *Counters) *spliced {
	t.Helper()
	srvStream, agStream := openStream(t, agent, server)
	near, nearUser := tcpPairOn(t, ln)
	farUser, far := tcpPairOn(t, ln)
	sp := &spliced{near: near, far: far, nearRes: make(chan SpliceResult, 1), farRes: make(chan SpliceResult, 1)}
	go func() { sp.nearRes <- SpliceCounted(nearUser, srvStream, idle, c) }()
	go func() { sp.farRes <- SpliceCounted(farUser, agStream, idle, c) }()
	return sp
}

// splicedPair is splicePairCounted for a stream that both ends prepared
// for spliced frames (the sessions must splice: plain TCP).
func splicedPair(t testing.TB, ln *net.TCPListener, agent, server *Session, c *Counters) *spliced {
	t.Helper()
	srvStream, agStream := openStream(t, agent, server)
	if !server.PrepareSpliced(srvStream) || !agent.PrepareSpliced(agStream) {
		t.Fatal("the sessions do not take spliced frames")
	}
	near, nearUser := tcpPairOn(t, ln)
	farUser, far := tcpPairOn(t, ln)
	sp := &spliced{near: near, far: far, nearRes: make(chan SpliceResult, 1), farRes: make(chan SpliceResult, 1)}
	go func() { sp.nearRes <- server.Splice(nearUser, srvStream, 0, c) }()
	go func() { sp.farRes <- agent.Splice(farUser, agStream, 0, c) }()
	return sp
}

// results waits for both Splice calls to return.
func (sp *spliced) results(t testing.TB, d time.Duration) (near, far SpliceResult) {
	t.Helper()
	timeout := time.After(d)
	for i := range 2 {
		select {
		case near = <-sp.nearRes:
			sp.nearRes = nil
		case far = <-sp.farRes:
			sp.farRes = nil
		case <-timeout:
			t.Fatalf("Splice did not return within %v (%d of 2 returned)", d, i)
		}
	}
	return near, far
}

// pump writes n pseudo-random bytes from seed to c, half-closes it and
// returns their hash.
func pump(c *net.TCPConn, seed uint64, n int) ([32]byte, error) {
	rng := rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8), byte(seed >> 16)})
	h := sha256.New()
	buf := make([]byte, 128<<10)
	for n > 0 {
		chunk := buf[:min(n, len(buf))]
		_, _ = rng.Read(chunk)
		h.Write(chunk)
		if _, err := c.Write(chunk); err != nil {
			return [32]byte{}, err
		}
		n -= len(chunk)
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return sum, c.CloseWrite()
}

// drain reads c to EOF and returns the hash and count of what it read.
func drain(c net.Conn) ([32]byte, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, c)
	var sum [32]byte
	h.Sum(sum[:0])
	return sum, n, err
}

type transfer struct {
	sent, got  [32]byte
	n          int64
	sErr, rErr error
}

// both moves n bytes each way through sp and reports each direction.
func (sp *spliced) both(n int, seed uint64) (up, down transfer) {
	var wg sync.WaitGroup
	wg.Add(4)
	go func() { defer wg.Done(); up.sent, up.sErr = pump(sp.near, seed, n) }()
	go func() { defer wg.Done(); up.got, up.n, up.rErr = drain(sp.far) }()
	go func() { defer wg.Done(); down.sent, down.sErr = pump(sp.far, seed+1, n) }()
	go func() { defer wg.Done(); down.got, down.n, down.rErr = drain(sp.near) }()
	wg.Wait()
	return up, down
}

func (tr transfer) check(n int) error {
	switch {
	case tr.sErr != nil:
		return fmt.Errorf("send: %w", tr.sErr)
	case tr.rErr != nil:
		return fmt.Errorf("receive: %w", tr.rErr)
	case tr.n != int64(n):
		return fmt.Errorf("received %d bytes, sent %d", tr.n, n)
	case tr.sent != tr.got:
		return errors.New("data corrupted: hashes differ")
	}
	return nil
}

func checkClean(t testing.TB, who string, r SpliceResult, up, down int64) {
	t.Helper()
	if r.Aborted || r.Err != nil {
		t.Errorf("%s: aborted: %v", who, r.Err)
	}
	if r.Up != up || r.Down != down {
		t.Errorf("%s: Up %d Down %d, want %d %d", who, r.Up, r.Down, up, down)
	}
}

func TestSpliceBulk(t *testing.T) {
	agent, server := sessionPair(t, testSettings())
	sp := splicePair(t, listen(t), agent, server, 0)
	const n = 64 << 20
	start := time.Now()
	up, down := sp.both(n, 1)
	if err := up.check(n); err != nil {
		t.Errorf("near -> far: %v", err)
	}
	if err := down.check(n); err != nil {
		t.Errorf("far -> near: %v", err)
	}
	t.Logf("64 MiB each way in %v", time.Since(start))
	nr, fr := sp.results(t, 10*time.Second)
	checkClean(t, "server side", nr, n, n)
	checkClean(t, "agent side", fr, n, n)
}

// Writes of every small size go through at once, including the 8-byte
// write whose 12-byte tunnel frame looks like a yamux data header.
func TestSpliceSmallWrites(t *testing.T) {
	agent, server := sessionPair(t, testSettings()) // keepalive 5s: a stuck frame is not rescued in time
	sp := splicePair(t, listen(t), agent, server, 0)
	for size := 1; size <= 40; size++ {
		msg := bytes.Repeat([]byte{byte('A' + size%26)}, size)
		if _, err := sp.near.Write(msg); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, sp.far, size, 2*time.Second); !bytes.Equal(got, msg) {
			t.Fatalf("size %d: got %q", size, got)
		}
		if _, err := sp.far.Write(msg); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, sp.near, size, 2*time.Second); !bytes.Equal(got, msg) {
			t.Fatalf("size %d reply: got %q", size, got)
		}
	}
	sp.near.Close()
	sp.far.Close()
	sp.results(t, 5*time.Second)
}

// A write buffer smaller than one data frame must not stall the session.
func TestSpliceSmallWriteBuffer(t *testing.T) {
	set := testSettings()
	set.WriteBuffer = 4 << 10
	agent, server := sessionPair(t, set)
	sp := splicePair(t, listen(t), agent, server, 0)
	const n = 4 << 20
	done := make(chan struct{})
	var up, down transfer
	go func() { defer close(done); up, down = sp.both(n, 7) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		sp.near.Close()
		sp.far.Close()
		<-done
		t.Fatal("transfer stalled")
	}
	if err := up.check(n); err != nil {
		t.Errorf("near -> far: %v", err)
	}
	if err := down.check(n); err != nil {
		t.Errorf("far -> near: %v", err)
	}
	nr, fr := sp.results(t, 10*time.Second)
	checkClean(t, "server side", nr, n, n)
	checkClean(t, "agent side", fr, n, n)
}

func TestSpliceHalfClose(t *testing.T) {
	agent, server := sessionPair(t, testSettings())
	sp := splicePair(t, listen(t), agent, server, 0)
	req := bytes.Repeat([]byte("request "), 16<<10)
	reply := bytes.Repeat([]byte("reply!"), 200<<10)

	// The far end reads the request to EOF and only then answers.
	farErr := make(chan error, 1)
	go func() {
		got, err := io.ReadAll(sp.far)
		switch {
		case err != nil:
			farErr <- fmt.Errorf("far read: %w", err)
		case !bytes.Equal(got, req):
			farErr <- fmt.Errorf("far got %d bytes, want the %d-byte request", len(got), len(req))
		default:
			_, err := sp.far.Write(reply)
			if err == nil {
				err = sp.far.CloseWrite()
			}
			farErr <- err
		}
	}()
	if _, err := sp.near.Write(req); err != nil {
		t.Fatal(err)
	}
	if err := sp.near.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	_ = sp.near.SetReadDeadline(time.Now().Add(20 * time.Second))
	got, err := io.ReadAll(sp.near)
	if err != nil {
		t.Fatalf("near read: %v", err)
	}
	if !bytes.Equal(got, reply) {
		t.Fatalf("near got %d bytes, want the %d-byte reply", len(got), len(reply))
	}
	if err := <-farErr; err != nil {
		t.Fatal(err)
	}
	nr, fr := sp.results(t, 5*time.Second)
	checkClean(t, "server side", nr, int64(len(req)), int64(len(reply)))
	checkClean(t, "agent side", fr, int64(len(reply)), int64(len(req)))
}

// A reset on one side reaches the other as a reset, never as a clean EOF
// that would make a truncated transfer look complete.
func TestSpliceAbort(t *testing.T) {
	agent, server := sessionPair(t, testSettings())
	sp := splicePair(t, listen(t), agent, server, 0)

	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		buf := make([]byte, 32<<10)
		for {
			if _, err := sp.far.Write(buf); err != nil {
				return
			}
		}
	}()
	_ = sp.near.SetReadDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.CopyN(io.Discard, sp.near, 1<<20); err != nil {
		t.Fatal(err)
	}
	// Mid-transfer, the far end resets.
	_ = sp.far.SetLinger(0)
	sp.far.Close()
	<-writerDone

	n, err := io.Copy(io.Discard, sp.near)
	if err == nil {
		t.Fatalf("near saw a clean EOF after %d more bytes; want a reset", n)
	}
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("near: %v, want ECONNRESET", err)
	}
	nr, fr := sp.results(t, 5*time.Second)
	if !nr.Aborted || !errors.Is(nr.Err, ErrAborted) {
		t.Errorf("server side: aborted %v, err %v; want ErrAborted", nr.Aborted, nr.Err)
	}
	if !fr.Aborted || fr.Err == nil {
		t.Errorf("agent side: aborted %v, err %v", fr.Aborted, fr.Err)
	}
}

// A reset of the near side (a client giving up) reaches the far side.
func TestSpliceAbortFromNear(t *testing.T) {
	agent, server := sessionPair(t, testSettings())
	sp := splicePair(t, listen(t), agent, server, 0)
	if _, err := sp.near.Write([]byte("partial request")); err != nil {
		t.Fatal(err)
	}
	if got := readN(t, sp.far, 15, 5*time.Second); string(got) != "partial request" {
		t.Fatalf("far got %q", got)
	}
	_ = sp.near.SetLinger(0)
	sp.near.Close()
	_ = sp.far.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, sp.far)
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("far: %v, want ECONNRESET", err)
	}
	nr, fr := sp.results(t, 5*time.Second)
	if !nr.Aborted || !fr.Aborted || !errors.Is(fr.Err, ErrAborted) {
		t.Errorf("results: server %+v, agent %+v", nr, fr)
	}
}

// A stream that ends without the end marker is a truncation: the user
// gets a reset.
func TestSpliceStreamEndsWithoutMarker(t *testing.T) {
	agent, server := sessionPair(t, testSettings())
	ln := listen(t)
	for _, tc := range []struct {
		name  string
		frame []byte // what the raw server side sends before closing
		want  error
	}{
		{"fin after data", binary.BigEndian.AppendUint32(nil, 3), ErrAborted},
		{"abort marker", binary.BigEndian.AppendUint32(nil, frameAbort), ErrAborted},
		{"frame too large", binary.BigEndian.AppendUint32(nil, MaxDataFrame+1), ErrProtocol},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srvStream, agStream := openStream(t, agent, server)
			defer srvStream.Close()
			farUser, far := tcpPairOn(t, ln)
			res := make(chan SpliceResult, 1)
			go func() { res <- Splice(farUser, agStream, 0) }()
			msg := append(tc.frame, "abc"...)
			if _, err := srvStream.Write(msg); err != nil {
				t.Fatal(err)
			}
			srvStream.Close()
			_ = far.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := io.Copy(io.Discard, far)
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("far: %v, want ECONNRESET", err)
			}
			select {
			case r := <-res:
				if !r.Aborted || !errors.Is(r.Err, tc.want) {
					t.Fatalf("result %+v, want an abort with %v", r, tc.want)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Splice did not return")
			}
		})
	}
}

func TestSpliceIdle(t *testing.T) {
	agent, server := sessionPair(t, testSettings())
	ln := listen(t)
	const idle = 300 * time.Millisecond

	t.Run("silent", func(t *testing.T) {
		sp := splicePair(t, ln, agent, server, idle)
		start := time.Now()
		for _, c := range []*net.TCPConn{sp.near, sp.far} {
			_ = c.SetReadDeadline(start.Add(2 * time.Second))
			_, err := c.Read(make([]byte, 1))
			if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("user end still open after %v: %v", time.Since(start), err)
			}
		}
		if took := time.Since(start); took < idle-50*time.Millisecond {
			t.Fatalf("closed after %v, before the idle timeout", took)
		}
		nr, fr := sp.results(t, 2*time.Second)
		if !nr.Aborted || !fr.Aborted {
			t.Fatalf("idle pair not aborted: %+v %+v", nr, fr)
		}
	})

	// The far end never reads: the near side fills the socket buffers and
	// the stream window, then blocks in a write. No read is pending
	// anywhere that a deadline could end; the watchdog still does.
	t.Run("stuck writer", func(t *testing.T) {
		sp := splicePair(t, ln, agent, server, idle)
		writeErr := make(chan error, 1)
		go func() {
			buf := make([]byte, 64<<10)
			for {
				if _, err := sp.near.Write(buf); err != nil {
					writeErr <- err
					return
				}
			}
		}()
		select {
		case <-writeErr:
		case <-time.After(10 * time.Second):
			t.Fatal("a pair stuck on a peer that does not read outlived its idle timeout")
		}
		nr, fr := sp.results(t, 5*time.Second)
		if !nr.Aborted || !fr.Aborted {
			t.Fatalf("results %+v / %+v, want both aborted", nr, fr)
		}
		if !strings.Contains(fmt.Sprint(nr.Err, fr.Err), "idle") {
			t.Fatalf("causes %v / %v, want an idle timeout", nr.Err, fr.Err)
		}
	})

	t.Run("trickle", func(t *testing.T) {
		sp := splicePair(t, ln, agent, server, idle)
		start := time.Now()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		// One byte every 100ms, one way only, for 1.2s: the pair stays up.
		for i := 0; time.Since(start) < 1200*time.Millisecond; i++ {
			<-tick.C
			if _, err := sp.near.Write([]byte{byte(i)}); err != nil {
				t.Fatalf("write %d after %v: %v", i, time.Since(start), err)
			}
			if got := readN(t, sp.far, 1, time.Second); got[0] != byte(i) {
				t.Fatalf("byte %d: got %d", i, got[0])
			}
		}
		// Still up both ways.
		if _, err := sp.far.Write([]byte("alive")); err != nil {
			t.Fatal(err)
		}
		if got := readN(t, sp.near, 5, time.Second); string(got) != "alive" {
			t.Fatalf("got %q", got)
		}
		// A clean close still works.
		if err := sp.near.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if _, n, err := drain(sp.far); err != nil || n != 0 {
			t.Fatalf("far: %d bytes, %v; want a clean EOF", n, err)
		}
		sp.far.Close()
		if _, n, err := drain(sp.near); err != nil || n != 0 {
			t.Fatalf("near: %d bytes, %v; want a clean EOF", n, err)
		}
		nr, fr := sp.results(t, 2*time.Second)
		if nr.Aborted || fr.Aborted {
			t.Fatalf("active pair aborted: %v / %v", nr.Err, fr.Err)
		}
	})
}

func TestSpliceConcurrent(t *testing.T) {
	agent, server := sessionPair(t, testSettings())
	ln := listen(t)
	const conns, n = 200, 256 << 10
	sps := make([]*spliced, conns)
	for i := range sps {
		sps[i] = splicePair(t, ln, agent, server, 0)
	}
	if got := server.Mux.NumStreams(); got != conns+1 {
		t.Errorf("server has %d streams, want %d", got, conns+1)
	}
	errs := make(chan error, 2*conns)
	var wg sync.WaitGroup
	for i, sp := range sps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			up, down := sp.both(n, uint64(100+2*i))
			if err := up.check(n); err != nil {
				errs <- fmt.Errorf("conn %d near -> far: %w", i, err)
			}
			if err := down.check(n); err != nil {
				errs <- fmt.Errorf("conn %d far -> near: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for i, sp := range sps {
		nr, fr := sp.results(t, 10*time.Second)
		if nr.Aborted || fr.Aborted || nr.Up != n || nr.Down != n || fr.Up != n || fr.Down != n {
			t.Errorf("conn %d: server %+v, agent %+v", i, nr, fr)
		}
	}
	// Every stream is gone (the control stream remains).
	testutil.Eventually(t, 10*time.Second, "the data streams to close", func() bool {
		return server.Mux.NumStreams() == 1 && agent.Mux.NumStreams() == 1
	})
}

// muxPair returns bare yamux sessions over loopback with the tunnel's
// yamux configuration, changed by mod.
func muxPair(t testing.TB, mod func(*yamux.Config)) (agent, server *Session) {
	t.Helper()
	a, b := tcpPair(t)
	cfg := testSettings().WithDefaults().yamux()
	mod(cfg)
	cm, err := yamux.Client(a, cfg)
	if err != nil {
		t.Fatal(err)
	}
	sm, err := yamux.Server(b, cfg)
	if err != nil {
		cm.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { cm.Close(); sm.Close() })
	return &Session{Mux: cm}, &Session{Mux: sm}
}

// A half-closed connection may keep moving data the other way for longer
// than yamux's StreamCloseTimeout, which starts when a stream is closed:
// the half-close must not be a yamux close.
func TestSpliceLongHalfClose(t *testing.T) {
	agent, server := muxPair(t, func(c *yamux.Config) { c.StreamCloseTimeout = 200 * time.Millisecond })
	sp := splicePair(t, listen(t), agent, server, 0)
	if err := sp.near.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if _, n, err := drain(sp.far); err != nil || n != 0 {
		t.Fatalf("far: %d bytes, %v; want EOF", n, err)
	}
	// The reply trickles for several StreamCloseTimeouts.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for i := range 16 {
		<-tick.C
		if _, err := sp.far.Write([]byte{byte(i)}); err != nil {
			t.Fatalf("far write %d: %v", i, err)
		}
		if got := readN(t, sp.near, 1, 2*time.Second); got[0] != byte(i) {
			t.Fatalf("byte %d: got %d", i, got[0])
		}
	}
	if err := sp.far.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if _, n, err := drain(sp.near); err != nil || n != 0 {
		t.Fatalf("near: %d bytes, %v; want a clean EOF", n, err)
	}
	nr, fr := sp.results(t, 5*time.Second)
	checkClean(t, "server side", nr, 0, 16)
	checkClean(t, "agent side", fr, 16, 0)
}
