package e2e

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// single starts the single-server setup: a proxy server with the SOCKS5
// front end in-process, and an agent exposing targets.
func single(t *testing.T, targets ...string) (*registry.Memory, *runningAgent, string) {
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil, withSocks())
	a := startAgent(t, []string{srv.ControlAddr().String()}, targets, nil)
	for _, tg := range targets {
		waitRoute(t, reg, tg, "")
	}
	return reg, a, srv.SocksAddr().String()
}

func TestEndToEnd(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg, _, socksAddr := single(t, echo)

	check := func(t *testing.T, c net.Conn) {
		msg := []byte("ping through the tunnel")
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, msg) {
			t.Fatalf("got %q, want %q", got, msg)
		}
	}
	t.Run("socks5", func(t *testing.T) {
		c, rep := socksConnect(t, socksAddr, echo)
		if rep != 0 {
			t.Fatalf("reply %d", rep)
		}
		check(t, c)
	})
	t.Run("proxy port", func(t *testing.T) {
		r := waitRoute(t, reg, echo, "")
		c, err := net.Dial("tcp", r.Proxy.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		check(t, c)
	})
}

// shaTarget reads everything its client sends while sending size bytes of
// seeded random data, then writes nothing more; it reports the sha256 of
// what it received on got.
func shaTarget(t *testing.T, size int64, seed uint64, got chan<- [32]byte) string {
	ln := testutil.Listen(t)
	testutil.Serve(t, ln, func(c net.Conn) {
		defer c.Close()
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, _ = io.Copy(c, io.LimitReader(newRand(seed), size))
			c.(*net.TCPConn).CloseWrite()
		}()
		h := sha256.New()
		_, _ = io.Copy(h, c)
		wg.Wait()
		var sum [32]byte
		copy(sum[:], h.Sum(nil))
		got <- sum
	})
	return ln.Addr().String()
}

type randReader struct{ r *rand.ChaCha8 }

func newRand(seed uint64) io.Reader {
	var s [32]byte
	s[0] = byte(seed)
	s[1] = byte(seed >> 8)
	return randReader{rand.NewChaCha8(s)}
}

func (r randReader) Read(p []byte) (int, error) { return r.r.Read(p) }

func sumOf(seed uint64, size int64) [32]byte {
	h := sha256.New()
	_, _ = io.Copy(h, io.LimitReader(newRand(seed), size))
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum
}

// transfer sends size bytes of seed data on c while reading everything,
// and returns the sha256 of what it read.
func transfer(c net.Conn, seed uint64, size int64) ([32]byte, error) {
	errc := make(chan error, 1)
	go func() {
		_, err := io.Copy(c, io.LimitReader(newRand(seed), size))
		c.(*net.TCPConn).CloseWrite()
		errc <- err
	}()
	h := sha256.New()
	_, rerr := io.Copy(h, c)
	werr := <-errc
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum, errors.Join(rerr, werr)
}

func TestIntegrity64MiB(t *testing.T) {
	const size = 64 << 20
	got := make(chan [32]byte, 1)
	target := shaTarget(t, size, 2, got)
	_, _, socksAddr := single(t, target)
	c, rep := socksConnect(t, socksAddr, target)
	if rep != 0 {
		t.Fatalf("reply %d", rep)
	}
	exchange(t, c, got, 1, 2, size)
}

// exchange sends size bytes of seed up on c while reading the target's
// answer (a shaTarget sending seed down), and checks both sha256 sums:
// what c read, and what the target reports on got.
func exchange(t *testing.T, c net.Conn, got <-chan [32]byte, up, down uint64, size int64) {
	t.Helper()
	sum, err := transfer(c, up, size)
	if err != nil {
		t.Fatal(err)
	}
	if sum != sumOf(down, size) {
		t.Fatal("target -> client: sha256 differs")
	}
	if s := <-got; s != sumOf(up, size) {
		t.Fatal("client -> target: sha256 differs")
	}
}

func TestConcurrent500(t *testing.T) {
	const n, size = 500, 256 << 10
	got := make(chan [32]byte, n)
	target := shaTarget(t, size, 7, got)
	reg, _, socksAddr := single(t, target)
	route := waitRoute(t, reg, target, "")
	want := sumOf(7, size)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var c net.Conn
			var err error
			if i%2 == 0 { // half through SOCKS5, half on the proxy port
				var rep byte
				c, rep = socksConnect(t, socksAddr, target)
				if rep != 0 {
					errs <- fmt.Errorf("conn %d: reply %d", i, rep)
					return
				}
			} else if c, err = net.Dial("tcp", route.Proxy.String()); err != nil {
				errs <- err
				return
			}
			defer c.Close()
			sum, err := transfer(c, 11, size)
			if err != nil {
				errs <- fmt.Errorf("conn %d: %w", i, err)
			} else if sum != want {
				errs <- fmt.Errorf("conn %d: sha256 differs", i)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	wantUp := sumOf(11, size)
	for range n {
		if s := <-got; s != wantUp {
			t.Fatal("client -> target: sha256 differs")
		}
	}
}

func TestHalfClose(t *testing.T) {
	// The target reads until EOF, then answers with a reply it can only
	// send after the client half-closed.
	ln := testutil.Listen(t)
	reply := bytes.Repeat([]byte("after-eof "), 100000) // 1 MB
	testutil.Serve(t, ln, func(c net.Conn) {
		defer c.Close()
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "%d;", n)
		_, _ = c.Write(reply)
	})
	target := ln.Addr().String()
	reg, _, socksAddr := single(t, target)
	for _, path := range []string{"socks5", "proxy port"} {
		t.Run(path, func(t *testing.T) {
			c := connectVia(t, path, reg, socksAddr, target)
			if _, err := c.Write([]byte("12345")); err != nil {
				t.Fatal(err)
			}
			if err := c.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatal(err)
			}
			want := append([]byte("5;"), reply...)
			if !bytes.Equal(got, want) {
				t.Fatalf("got %d bytes, want %d", len(got), len(want))
			}
		})
	}
}

func TestAbortIsReset(t *testing.T) {
	// The target sends part of a reply, then resets.
	ln := testutil.Listen(t)
	testutil.Serve(t, ln, func(c net.Conn) {
		_, _ = c.Write(bytes.Repeat([]byte("x"), 64<<10))
		var b [1]byte
		_, _ = c.Read(b[:]) // wait for the client's go
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	})
	target := ln.Addr().String()
	reg, _, socksAddr := single(t, target)
	for _, path := range []string{"socks5", "proxy port"} {
		t.Run(path, func(t *testing.T) {
			c := connectVia(t, path, reg, socksAddr, target)
			if _, err := io.ReadFull(c, make([]byte, 64<<10)); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Write([]byte("go")); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err := io.ReadAll(c)
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("want a reset (ECONNRESET), got %v", err)
			}
		})
	}
}

// connectVia connects to target through SOCKS5 ("socks5") or on its
// proxy port ("proxy port"); the connection is closed at cleanup.
func connectVia(t *testing.T, path string, reg registry.Reader, socksAddr, target string) net.Conn {
	t.Helper()
	if path == "socks5" {
		c, rep := socksConnect(t, socksAddr, target)
		if rep != repSuccess {
			t.Fatalf("socks5 reply %d", rep)
		}
		return c
	}
	c, err := net.Dial("tcp", waitRoute(t, reg, target, "").Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
