package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Liveness is an optional interface of a Daemon that can check its own
// main loop: Alive returns nil while the daemon makes progress, and must
// return when ctx ends. It gates every watchdog ping.
type Liveness interface {
	Alive(ctx context.Context) error
}

// notifier speaks systemd's notify protocol (sd_notify(3)) on the socket
// in NOTIFY_SOCKET: READY=1, RELOADING=1, STOPPING=1, STATUS= and
// WATCHDOG=1 (unit: Type=notify, WatchdogSec=). Without NOTIFY_SOCKET, as
// outside systemd, every send is a no-op.
type notifier struct {
	log     *slog.Logger
	failing atomic.Bool // the last send failed: log the next failure at debug
}

// send sends one message of NAME=value lines (empty lines are dropped).
// Values must not contain newlines: see statusLine.
func (n *notifier) send(lines ...string) {
	var kept []string
	for _, l := range lines {
		if l != "" {
			kept = append(kept, l)
		}
	}
	_, err := daemon.SdNotify(false, strings.Join(kept, "\n"))
	switch {
	case err == nil:
		if n.failing.Swap(false) {
			n.log.Info("sd_notify works again")
		}
	case !n.failing.Swap(true):
		n.log.Warn("sd_notify failed", "err", err)
	default:
		n.log.Debug("sd_notify failed", "err", err)
	}
}

// statusLine is a STATUS= line for text, which goes on one line.
func statusLine(text string) string {
	return "STATUS=" + strings.Join(strings.Fields(text), " ")
}

// monotonicUsec is the MONOTONIC_USEC= line that systemd 253 and later
// want next to RELOADING=1 (older ones ignore it).
func monotonicUsec() string {
	return strings.TrimSuffix(daemon.SdNotifyMonotonicUsec(), "\n")
}

// watchdogInterval is how often to send WATCHDOG=1: half of WATCHDOG_USEC,
// as sd_watchdog_enabled(3) advises; zero when the watchdog is off (or on
// for another process: WATCHDOG_PID) or there is no NOTIFY_SOCKET.
func (n *notifier) watchdogInterval() time.Duration {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return 0
	}
	usec, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		n.log.Warn("watchdog settings ignored", "err", err)
		return 0
	}
	return usec / 2
}

// errNoProof is why a watchdog round sent nothing.
var errNoProof = errors.New("no proof of life")

// watchdog sends WATCHDOG=1 every interval until ctx ends, each time only
// after the daemon gave proof of life within half an interval:
//   - RunDaemon's event loop (which handles signals, runs Reload and
//     reports readiness) took a probe from probes, so a hung Reload or a
//     stuck loop starves the watchdog;
//   - live, when the daemon implements Liveness, answered nil.
//
// A round without proof sends nothing; after WatchdogSec without a ping
// systemd kills the daemon with SIGABRT (Go exits with every goroutine's
// stack, into the journal) and Restart= starts it again.
func (n *notifier) watchdog(ctx context.Context, interval time.Duration, probes chan<- struct{}, live Liveness) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := proofOfLife(ctx, interval/2, probes, live); err != nil {
			if ctx.Err() != nil {
				return
			}
			n.log.Warn("watchdog not fed: the daemon looks stuck", "err", err)
			continue
		}
		n.send(daemon.SdNotifyWatchdog)
	}
}

// proofOfLife is one watchdog round's check: see watchdog.
func proofOfLife(ctx context.Context, budget time.Duration, probes chan<- struct{}, live Liveness) error {
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	select {
	case probes <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("%w: the signal loop did not answer within %v", errNoProof, budget)
	}
	if live != nil {
		if err := live.Alive(ctx); err != nil {
			return fmt.Errorf("%w: liveness check: %w", errNoProof, err)
		}
	}
	return nil
}
