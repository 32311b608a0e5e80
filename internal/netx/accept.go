package netx

import (
	"errors"
	"log/slog"
	"net"
	"time"
)

// AcceptLoop accepts connections on ln and hands each to handle (which
// must not block: it starts a goroutine). Temporary errors such as EMFILE
// are logged and retried with a backoff up to 1 s; the loop returns nil
// when ln is closed.
func AcceptLoop(ln net.Listener, log *slog.Logger, handle func(net.Conn)) error {
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			if delay == 0 {
				delay = 5 * time.Millisecond
			} else if delay *= 2; delay > time.Second {
				delay = time.Second
			}
			log.Warn("accept failed; retrying", "listener", ln.Addr().String(), "err", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		handle(c)
	}
}
