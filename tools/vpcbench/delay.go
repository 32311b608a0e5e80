package main

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// delayRelay sits between the agent and the proxy server's control port
// and delays every byte by a one-way delay in each direction. Each
// direction is a pipeline: a reader stamps each chunk with its release
// time and queues it; a writer sends it once that time has come. The
// reader never waits for the writer's delay, so the delay does not limit
// bandwidth: the line holds rate x delay bytes, like a long wire. The
// only end-to-end flow control across it is the tunnel's own (yamux
// stream windows), which is what the window test measures.
type delayRelay struct {
	ln     net.Listener
	to     string
	oneWay atomic.Int64 // nanoseconds
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
}

func startDelayRelay(listen, to string) (*delayRelay, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	d := &delayRelay{ln: ln, to: to, conns: map[net.Conn]struct{}{}}
	go d.serve()
	return d, nil
}

func (d *delayRelay) addr() string { return d.ln.Addr().String() }

// setRTT sets the one-way delay to rtt/2. Bytes already queued keep
// their release times.
func (d *delayRelay) setRTT(rtt time.Duration) { d.oneWay.Store(int64(rtt / 2)) }

func (d *delayRelay) close() {
	d.ln.Close()
	d.mu.Lock()
	for c := range d.conns {
		c.Close()
	}
	d.mu.Unlock()
}

func (d *delayRelay) track(cs ...net.Conn) {
	d.mu.Lock()
	for _, c := range cs {
		d.conns[c] = struct{}{}
	}
	d.mu.Unlock()
}

func (d *delayRelay) serve() {
	for {
		c, err := d.ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			return
		}
		go func() {
			up, err := net.DialTimeout("tcp", d.to, 5*time.Second)
			if err != nil {
				c.Close()
				return
			}
			d.track(c, up)
			var wg sync.WaitGroup
			wg.Add(2)
			go func() { defer wg.Done(); d.pipe(up.(*net.TCPConn), c.(*net.TCPConn)) }()
			go func() { defer wg.Done(); d.pipe(c.(*net.TCPConn), up.(*net.TCPConn)) }()
			wg.Wait()
			c.Close()
			up.Close()
			d.mu.Lock()
			delete(d.conns, c)
			delete(d.conns, up)
			d.mu.Unlock()
		}()
	}
}

type chunk struct {
	at   time.Time
	data []byte
	buf  *[]byte // pooled backing array, or nil
	err  error   // set on the last chunk: io.EOF or the read error
}

const delayBuf = 64 << 10

var delayPool = sync.Pool{New: func() any { b := make([]byte, delayBuf); return &b }}

// pipe moves src -> dst through the delay line.
func (d *delayRelay) pipe(dst, src *net.TCPConn) {
	// 16384 chunks of at most 64 KiB: up to 1 GiB in flight, far beyond
	// any window tested, so the line itself never pushes back.
	line := make(chan chunk, 16384)
	go func() {
		for {
			bp := delayPool.Get().(*[]byte)
			n, err := src.Read(*bp)
			now := time.Now()
			if n > 0 {
				c := chunk{at: now.Add(time.Duration(d.oneWay.Load()))}
				if n < 4096 { // small: copy out, keep the big buffer
					c.data = append([]byte(nil), (*bp)[:n]...)
					delayPool.Put(bp)
				} else {
					c.data, c.buf = (*bp)[:n], bp
				}
				line <- c
			} else {
				delayPool.Put(bp)
			}
			if err != nil {
				line <- chunk{at: now.Add(time.Duration(d.oneWay.Load())), err: err}
				close(line)
				return
			}
		}
	}()
	failed := false
	for c := range line {
		if failed {
			if c.buf != nil {
				delayPool.Put(c.buf)
			}
			continue
		}
		sleepUntil(c.at)
		if c.err != nil {
			if errors.Is(c.err, io.EOF) {
				_ = dst.CloseWrite()
			} else {
				dst.Close()
				src.Close()
			}
			continue
		}
		_, err := dst.Write(c.data)
		if c.buf != nil {
			delayPool.Put(c.buf)
		}
		if err != nil {
			failed = true
			dst.Close()
			src.Close() // ends the reader, which closes the line
		}
	}
}

// sleepUntil sleeps until t precisely. Go timers wake sub-millisecond
// sleeps only at the next millisecond tick of the netpoller (a 0.5 ms
// sleep takes about 1.1 ms), which would double a 1 ms RTT; nanosleep(2)
// in a blocking system call is accurate to the kernel's timer slack
// (about 50 µs).
func sleepUntil(t time.Time) {
	w := time.Until(t)
	if w <= 0 {
		return
	}
	if w > 3*time.Millisecond {
		time.Sleep(w - 2*time.Millisecond)
		if w = time.Until(t); w <= 0 {
			return
		}
	}
	ts := syscall.NsecToTimespec(int64(w))
	for {
		var rem syscall.Timespec
		if err := syscall.Nanosleep(&ts, &rem); err != syscall.EINTR {
			return
		}
		ts = rem
	}
}
