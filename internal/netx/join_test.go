package netx

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"
)

// joinRun is a Join running between the inner ends of two TCP pairs:
// client <-> a ... b <-> server.
type joinRun struct {
	client, a, b, server *net.TCPConn
	done                 chan struct{}
	ab, ba               int64
	err                  error
}

// startJoin builds the two pairs and runs Join(a, nil, b, idle). Cleanup
// closes both inner ends and waits for Join.
func startJoin(t *testing.T, idle time.Duration) *joinRun {
	t.Helper()
	j := &joinRun{done: make(chan struct{})}
	j.client, j.a = tcpPair(t)
	j.b, j.server = tcpPair(t)
	go func() {
		defer close(j.done)
		j.ab, j.ba, j.err = Join(j.a, nil, j.b, idle)
	}()
	t.Cleanup(func() { j.a.Close(); j.b.Close(); <-j.done })
	return j
}

// wait waits for Join to return.
func (j *joinRun) wait(t *testing.T) {
	t.Helper()
	select {
	case <-j.done:
	case <-time.After(20 * time.Second):
		t.Fatal("Join did not return")
	}
}

func randBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// readAll reads c to EOF with a safety deadline.
func readAll(t *testing.T, c net.Conn) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
	b, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return b
}

// sendAndHalfClose writes p to c in the background, then half-closes c.
func sendAndHalfClose(t *testing.T, wg *sync.WaitGroup, c *net.TCPConn, p []byte) {
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = c.SetWriteDeadline(time.Now().Add(20 * time.Second))
		if _, err := c.Write(p); err != nil {
			t.Errorf("write: %v", err)
			return
		}
		if err := c.CloseWrite(); err != nil {
			t.Errorf("close write: %v", err)
		}
	}()
}

func TestJoinCopiesBothWays(t *testing.T) {
	const size = 4 << 20
	j := startJoin(t, 0)
	up, down := randBytes(t, size), randBytes(t, size)
	var wg sync.WaitGroup
	sendAndHalfClose(t, &wg, j.client, up)
	sendAndHalfClose(t, &wg, j.server, down)
	var gotUp, gotDown []byte
	wg.Add(1)
	go func() { defer wg.Done(); gotDown = readAll(t, j.client) }()
	gotUp = readAll(t, j.server)
	wg.Wait()
	if sha256.Sum256(gotUp) != sha256.Sum256(up) {
		t.Errorf("client->server: %d bytes arrived, content differs from the %d sent", len(gotUp), size)
	}
	if sha256.Sum256(gotDown) != sha256.Sum256(down) {
		t.Errorf("server->client: %d bytes arrived, content differs from the %d sent", len(gotDown), size)
	}
	j.wait(t)
	if j.err != nil || j.ab != size || j.ba != size {
		t.Fatalf("Join = %d, %d, %v; want %d, %d, nil", j.ab, j.ba, j.err, size, size)
	}
}

func TestJoinHalfClose(t *testing.T) {
	for _, serverFirst := range []bool{false, true} {
		name := "client closes first"
		if serverFirst {
			name = "server closes first"
		}
		t.Run(name, func(t *testing.T) {
			j := startJoin(t, 0)
			first, second := j.client, j.server
			if serverFirst {
				first, second = j.server, j.client
			}
			request := []byte("request")
			reply := randBytes(t, 1<<20)
			var wg sync.WaitGroup
			sendAndHalfClose(t, &wg, first, request)
			// second sees the half-close as EOF...
			if got := readAll(t, second); !bytes.Equal(got, request) {
				t.Fatalf("request arrived as %q", got)
			}
			// ...and its reply still arrives whole.
			sendAndHalfClose(t, &wg, second, reply)
			if got := readAll(t, first); !bytes.Equal(got, reply) {
				t.Fatalf("reply: %d bytes arrived intact=%v; want %d", len(got), bytes.Equal(got, reply), len(reply))
			}
			wg.Wait()
			j.wait(t)
			if j.err != nil {
				t.Fatalf("Join error after a clean half-close exchange: %v", j.err)
			}
			total := int64(len(request) + len(reply))
			if j.ab+j.ba != total {
				t.Fatalf("Join copied %d+%d bytes; want %d", j.ab, j.ba, total)
			}
		})
	}
}

func TestJoinPassesResetOn(t *testing.T) {
	for _, serverResets := range []bool{false, true} {
		name := "client resets"
		if serverResets {
			name = "server resets"
		}
		t.Run(name, func(t *testing.T) {
			j := startJoin(t, 0)
			resetter, other := j.client, j.server
			if serverResets {
				resetter, other = j.server, j.client
			}
			// Some traffic first, so the pair is established end to end.
			if _, err := other.Write([]byte("hi")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 2)
			_ = resetter.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(resetter, buf); err != nil {
				t.Fatal(err)
			}
			Reset(resetter)
			if err := readErr(t, other); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("other end read: %v; want ECONNRESET, not a clean EOF", err)
			}
			j.wait(t)
			if !errors.Is(j.err, syscall.ECONNRESET) {
				t.Fatalf("Join error: %v; want ECONNRESET", j.err)
			}
		})
	}
}

// The way go-socks5 hands over a client: a bufio.Reader that already
// holds bytes the client pipelined after its request.
func TestJoinBufferedReaderFirst(t *testing.T) {
	const header = "HEADER\n"
	first := randBytes(t, 3000)
	rest := randBytes(t, 1<<20)
	client, a := tcpPair(t)
	b, server := tcpPair(t)
	if _, err := client.Write(append([]byte(header), first...)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReaderSize(a, 64<<10)
	_ = a.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := br.Peek(len(header) + len(first)); err != nil {
		t.Fatal(err)
	}
	_ = a.SetReadDeadline(time.Time{})
	if _, err := br.Discard(len(header)); err != nil {
		t.Fatal(err)
	}
	if br.Buffered() != len(first) {
		t.Fatalf("buffered %d bytes; want %d", br.Buffered(), len(first))
	}
	done := make(chan struct{})
	var ab int64
	var jerr error
	go func() { defer close(done); ab, _, jerr = Join(a, br, b, 0) }()
	t.Cleanup(func() { a.Close(); b.Close(); <-done })

	var wg sync.WaitGroup
	sendAndHalfClose(t, &wg, client, rest)
	got := readAll(t, server)
	wg.Wait()
	want := append(append([]byte(nil), first...), rest...)
	if !bytes.Equal(got, want) {
		t.Fatalf("server got %d bytes (intact=%v); want the %d buffered bytes then the %d sent after",
			len(got), bytes.Equal(got, want), len(first), len(rest))
	}
	server.CloseWrite()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("Join did not return")
	}
	if jerr != nil || ab != int64(len(want)) {
		t.Fatalf("Join = %d, %v; want %d, nil", ab, jerr, len(want))
	}
}

func TestJoinIdleTimeout(t *testing.T) {
	const idle = 300 * time.Millisecond
	t.Run("silent pair closes", func(t *testing.T) {
		start := time.Now()
		j := startJoin(t, idle)
		j.wait(t)
		if el := time.Since(start); el < idle {
			t.Fatalf("Join returned after %v, before the idle timeout %v", el, idle)
		}
		if !IsTimeout(j.err) {
			t.Fatalf("Join error: %v; want a timeout", j.err)
		}
		// Both ends learn of it.
		for _, c := range []net.Conn{j.client, j.server} {
			if err := readErr(t, c); !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("end of an idle-closed pair read %v; want ECONNRESET", err)
			}
		}
	})
	t.Run("trickling pair stays up", func(t *testing.T) {
		j := startJoin(t, idle)
		// Trickle one byte client->server every idle/6 for 5 idle periods:
		// the server->client direction is silent all along, and must not
		// time out either (idle counts traffic in both directions).
		tick := time.NewTicker(idle / 6)
		defer tick.Stop()
		buf := make([]byte, 1)
		for end := time.Now().Add(5 * idle); time.Now().Before(end); {
			<-tick.C
			if _, err := j.client.Write([]byte{'.'}); err != nil {
				t.Fatalf("trickle write: %v", err)
			}
			_ = j.server.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(j.server, buf); err != nil {
				t.Fatalf("trickle read: %v (pair closed while in use)", err)
			}
			select {
			case <-j.done:
				t.Fatalf("Join ended while the pair was in use: %v", j.err)
			default:
			}
		}
		// Once it falls silent, it is closed.
		stopped := time.Now()
		j.wait(t)
		if el := time.Since(stopped); el > 10*idle {
			t.Fatalf("Join returned %v after the pair fell silent; idle is %v", el, idle)
		}
		if !IsTimeout(j.err) {
			t.Fatalf("Join error: %v; want a timeout", j.err)
		}
	})
}
