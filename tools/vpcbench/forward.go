package main

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"
)

// forwarder is an in-tool TCP forwarder: it accepts plain TCP and joins
// each connection with one that dial returns. iperf3 and redis-benchmark
// do not speak SOCKS5, so the socks5d path goes through one that does a
// SOCKS5 CONNECT; the "floor+fwd" path uses a plain one, so both carry
// the same extra hop.
type forwarder struct {
	ln   net.Listener
	dial func() (net.Conn, error)
}

func startForwarder(listen string, dial func() (net.Conn, error)) (*forwarder, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	f := &forwarder{ln: ln, dial: dial}
	go f.serve()
	return f, nil
}

func (f *forwarder) addr() string { return f.ln.Addr().String() }

func (f *forwarder) serve() {
	for {
		c, err := f.ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			return
		}
		go func() {
			d, err := f.dial()
			if err != nil {
				c.Close()
				return
			}
			join(c.(*net.TCPConn), d.(*net.TCPConn), 0)
		}()
	}
}

func (f *forwarder) close() { f.ln.Close() }

func plainDialer(to string) func() (net.Conn, error) {
	return func() (net.Conn, error) { return net.DialTimeout("tcp", to, 5*time.Second) }
}

// socksDialer connects to target through the SOCKS5 server at proxy
// (no authentication, CONNECT to an IPv4 literal).
func socksDialer(proxy, target string) func() (net.Conn, error) {
	ap := netip.MustParseAddrPort(target)
	ip4 := ap.Addr().As4()
	req := []byte{5, 1, 0, 1, ip4[0], ip4[1], ip4[2], ip4[3], 0, 0}
	binary.BigEndian.PutUint16(req[8:], ap.Port())
	return func() (net.Conn, error) {
		c, err := net.DialTimeout("tcp", proxy, 5*time.Second)
		if err != nil {
			return nil, err
		}
		_ = c.SetDeadline(time.Now().Add(15 * time.Second))
		fail := func(err error) (net.Conn, error) {
			c.Close()
			return nil, fmt.Errorf("socks5 %s via %s: %w", target, proxy, err)
		}
		if _, err := c.Write([]byte{5, 1, 0}); err != nil {
			return fail(err)
		}
		var b [262]byte
		if _, err := io.ReadFull(c, b[:2]); err != nil {
			return fail(err)
		}
		if b[0] != 5 || b[1] != 0 {
			return fail(fmt.Errorf("method reply %v", b[:2]))
		}
		if _, err := c.Write(req); err != nil {
			return fail(err)
		}
		if _, err := io.ReadFull(c, b[:4]); err != nil {
			return fail(err)
		}
		if b[1] != 0 {
			return fail(fmt.Errorf("CONNECT reply code %d", b[1]))
		}
		var n int
		switch b[3] {
		case 1:
			n = 4 + 2
		case 4:
			n = 16 + 2
		case 3:
			if _, err := io.ReadFull(c, b[:1]); err != nil {
				return fail(err)
			}
			n = int(b[0]) + 2
		default:
			return fail(fmt.Errorf("reply address type %d", b[3]))
		}
		if _, err := io.ReadFull(c, b[:n]); err != nil {
			return fail(err)
		}
		_ = c.SetDeadline(time.Time{})
		return c, nil
	}
}

// echoServer is the target of the memory test: it echoes what it reads.
type echoServer struct{ ln net.Listener }

func startEcho(listen string) (*echoServer, error) {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	e := &echoServer{ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					continue
				}
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 512)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if _, werr := c.Write(buf[:n]); werr != nil {
							return
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return e, nil
}

func (e *echoServer) addr() string { return e.ln.Addr().String() }
