package testutil

import (
	"net"
	"sync"
	"testing"
)

// Blackhole is a TCP relay (NewBlackhole listens on loopback and
// forwards to an address) that can go silent: while cut it forwards
// nothing either way and sends no FIN or RST, like a network that drops
// every packet; restore closes what it held and forwards again.
type Blackhole struct {
	ln    net.Listener
	to    string
	mu    sync.Mutex
	cut   bool
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func NewBlackhole(t testing.TB, to string) *Blackhole {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &Blackhole{ln: ln, to: to, conns: map[net.Conn]struct{}{}}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.wg.Add(1)
			go func() { defer b.wg.Done(); b.serve(c) }()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		b.closeAll()
		b.wg.Wait()
	})
	return b
}

func (b *Blackhole) Addr() string { return b.ln.Addr().String() }

func (b *Blackhole) track(c net.Conn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.conns[c] = struct{}{}
	return !b.cut
}

func (b *Blackhole) closeAll() {
	b.mu.Lock()
	defer b.mu.Unlock()
	for c := range b.conns {
		c.Close()
	}
	clear(b.conns)
}

func (b *Blackhole) serve(c net.Conn) {
	if !b.track(c) {
		return // held silently until restore or cleanup closes it
	}
	up, err := net.Dial("tcp", b.to)
	if err != nil {
		c.Close()
		return
	}
	if !b.track(up) {
		return
	}
	pipe := func(dst, src net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			b.mu.Lock()
			cut := b.cut
			b.mu.Unlock()
			if cut {
				return // drop: the bytes vanish, nothing is closed
			}
			if n > 0 {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				dst.Close()
				src.Close()
				return
			}
		}
	}
	b.wg.Add(1)
	go func() { defer b.wg.Done(); pipe(up, c) }()
	pipe(c, up)
}

// Cut makes the link silent.
func (b *Blackhole) Cut() {
	b.mu.Lock()
	b.cut = true
	b.mu.Unlock()
}

// Restore closes what the silent link held and forwards new connections.
func (b *Blackhole) Restore() {
	b.closeAll()
	b.mu.Lock()
	b.cut = false
	b.mu.Unlock()
}
