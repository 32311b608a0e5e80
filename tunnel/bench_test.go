package tunnel

import (
	"io"
	"net"
	"strconv"
	"testing"
	"time"
)

// BenchmarkSpliceBulk moves bytes one way through the whole copy path: a
// TCP user connection, Splice, a yamux stream over loopback TCP with the
// write combiner, Splice, a TCP target. b.SetBytes makes it report MB/s.
//
// The metrics=on variants count bytes as the daemons do for Prometheus;
// compare the two with benchstat:
//
//	go test -run '^$' -bench 'SpliceBulk|SpliceRoundTrip' -count 10 ./tunnel/ > m.txt
//	benchstat -col /metrics m.txt
//
// The spliced variants carry the stream as spliced frames (spliced.go),
// as proxy ports do on a plain TCP tunnel; the others as yamux data, as
// TLS tunnels and socks5d's framed relay do.
func BenchmarkSpliceBulk(b *testing.B) {
	for _, m := range []string{"off", "on"} {
		b.Run("metrics="+m, func(b *testing.B) { benchSpliceBulk(b, counters(m), false) })
	}
	b.Run("spliced", func(b *testing.B) { benchSpliceBulk(b, &Counters{}, true) })
}

// benchPair is the splice pair of a benchmark: spliced frames or yamux.
func benchPair(b *testing.B, c *Counters, spliced bool) *spliced {
	agent, server := sessionPair(b, DefaultSettings())
	if spliced {
		return splicedPair(b, listen(b), agent, server, c)
	}
	return splicePairCounted(b, listen(b), agent, server, 0, c)
}

func counters(m string) *Counters {
	if m == "on" {
		return &Counters{}
	}
	return nil
}

func benchSpliceBulk(b *testing.B, c *Counters, spliced bool) {
	sp := benchPair(b, c, spliced)
	buf := make([]byte, 256<<10)
	b.SetBytes(int64(len(buf)))
	done := make(chan int64)
	go func() {
		n, _ := io.Copy(io.Discard, sp.far)
		done <- n
	}()
	b.ResetTimer()
	for range b.N {
		if _, err := sp.near.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	sp.near.CloseWrite()
	if n := <-done; n != int64(b.N)*int64(len(buf)) {
		b.Fatalf("received %d bytes, want %d", n, int64(b.N)*int64(len(buf)))
	}
	b.StopTimer()
	sp.far.CloseWrite()
	sp.results(b, 10*time.Second)
	sp.near.Close()
	sp.far.Close()
}

// BenchmarkSpliceRoundTrip is one small request and its answer through
// the tunnel: the latency path of a GET.
func BenchmarkSpliceRoundTrip(b *testing.B) {
	for _, m := range []string{"off", "on"} {
		b.Run("metrics="+m, func(b *testing.B) { benchSpliceRoundTrip(b, counters(m), false) })
	}
	b.Run("spliced", func(b *testing.B) { benchSpliceRoundTrip(b, &Counters{}, true) })
}

func benchSpliceRoundTrip(b *testing.B, c *Counters, spliced bool) {
	sp := benchPair(b, c, spliced)
	go func() { // the far end echoes
		buf := make([]byte, 64)
		for {
			n, err := sp.far.Read(buf)
			if err != nil {
				sp.far.CloseWrite()
				return
			}
			if _, err := sp.far.Write(buf[:n]); err != nil {
				return
			}
		}
	}()
	req := make([]byte, 32)
	resp := make([]byte, 32)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := sp.near.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(sp.near, resp); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	sp.near.CloseWrite()
	sp.results(b, 10*time.Second)
	sp.near.Close()
	sp.far.Close()
}

// BenchmarkCombinerFrames writes yamux-shaped frames (a 12-byte data
// header, then its body) through the write combiner to a loopback socket.
func BenchmarkCombinerFrames(b *testing.B) {
	for _, size := range []int{64, 32 << 10} {
		b.Run(byteSize(size), func(b *testing.B) {
			near, far := tcpPair(b)
			go func() { _, _ = io.Copy(io.Discard, far) }()
			w := newCombiner(near, DefaultSettings().WriteBuffer)
			hdr := yamuxHeader(0, 1, uint32(size))
			body := make([]byte, size)
			b.SetBytes(int64(size + len(hdr)))
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := w.Write(hdr); err != nil {
					b.Fatal(err)
				}
				if _, err := w.Write(body); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			w.Close()
			far.Close()
		})
	}
}

// BenchmarkRawTCP is the baseline for BenchmarkCombinerFrames: the same
// bytes written straight to the socket, header and body as two writes
// (what yamux does without the combiner).
func BenchmarkRawTCP(b *testing.B) {
	for _, size := range []int{64, 32 << 10} {
		b.Run(byteSize(size), func(b *testing.B) {
			near, far := tcpPair(b)
			go func() { _, _ = io.Copy(io.Discard, far) }()
			var c net.Conn = near
			hdr := yamuxHeader(0, 1, uint32(size))
			body := make([]byte, size)
			b.SetBytes(int64(size + len(hdr)))
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(hdr); err != nil {
					b.Fatal(err)
				}
				if _, err := c.Write(body); err != nil {
					b.Fatal(err)
				}
			}
			b.StopTimer()
			near.Close()
			far.Close()
		})
	}
}

func byteSize(n int) string {
	if n >= 1<<10 {
		return strconv.Itoa(n>>10) + "KiB"
	}
	return strconv.Itoa(n) + "B"
}
