package socks

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// The HTTP proxy front end shares the SOCKS5 port: a connection whose
// first byte is not 5 (the SOCKS version) is read as HTTP. CONNECT
// host:port opens a tunnel (HTTPS_PROXY); an absolute-form request
// (GET http://10.1.0.5:8080/path, HTTP_PROXY) is forwarded in origin form
// with "Connection: close", and the rest of the exchange is spliced. The
// lookup, the relay and the fencing are those of SOCKS5; names are never
// resolved on the proxy host.

// maxHTTPHeader bounds the request head of the HTTP front end.
const maxHTTPHeader = 16 << 10

// serveHTTP serves one HTTP proxy request on c. br reads c through lr,
// which bounds the request head; it is lifted once the head is read.
func (s *Server) serveHTTP(c net.Conn, st *connState, br *bufio.Reader, lr *headLimit) {
	client := c.RemoteAddr().String()
	log := s.log.With("client", client, "proto", "http")
	req, err := http.ReadRequest(br)
	if err != nil {
		s.results.Inc("bad request")
		writeHTTPError(c, http.StatusBadRequest, "malformed request")
		log.Info("http proxy: bad request", "err", err)
		return
	}
	lr.lift()
	// Authentication comes first: without it nothing about targets is
	// answered.
	if t := s.live.Load().auth; t.required() {
		h := req.Header.Get("Proxy-Authorization")
		u, name := t.checkBasic(h)
		if u == nil {
			s.results.Inc("auth failed")
			writeAuthRequired(c)
			if h == "" {
				s.logLimited("auth", client, "http proxy: authentication required", "client", client, "proto", "http")
			} else {
				s.logLimited("auth", client, "http proxy: authentication failed", "client", client, "proto", "http", "user", name)
			}
			return
		}
		s.mu.Lock()
		st.user = u
		s.mu.Unlock()
	}
	hostport, err := proxyTarget(req)
	if err != nil {
		s.results.Inc("bad request")
		writeHTTPError(c, http.StatusBadRequest, err.Error())
		log.Info("http proxy: refused", "method", req.Method, "err", err)
		return
	}
	ap, err := netip.ParseAddrPort(hostport)
	if err != nil || ap.Port() == 0 {
		s.results.Inc("not supported")
		writeHTTPError(c, http.StatusBadRequest, "target must be ip:port (names are not resolved here)")
		log.Info("http proxy: refused: not an ip:port", "target", hostport)
		return
	}
	key := registry.Key{Network: st.set.cfg.Network, Addr: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
	if user, why := s.permit(st, key); why != allowed {
		s.results.Inc("denied")
		if why == needsAuth { // the user went away in a reload since
			writeAuthRequired(c)
		} else {
			writeHTTPError(c, http.StatusForbidden, "this target is not allowed for user "+user)
		}
		log.Info("http proxy: connect denied", "user", user, "target", key.String(), "reason", why.String())
		return
	}
	relay, status, err := s.dial(context.Background(), st.set, key, client)
	s.results.Inc(status.String())
	if status != tunnel.StatusOK {
		code, text := httpStatusFor(status)
		writeHTTPError(c, code, text+" ("+status.String()+")")
		log.Info("http proxy: connect failed", "target", key.String(), "status", status.String(), "err", err)
		return
	}
	_ = c.SetDeadline(time.Time{})
	user := pipelined(c, br) // after a CONNECT the client speaks to the target
	if req.Method == http.MethodConnect {
		if _, err := io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
			relay.Close()
			return
		}
	} else {
		// Forward this request in origin form, its body (if any) raw
		// behind it; the target closes after its answer, and so does
		// this connection.
		user = &readerConn{Conn: c, r: io.MultiReader(strings.NewReader(originHead(req)), br)}
	}
	log.Debug("http proxy connected", "method", req.Method, "target", key.String())
	res := tunnel.SpliceCounted(user, relay, st.set.cfg.IdleTimeout, &s.bytes)
	if res.Aborted {
		log.Debug("http proxy connection reset", "target", key.String(), "err", res.Err)
	}
}

// originHead is req's head in origin form for the target, without proxy
// headers, with the body framing it arrived with and "Connection: close".
func originHead(req *http.Request) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\n", req.Method, req.URL.RequestURI(), req.Host)
	h := req.Header.Clone()
	for _, k := range []string{"Proxy-Authorization", "Proxy-Connection", "Connection", "Keep-Alive"} {
		h.Del(k)
	}
	_ = h.Write(&b)
	switch {
	case len(req.TransferEncoding) > 0:
		fmt.Fprintf(&b, "Transfer-Encoding: %s\r\n", strings.Join(req.TransferEncoding, ", "))
	case req.ContentLength > 0:
		fmt.Fprintf(&b, "Content-Length: %d\r\n", req.ContentLength)
	}
	b.WriteString("Connection: close\r\n\r\n")
	return b.String()
}

// headLimit bounds what the front end reads before it knows the request:
// the SOCKS5 greeting or the HTTP request head.
type headLimit struct {
	r net.Conn
	n int // bytes left; < 0: no limit
}

func (l *headLimit) Read(p []byte) (int, error) {
	if l.n == 0 {
		return 0, errHeadTooLarge
	}
	if l.n > 0 && len(p) > l.n {
		p = p[:l.n]
	}
	n, err := l.r.Read(p)
	if l.n > 0 {
		l.n -= n
	}
	return n, err
}

func (l *headLimit) lift() { l.n = -1 }

var errHeadTooLarge = errors.New("request head too large")

// proxyTarget returns the host:port a proxy request names.
func proxyTarget(req *http.Request) (string, error) {
	if req.Method == http.MethodConnect {
		if _, _, err := net.SplitHostPort(req.Host); err != nil {
			return "", fmt.Errorf("CONNECT needs host:port, got %q", req.Host)
		}
		return req.Host, nil
	}
	if !req.URL.IsAbs() {
		return "", errors.New("not a proxy request: want an absolute URL or CONNECT")
	}
	if req.URL.Scheme != "http" {
		return "", fmt.Errorf("scheme %q: only http:// is forwarded (use CONNECT for TLS)", req.URL.Scheme)
	}
	host, port := req.URL.Hostname(), req.URL.Port()
	if port == "" {
		port = "80"
	}
	return net.JoinHostPort(host, port), nil
}

func httpStatusFor(st tunnel.Status) (int, string) {
	switch st {
	case tunnel.StatusNoRoute:
		return http.StatusBadGateway, "no route to this target"
	case tunnel.StatusRefused:
		return http.StatusBadGateway, "the target refused the connection"
	case tunnel.StatusBusy, tunnel.StatusDraining:
		return http.StatusServiceUnavailable, "the tunnel is busy or draining; retry"
	case tunnel.StatusUnreachable, tunnel.StatusStale:
		return http.StatusGatewayTimeout, "the target is unreachable"
	}
	return http.StatusBadGateway, "proxy error"
}

func writeHTTPError(c net.Conn, code int, msg string) { writeHTTPResponse(c, code, "", msg) }

// writeAuthRequired answers 407 with the Basic challenge.
func writeAuthRequired(c net.Conn) {
	writeHTTPResponse(c, http.StatusProxyAuthRequired, "Proxy-Authenticate: Basic realm=\"vpcreach\"\r\n",
		"proxy authentication required")
}

// writeHTTPResponse writes a complete response; extra is more header
// lines, each ending in CRLF.
func writeHTTPResponse(c net.Conn, code int, extra, msg string) {
	_ = c.SetWriteDeadline(time.Now().Add(time.Second))
	body := msg + "\n"
	fmt.Fprintf(c, "HTTP/1.1 %d %s\r\n%sContent-Type: text/plain; charset=utf-8\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s",
		code, http.StatusText(code), extra, strconv.Itoa(len(body)), body)
}
