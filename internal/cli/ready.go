package cli

// Readier is an optional interface of a Daemon that knows when it is ready
// to serve: Ready is closed then (at most once; never, if Run fails
// first), and RunDaemon tells systemd READY=1 (Type=notify).
type Readier interface {
	Ready() <-chan struct{}
}

// withReady returns the daemon RunDaemon runs and a channel closed once it
// is ready: for a Readier (the proxy server once every listener is bound,
// socks5d once it listens) when it says so; for anything else, the agent
// among them, as soon as Run starts. The agent retries its servers for
// ever, so waiting for its first tunnel would turn a cluster outage at
// boot into a start timeout, restarts, and at the start limit a failed
// unit; whether a tunnel is up is its admin /readyz.
func withReady(d Daemon) (Daemon, <-chan struct{}) {
	switch v := d.(type) {
	case Readier:
		return d, v.Ready()
	case closing:
		inner, ready := withReady(v.Daemon)
		return closing{inner, v.c}, ready
	}
	ready := make(chan struct{})
	close(ready)
	return d, ready
}

// livenessOf returns d's Liveness check, looking through WithCloser.
func livenessOf(d Daemon) Liveness {
	if c, ok := d.(closing); ok {
		return livenessOf(c.Daemon)
	}
	l, _ := d.(Liveness)
	return l
}
