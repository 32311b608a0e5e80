package e2e

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/agent"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// Spliced frames (tunnel/spliced.go): on a plain TCP tunnel a bulk
// direction moves by splice(2). These tests run bulk transfers on the
// proxy port, where both ends of the stream splice, and check that the
// spliced path was taken (the counters) and that nothing is lost, reordered,
// truncated or leaked.

// splicedSetup starts a server and an agent exposing target and returns
// the target's proxy port.
func splicedSetup(t *testing.T, target string, sopt serverOpt, aopt agentOpt) (*server.Server, *runningAgent, string) {
	t.Helper()
	reg := registry.NewMemory(nil)
	var sopts []serverOpt
	if sopt != nil {
		sopts = append(sopts, sopt)
	}
	srv := startServer(t, reg, nil, sopts...)
	var aopts []agentOpt
	if aopt != nil {
		aopts = append(aopts, aopt)
	}
	a := startAgent(t, []string{srv.ControlAddr().String()}, []string{target}, nil, aopts...)
	return srv, a, waitRoute(t, reg, target, "").Proxy.String()
}

// 64 MiB each way through one connection, then 16 connections of 4 MiB
// each way at once: every byte arrives, in order, and both directions
// went spliced on both ends. Pipes and goroutines return to the baseline.
func TestSplicedIntegrity(t *testing.T) {
	const size, n, small = 64 << 20, 16, 4 << 20
	got := make(chan [32]byte, n+1)
	target := shaTarget(t, size, 21, got)
	srv, a, proxy := splicedSetup(t, target, nil, nil)
	small2 := shaTarget(t, small, 23, got)
	_, _, proxy2 := splicedSetup(t, small2, nil, nil)
	baseG, baseFD := runtime.NumGoroutine(), openFDs(t)

	c := dialTCP(t, proxy)
	_ = c.SetDeadline(time.Now().Add(60 * time.Second)) // lost bytes fail, not hang
	exchange(t, c, got, 22, 21, size)
	c.Close()
	if srv.Spliced() == 0 || a.Stats.Bytes.Spliced.Load() == 0 {
		t.Fatalf("spliced directions: server %d, agent %d; want both > 0", srv.Spliced(), a.Stats.Bytes.Spliced.Load())
	}

	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", proxy2)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(60 * time.Second))
			sum, err := transfer(c, 24, small)
			if err != nil {
				errs <- fmt.Errorf("conn %d: %w", i, err)
			} else if sum != sumOf(23, small) {
				errs <- fmt.Errorf("conn %d: target -> client: sha256 differs", i)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for range n {
		if s := <-got; s != sumOf(24, small) {
			t.Fatal("client -> target: sha256 differs")
		}
	}
	// A leaked pipe pair per spliced direction and end would show here.
	testutil.Eventually(t, 10*time.Second, "goroutines and descriptors back to the baseline", func() bool {
		return openFDs(t) <= baseFD && runtime.NumGoroutine() <= baseG
	})
}

// The client half-closes after a bulk upload; the target answers with a
// bulk reply only after it has read the whole upload.
func TestSplicedHalfClose(t *testing.T) {
	const up, reply = 8 << 20, 8 << 20
	ln := testutil.Listen(t)
	testutil.Serve(t, ln, func(c net.Conn) {
		defer c.Close()
		h := sha256.New()
		n, _ := io.Copy(h, c)
		fmt.Fprintf(c, "%d %x;", n, h.Sum(nil))
		_, _ = io.CopyN(c, newRand(31), reply)
	})
	srv, a, proxy := splicedSetup(t, ln.Addr().String(), nil, nil)
	c := dialTCP(t, proxy)
	_ = c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.CopyN(c, newRand(32), up); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	want := sumOf(32, up)
	head := fmt.Sprintf("%d %x;", up, want[:])
	if !bytes.HasPrefix(got, []byte(head)) {
		t.Fatalf("reply starts %q, want %q", got[:min(len(got), len(head))], head)
	}
	if sha256.Sum256(got[len(head):]) != sumOf(31, reply) || len(got)-len(head) != reply {
		t.Fatalf("reply body: %d bytes or content differs, want %d", len(got)-len(head), reply)
	}
	if srv.Spliced() == 0 || a.Stats.Bytes.Spliced.Load() == 0 {
		t.Fatalf("spliced directions: server %d, agent %d; want both > 0", srv.Spliced(), a.Stats.Bytes.Spliced.Load())
	}
}

// A reset on either side in the middle of a spliced transfer reaches the
// other as a reset, never as a clean end.
func TestSplicedAbort(t *testing.T) {
	const size = 16 << 20
	t.Run("target resets", func(t *testing.T) {
		ln := testutil.Listen(t)
		testutil.Serve(t, ln, func(c net.Conn) {
			_, _ = io.CopyN(c, newRand(41), size)
			var b [1]byte
			_, _ = c.Read(b[:]) // the client's go
			c.(*net.TCPConn).SetLinger(0)
			c.Close()
		})
		_, a, proxy := splicedSetup(t, ln.Addr().String(), nil, nil)
		c := dialTCP(t, proxy)
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		if _, err := io.CopyN(io.Discard, c, size); err != nil {
			t.Fatal(err)
		}
		if a.Stats.Bytes.Spliced.Load() == 0 {
			t.Fatal("the agent did not splice the download")
		}
		if _, err := c.Write([]byte("go")); err != nil {
			t.Fatal(err)
		}
		_, err := io.ReadAll(c)
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("want a reset (ECONNRESET), got %v", err)
		}
	})
	t.Run("client resets", func(t *testing.T) {
		ln := testutil.Listen(t)
		result := make(chan error, 1)
		read := make(chan struct{})
		testutil.Serve(t, ln, func(c net.Conn) {
			defer c.Close()
			_, err := io.CopyN(io.Discard, c, size)
			close(read)
			if err == nil {
				_, err = io.ReadAll(c)
			}
			result <- err
		})
		srv, _, proxy := splicedSetup(t, ln.Addr().String(), nil, nil)
		c := dialTCP(t, proxy)
		if _, err := io.CopyN(c, newRand(42), size); err != nil {
			t.Fatal(err)
		}
		select {
		case <-read:
		case <-time.After(30 * time.Second):
			t.Fatal("the target did not get the upload")
		}
		if srv.Spliced() == 0 {
			t.Fatal("the server did not splice the upload")
		}
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
		select {
		case err := <-result:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("target: want a reset (ECONNRESET), got %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the target saw no end within 10 s")
		}
	})
}

// A client that does not read stalls its own stream only: the receiving
// end buffers up to the window (pipe, then pooled buffers) and stops
// granting; the tunnel's reader never waits for that client, so another
// connection on the same tunnel is served meanwhile. Then every byte
// arrives.
func TestSplicedSlowReaderDoesNotBlockTunnel(t *testing.T) {
	const size = 32 << 20
	got := make(chan [32]byte, 2)
	target := shaTarget(t, size, 51, got)
	_, a, proxy := splicedSetup(t, target, nil, nil)
	slow, err := net.DialTCP("tcp", nil, mustTCPAddr(t, proxy))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { slow.Close() })
	_ = slow.SetReadBuffer(64 << 10)
	if err := slow.CloseWrite(); err != nil { // nothing to upload
		t.Fatal(err)
	}
	// The agent may send a whole window (4 MiB) before the server grants
	// more: the server's end holds at least that for the slow client.
	testutil.Eventually(t, 10*time.Second, "the agent sent a window's worth", func() bool {
		return a.Stats.Bytes.Spliced.Load() > 0 && a.Stats.Bytes.Up.Load() >= 4<<20
	})
	// The slow client reads nothing; another connection is served.
	other := dialTCP(t, proxy)
	_ = other.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.CopyN(io.Discard, other, 1<<20); err != nil {
		t.Fatalf("a second connection on the tunnel is stuck behind the slow one: %v", err)
	}
	other.Close()
	_ = slow.SetReadDeadline(time.Now().Add(30 * time.Second))
	h := sha256.New()
	if n, err := io.Copy(h, slow); err != nil || n != size {
		t.Fatalf("slow client read %d bytes (%v), want %d", n, err, size)
	}
	if [32]byte(h.Sum(nil)) != sumOf(51, size) {
		t.Fatal("target -> slow client: sha256 differs")
	}
}

func mustTCPAddr(t *testing.T, s string) *net.TCPAddr {
	t.Helper()
	a, err := net.ResolveTCPAddr("tcp", s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// Either end turning spliced frames off (no_splice), or TLS on the
// tunnel, keeps every stream on yamux: same bytes, no spliced direction.
func TestSplicedOff(t *testing.T) {
	const size = 8 << 20
	ca := testutil.NewCA(t, "splice-ca")
	cert, key := ca.Issue(t, "proxy", net.ParseIP("127.0.0.1"))
	cases := []struct {
		name string
		sopt serverOpt
		aopt agentOpt
	}{
		{"agent no_splice", nil, func(c *agent.Config, _ *agent.Agent) {
			if c != nil {
				c.Tunnel.NoSplice = true
			}
		}},
		{"server no_splice", func(c *server.Config) { c.Tunnel.NoSplice = true }, nil},
		{"TLS", func(c *server.Config) { c.TLS = &server.ServerTLS{CertFile: cert, KeyFile: key} },
			func(c *agent.Config, _ *agent.Agent) {
				if c != nil {
					c.TLS = &config.TLSFiles{CAFile: ca.File}
				}
			}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := make(chan [32]byte, 1)
			target := shaTarget(t, size, 61, got)
			srv, a, proxy := splicedSetup(t, target, tc.sopt, tc.aopt)
			c := dialTCP(t, proxy)
			_ = c.SetDeadline(time.Now().Add(60 * time.Second))
			exchange(t, c, got, 62, 61, size)
			if s, as := srv.Spliced(), a.Stats.Bytes.Spliced.Load(); s != 0 || as != 0 {
				t.Fatalf("spliced directions: server %d, agent %d; want none", s, as)
			}
		})
	}
}
