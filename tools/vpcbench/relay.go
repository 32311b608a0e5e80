package main

import (
	"bufio"

	"flag"
	"fmt"
	"github.com/hashicorp/yamux"
	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/tunnel"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"
)

// The floor: a plain Go TCP relay, one goroutine per direction, io.Copy,
// half-close. It runs as a separate process (the hidden subcommand
// "vpcbench relay -listen A -to B") so that its CPU and memory are
// measured like those of the vpcreach binaries. Note that on Linux
// io.Copy between two *net.TCPConn uses splice(2): the floor never copies
// payload through user space. With -copy N (the floor-copy path) the relay
// instead reads into and writes from an N-byte buffer, as any relay that
// frames or multiplexes must: the bound for such a relay on this machine.
// With -mux (the floor-yamux path) the two relays talk over one yamux
// session on one TCP connection, a stream per client connection, with
// the window and bulk chunk size vpcreach uses: what yamux itself costs,
// without vpcreach's protocol, framing or write combining.

// relayMain is the relay subcommand. It prints "ready ADDR" once listening.
func relayMain(args []string) int {
	fs := flag.NewFlagSet("relay", flag.ContinueOnError)
	listen := fs.String("listen", "", "listen address")
	to := fs.String("to", "", "address to forward to")
	copyBuf := fs.Int("copy", 0, "copy through a user-space buffer of this many bytes (0: io.Copy, which splices)")
	mux := fs.String("mux", "", "client: carry connections as yamux streams to -to; server: accept one yamux session, a stream per connection to -to")
	if err := fs.Parse(args); err != nil || *listen == "" || *to == "" {
		fmt.Fprintln(os.Stderr, "usage: vpcbench relay -listen ADDR -to ADDR")
		return 2
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		return 1
	}
	switch *mux {
	case "client":
		return muxClient(ln, *to)
	case "server":
		return muxServer(ln, *to)
	}
	fmt.Printf("ready %s\n", ln.Addr())
	for {
		c, err := ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			if strings.Contains(err.Error(), "too many open files") {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			fmt.Fprintln(os.Stderr, "relay: accept:", err)
			return 1
		}
		go func() {
			d, err := net.Dial("tcp", *to)
			if err != nil {
				c.Close()
				return
			}
			join(c.(*net.TCPConn), d.(*net.TCPConn), *copyBuf)
		}()
	}
}

// join copies both ways between a and b with io.Copy (or through a
// buffer of copyBuf bytes), passing an EOF on as a half-close, and closes
// both when both directions are done.
func join(a, b *net.TCPConn, copyBuf int) {
	var wg sync.WaitGroup
	wg.Add(2)
	half := func(dst, src *net.TCPConn) {
		defer wg.Done()
		var err error
		if copyBuf > 0 {
			// Hide ReadFrom and WriteTo, which would splice.
			_, err = io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, copyBuf))
		} else {
			_, err = io.Copy(dst, src)
		}
		if err != nil {
			// A reset or error: end both directions.
			a.Close()
			b.Close()
			return
		}
		_ = dst.CloseWrite()
	}
	go half(b, a)
	go half(a, b)
	wg.Wait()
	a.Close()
	b.Close()
}

// muxConfig is yamux's default with vpcreach's default stream window.
func muxConfig() *yamux.Config {
	c := yamux.DefaultConfig()
	c.MaxStreamWindowSize = tunnel.DefaultSettings().Window
	c.LogOutput = io.Discard
	return c
}

// muxClient dials to once, then carries each accepted connection as a
// stream of one yamux session.
func muxClient(ln net.Listener, to string) int {
	c, err := net.Dial("tcp", to)
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		return 1
	}
	sess, err := yamux.Client(c, muxConfig())
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		return 1
	}
	fmt.Printf("ready %s\n", ln.Addr())
	for {
		u, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "relay: accept:", err)
			return 1
		}
		st, err := sess.OpenStream()
		if err != nil {
			fmt.Fprintln(os.Stderr, "relay: open stream:", err)
			return 1
		}
		go joinStream(u.(*net.TCPConn), st)
	}
}

// muxServer accepts one connection carrying a yamux session and relays
// each of its streams to to.
func muxServer(ln net.Listener, to string) int {
	fmt.Printf("ready %s\n", ln.Addr())
	c, err := ln.Accept()
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay: accept:", err)
		return 1
	}
	sess, err := yamux.Server(c, muxConfig())
	if err != nil {
		fmt.Fprintln(os.Stderr, "relay:", err)
		return 1
	}
	for {
		st, err := sess.AcceptStream()
		if err != nil {
			fmt.Fprintln(os.Stderr, "relay: accept stream:", err)
			return 1
		}
		go func() {
			d, err := net.Dial("tcp", to)
			if err != nil {
				st.Close()
				return
			}
			joinStream(d.(*net.TCPConn), st)
		}()
	}
}

// joinStream copies both ways between a TCP connection and a yamux
// stream with netx.BulkBufSize buffers, vpcreach's bulk chunk; an EOF from the
// socket closes the stream (yamux's half-close), one from the stream
// half-closes the socket.
func joinStream(c *net.TCPConn, st *yamux.Stream) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if _, err := io.CopyBuffer(st, struct{ io.Reader }{c}, make([]byte, netx.BulkBufSize)); err != nil {
			c.Close()
		}
		st.Close()
	}()
	if _, err := io.CopyBuffer(struct{ io.Writer }{c}, st, make([]byte, netx.BulkBufSize)); err != nil {
		c.Close()
		st.Close()
	} else {
		_ = c.CloseWrite()
	}
	wg.Wait()
	c.Close()
}

// relayFlags are the flags of relay i (1: the client end) of n for a
// floor path kind.
func relayFlags(kind string, i, n int) []string {
	switch {
	case kind == pFloorCopy:
		return []string{"-copy", fmt.Sprint(floorCopyBuf)}
	case kind == pFloorYamux && i == 1:
		return []string{"-mux", "client"}
	case kind == pFloorYamux && i == n:
		return []string{"-mux", "server"}
	}
	return nil
}

// startRelay starts one relay process from listen to to and waits for
// its ready line.
func startRelay(dir, name, listen, to string, flags []string) (*proc, error) {
	self, err := os.Executable()
	if err != nil {
		self = os.Args[0]
	}
	cmd := exec.Command(self, append([]string{"relay", "-listen", listen, "-to", to}, flags...)...)
	logf, err := os.Create(dir + "/" + name + ".log")
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd.Stderr = logf
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	p, err := launch(name, cmd)
	if err != nil {
		return nil, err
	}
	p.log = logf.Name()
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(out).ReadString('\n')
		if err == nil && !strings.HasPrefix(line, "ready ") {
			err = fmt.Errorf("unexpected output %q", line)
		}
		ready <- err
		_, _ = io.Copy(io.Discard, out)
	}()
	select {
	case err := <-ready:
		if err != nil {
			p.stop()
			return nil, fmt.Errorf("relay %s: %v\n%s", name, err, p.tail(5))
		}
	case <-time.After(10 * time.Second):
		p.stop()
		return nil, fmt.Errorf("relay %s: not ready after 10 s", name)
	}
	return p, nil
}

// chain is n relay processes in a row in front of target.
type chain struct {
	addr  string // where clients connect
	procs []*proc
}

func startChain(dir string, ports *portAlloc, name string, n int, target string, kind string) (*chain, error) {
	c := &chain{}
	next := target
	// Start from the target end so each relay's destination is up.
	for i := n; i >= 1; i-- {
		listen, err := ports.addr()
		if err != nil {
			c.stop()
			return nil, err
		}
		p, err := startRelay(dir, fmt.Sprintf("%s-relay%d", name, i), listen, next, relayFlags(kind, i, n))
		if err != nil {
			c.stop()
			return nil, err
		}
		c.procs = append(c.procs, p)
		next = listen
	}
	c.addr = next
	return c, nil
}

func (c *chain) pids() []int {
	var out []int
	for _, p := range c.procs {
		out = append(out, p.pid())
	}
	return out
}

func (c *chain) stop() {
	for _, p := range c.procs {
		p.stop()
	}
}
