package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// openFDs counts this process's open file descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	return len(ents)
}

// frame is a length-prefixed body as the handshake frames are.
func frame(body []byte) []byte {
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(body))), body...)
}

func helloJSON(t *testing.T, h *tunnel.Hello) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := tunnel.WriteFrame(&b, h); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// Every malformed control connection is answered or closed with a clear
// error and a log line, while a live agent keeps serving; goroutines and
// file descriptors return to their baseline.
func TestControlBadInput(t *testing.T) {
	echo := testutil.EchoTarget(t)
	reg := registry.NewMemory(nil)
	var logs testutil.LogBuffer
	srv := startServer(t, reg, logger(&logs), func(c *server.Config) { c.Tunnel.HelloTimeout = 500 * time.Millisecond })
	startAgent(t, []string{srv.ControlAddr().String()}, []string{echo}, nil)
	route := waitRoute(t, reg, echo, "")
	live, err := net.Dial("tcp", route.Proxy.String())
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	echoOnce(t, live, "baseline")

	junk := make([]byte, 4096)
	_, _ = rand.Read(junk)
	big := hello(testToken)
	for i := range tunnel.MaxTargets + 1 {
		big.Targets = append(big.Targets, tunnel.Target{Addr: netipPort(10, 0, byte(i>>8), byte(i), 80)})
	}
	v9 := hello(testToken, echo)
	v9.MinVersion, v9.MaxVersion = 90, 99
	wrong := hello("wrong-token-0123456789", echo)
	cases := []struct {
		name  string
		send  []byte
		close bool   // half-close after sending (truncation)
		log   string // what the server's log must say
		code  string // the refusal code, if the server answers one
	}{
		{"non-yamux bytes", junk, false, "bad magic", ""},
		{"HTTP request", []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), false, "bad magic", ""},
		{"absurd length", append(tunnel.Magic[:], 0xFF, 0xFF, 0xFF, 0xFF), false, "too large", ""},
		{"truncated hello", append(tunnel.Magic[:], frame([]byte(`{"min_version":1,"max`))[:16]...), true, "tunnel handshake failed", ""},
		{"stalled hello", append(tunnel.Magic[:], 0, 0, 1), false, "i/o timeout", ""},
		{"not JSON", append(tunnel.Magic[:], frame([]byte("{{{{"))...), false, "tunnel handshake failed", tunnel.RefuseProtocol},
		{"wrong version", append(tunnel.Magic[:], helloJSON(t, v9)...), false, "code=version", tunnel.RefuseVersion},
		{"wrong token", append(tunnel.Magic[:], helloJSON(t, wrong)...), false, "code=auth", tunnel.RefuseAuth},
		{"oversized target list", append(tunnel.Magic[:], helloJSON(t, big)...), false, "tunnel handshake failed", tunnel.RefuseProtocol},
	}
	baseG, baseFD := runtime.NumGoroutine(), openFDs(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := len(logs.String())
			c := dialTCP(t, srv.ControlAddr().String())
			_, _ = c.Write(tc.send)
			if tc.close {
				c.(*net.TCPConn).CloseWrite()
			}
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			reply, err := io.ReadAll(c)
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatal("the server did not close the connection within 5 s")
			}
			if tc.code != "" {
				var ans tunnel.Answer
				if err := tunnel.ReadFrame(bytes.NewReader(reply), tunnel.MaxHelloSize, &ans); err != nil || ans.Refusal == nil || ans.Refusal.Code != tc.code {
					t.Fatalf("answer %+v, %v; want a refusal with code %q", ans, err, tc.code)
				}
			}
			testutil.Eventually(t, 5*time.Second, "log line containing "+tc.log, func() bool {
				return strings.Contains(logs.String()[before:], tc.log)
			})
			echoOnce(t, live, "still served after "+tc.name)
		})
	}
	testutil.Eventually(t, 5*time.Second, "goroutines and descriptors back to the baseline", func() bool {
		return runtime.NumGoroutine() <= baseG && openFDs(t) <= baseFD
	})
	if logs.Contains("wrong-token-0123456789") {
		t.Fatal("a token appears in the log")
	}
}

// 2,000 junk connections on the control port (garbage, stalled hellos,
// bad magic) while an agent moves a bulk transfer: it keeps at least 0.7x
// of the throughput of the same transfer without junk.
func TestJunkConnectionsDoNotStarveAgents(t *testing.T) {
	if testing.Short() {
		t.Skip("load test; skipped with -short")
	}
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil, func(c *server.Config) {
		c.Tunnel.HelloTimeout = 2 * time.Second
		c.MaxTunnelsPerSource = 4096 // the junk comes from loopback too
	})
	sinkLn := testutil.Listen(t)
	testutil.Serve(t, sinkLn, func(c net.Conn) { _, _ = io.Copy(io.Discard, c); c.Close() })
	sink := sinkLn.Addr().String()
	startAgent(t, []string{srv.ControlAddr().String()}, []string{sink}, nil)
	route := waitRoute(t, reg, sink, "")
	const size = 64 << 20
	bulk := func() float64 {
		c, err := net.Dial("tcp", route.Proxy.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		buf := make([]byte, 256<<10)
		start := time.Now()
		for sent := 0; sent < size; sent += len(buf) {
			if _, err := c.Write(buf); err != nil {
				t.Fatal(err)
			}
		}
		return float64(size) / time.Since(start).Seconds()
	}
	// junk opens 2,000 junk connections (garbage, a stall mid-magic, a
	// frame that never comes), runs f while they are open, closes them.
	junk := func(f func()) {
		stop := make(chan struct{})
		var wg, opened sync.WaitGroup
		for i := range 2000 {
			wg.Add(1)
			opened.Add(1)
			go func() {
				defer wg.Done()
				c, err := net.Dial("tcp", srv.ControlAddr().String())
				opened.Done()
				if err != nil {
					return
				}
				defer c.Close()
				switch i % 3 {
				case 0:
					_, _ = c.Write([]byte("garbage garbage garbage"))
				case 1:
					_, _ = c.Write(tunnel.Magic[:4])
				case 2:
					_, _ = c.Write(append(tunnel.Magic[:], 0, 0, 0xFF, 0xFF))
				}
				select {
				case <-stop:
				case <-time.After(30 * time.Second):
				}
			}()
		}
		opened.Wait()
		f()
		close(stop)
		wg.Wait()
	}
	bulk() // warm-up
	// Alternate the phases and keep each one's best run: the machine is
	// shared, and a neighbour's burst must not decide the ratio.
	var clean, junky float64
	for range 4 {
		clean = max(clean, bulk())
		junk(func() { junky = max(junky, bulk()) })
	}
	ratio := junky / clean
	t.Logf("bulk through the tunnel: %.0f MB/s clean, %.0f MB/s under 2,000 junk connections (%.2fx)", clean/1e6, junky/1e6, ratio)
	if ratio < 0.7 {
		t.Fatalf("throughput under junk %.2fx of clean; want >= 0.7x", ratio)
	}
}

func netipPort(a, b, c, d byte, port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{a, b, c, d}), port)
}
