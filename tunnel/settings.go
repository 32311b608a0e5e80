package tunnel

import (
	"io"
	"log"
	"net"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/vpcreach/vpcreach/internal/netx"
)

// Settings tune a tunnel session. The zero value of a field means its
// default; DefaultSettings documents them. The liveness values meet the
// design bound: a silent peer is detected within KeepAlive + WriteTimeout
// (12.5 s), and unacknowledged data kills the socket after UserTimeout.
type Settings struct {
	// Window is the largest receive window of one stream: yamux's, and
	// the credit a spliced stream grants (spliced.go). yamux v0.1.2
	// announces freed window only once half of it is free, so a yamux
	// stream moves about Window/(2*RTT) (4 MiB: 1.5 Gbit/s at 10 ms); a
	// spliced stream, granted back every quarter window, close to
	// Window/RTT (2.8 Gbit/s). Default 4 MiB: README, "Choosing the
	// window".
	Window uint32 `yaml:"window"`
	// WriteBuffer bounds the bytes the write combiner queues ahead of
	// the socket. Default 256 KiB.
	WriteBuffer int `yaml:"write_buffer"`
	// KeepAlive is the yamux ping interval. Default 5 s.
	KeepAlive time.Duration `yaml:"keepalive"`
	// WriteTimeout bounds one frame's wait for the socket, and a ping's
	// wait for its answer. Default 7.5 s.
	WriteTimeout time.Duration `yaml:"write_timeout"`
	// UserTimeout is TCP_USER_TIMEOUT on the tunnel socket. Default 10 s.
	UserTimeout time.Duration `yaml:"user_timeout"`
	// MaxStreams caps open streams per session. Default 4096.
	MaxStreams int `yaml:"max_streams"`
	// HelloTimeout bounds the whole handshake. Default 10 s.
	HelloTimeout time.Duration `yaml:"hello_timeout"`
	// NoSplice turns off spliced frames (bulk transfers moved by
	// splice(2) on a plain TCP tunnel; spec.md). Default false: used
	// whenever both ends offer them.
	NoSplice bool `yaml:"no_splice"`
}

// DefaultSettings returns the defaults.
func DefaultSettings() Settings {
	return Settings{
		Window:       4 << 20,
		WriteBuffer:  256 << 10,
		KeepAlive:    5 * time.Second,
		WriteTimeout: 7500 * time.Millisecond,
		UserTimeout:  10 * time.Second,
		MaxStreams:   4096,
		HelloTimeout: 10 * time.Second,
	}
}

// WithDefaults fills zero fields from DefaultSettings.
func (s Settings) WithDefaults() Settings {
	d := DefaultSettings()
	if s.Window == 0 {
		s.Window = d.Window
	}
	if s.WriteBuffer == 0 {
		s.WriteBuffer = d.WriteBuffer
	}
	if s.KeepAlive == 0 {
		s.KeepAlive = d.KeepAlive
	}
	if s.WriteTimeout == 0 {
		s.WriteTimeout = d.WriteTimeout
	}
	if s.UserTimeout == 0 {
		s.UserTimeout = d.UserTimeout
	}
	if s.MaxStreams == 0 {
		s.MaxStreams = d.MaxStreams
	}
	if s.HelloTimeout == 0 {
		s.HelloTimeout = d.HelloTimeout
	}
	return s
}

func (s Settings) yamux() *yamux.Config {
	c := yamux.DefaultConfig()
	c.AcceptBacklog = 1024
	c.EnableKeepAlive = true
	c.KeepAliveInterval = s.KeepAlive
	c.ConnectionWriteTimeout = s.WriteTimeout
	c.MaxStreamWindowSize = s.streamWindow()
	c.StreamOpenTimeout = 30 * time.Second
	c.StreamCloseTimeout = 2 * time.Minute
	c.LogOutput = nil
	c.Logger = log.New(io.Discard, "", 0)
	return c
}

// canSplice reports whether this side offers spliced frames on c: a plain
// TCP socket (not TLS) and not turned off.
func (s Settings) canSplice(c net.Conn) bool {
	_, ok := c.(*net.TCPConn)
	return ok && !s.NoSplice
}

// streamWindow is Window, raised to yamux's minimum (256 KiB): yamux's
// largest stream window, and the credit a spliced stream grants.
func (s Settings) streamWindow() uint32 { return max(s.Window, 256<<10) }

// newCombiner wraps the tunnel connection for yamux; when both windows
// are set (both ends splice), the combiner also carries spliced frames.
func (s Settings) newCombiner(c net.Conn, own, peer uint32) *combiner {
	w := newCombiner(c, s.WriteBuffer)
	if own != 0 && peer != 0 {
		if rc, err := c.(*net.TCPConn).SyscallConn(); err == nil {
			w.rc = rc
			w.splices = newSpliceTable(own, peer)
		}
	}
	return w
}

// prepareSocket sets the liveness options on a tunnel socket.
func (s Settings) prepareSocket(c net.Conn) {
	if tc, ok := c.(interface{ NetConn() net.Conn }); ok { // TLS: the socket underneath
		c = tc.NetConn()
	}
	netx.KeepAlive(c, s.KeepAlive, s.KeepAlive/2, 3)
	_ = netx.UserTimeout(c, s.UserTimeout)
}
