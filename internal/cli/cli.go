// Package cli is the shared skeleton of the vpcreach binaries: flags
// -config, -check-config and -version, config loading, logging, and the
// signal handling every daemon needs under systemd.
package cli

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/vpcreach/vpcreach/internal/config"
)

// Version is set at build time (-ldflags "-X ...cli.Version=...").
var Version = "dev"

// Flags are the common command-line flags.
type Flags struct {
	Config      string
	CheckConfig bool
	Version     bool
}

// ParseFlags parses args (without the program name) for program name.
func ParseFlags(name string, args []string, stderr io.Writer) (Flags, error) {
	var f Flags
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.Config, "config", "/etc/vpcreach/"+name+".yaml", "path of the YAML configuration file")
	fs.BoolVar(&f.CheckConfig, "check-config", false, "load and validate the configuration, then exit")
	fs.BoolVar(&f.Version, "version", false, "print the version and exit")
	err := fs.Parse(args)
	return f, err
}

// Daemon is what a binary runs: Run until ctx ends, then drain.
type Daemon interface {
	// Run serves until ctx is cancelled (first SIGTERM/SIGINT), then
	// drains within its grace period and returns. hard is cancelled on a
	// second signal: drop everything at once.
	Run(ctx, hard context.Context) error
	// Reload is called on SIGHUP.
	Reload()
}

// Main is the body of every binary's main: flags, config, daemon, exit
// code. load parses the config file into a config value; build turns it
// into a daemon.
func Main[C config.Validator](name string, args []string, stdout, stderr io.Writer,
	newConfig func() C, logCfg func(C) config.Log, build func(C, *slog.Logger) (Daemon, error)) int {
	f, err := ParseFlags(name, args, stderr)
	if err != nil {
		return 2
	}
	if f.Version {
		fmt.Fprintf(stdout, "%s %s\n", name, Version)
		return 0
	}
	cfg := newConfig()
	if err := config.Load(f.Config, cfg); err != nil {
		fmt.Fprintf(stderr, "%s: %s: %v\n", name, f.Config, err)
		return 1
	}
	if f.CheckConfig {
		fmt.Fprintf(stdout, "%s: %s: configuration OK\n", name, f.Config)
		return 0
	}
	log := logCfg(cfg).Logger(stderr).With("component", name)
	d, err := build(cfg, log)
	if err != nil {
		log.Error("cannot start", "err", err)
		return 1
	}
	reload := func() {
		next := newConfig()
		if err := config.Load(f.Config, next); err != nil {
			log.Error("reload refused: the new configuration has errors; the running one stays",
				"config", f.Config, "err", err)
			return
		}
		a, ok := unwrap(d).(Applier[C])
		if !ok {
			d.Reload()
			return
		}
		if err := a.Apply(next); err != nil {
			log.Error("reload refused; the running configuration stays", "config", f.Config, "err", err)
			return
		}
		log.Info("configuration reloaded", "config", f.Config)
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	if err := runDaemonReload(d, log, sigs, reload); err != nil {
		log.Error("stopped with error", "err", err)
		return 1
	}
	return 0
}

// Applier is a daemon that takes a new configuration on SIGHUP (after it
// loaded and validated): it applies what it can live and returns an error,
// keeping the running configuration, for what it cannot.
type Applier[C any] interface {
	Apply(cfg C) error
}

// unwrap returns the daemon inside WithCloser.
func unwrap(d Daemon) Daemon {
	if c, ok := d.(closing); ok {
		return unwrap(c.Daemon)
	}
	return d
}

// RunDaemon runs d with two-phase signal handling: the first SIGINT or
// SIGTERM starts a drain, a second one stops at once; SIGHUP reloads. Under
// systemd (NOTIFY_SOCKET set) it reports the daemon's state: READY=1 once
// d is ready (see withReady), RELOADING=1 and READY=1 around Reload,
// STOPPING=1 on the first signal, STATUS= lines, and WATCHDOG=1 while the
// unit has WatchdogSec= and the daemon gives proof of life (see watchdog).
func RunDaemon(d Daemon, log *slog.Logger) error {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	return runDaemon(d, log, sigs)
}

// runDaemon is RunDaemon with the signals coming from sigs.
func runDaemon(d Daemon, log *slog.Logger, sigs <-chan os.Signal) error {
	return runDaemonReload(d, log, sigs, d.Reload)
}

// runDaemonReload is runDaemon calling reload on SIGHUP.
func runDaemonReload(d Daemon, log *slog.Logger, sigs <-chan os.Signal, reload func()) error {
	n := &notifier{log: log}
	live := livenessOf(d)
	d, ready := withReady(d)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	hard, stopHard := context.WithCancel(context.Background())
	defer stopHard()

	n.send(statusLine("starting"))
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, hard) }()

	// The watchdog goroutine is ours: it ends before we return.
	probes := make(chan struct{})
	wctx, stopWatchdog := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { stopWatchdog(); wg.Wait() }()
	if every := n.watchdogInterval(); every > 0 {
		log.Debug("systemd watchdog on", "ping_every", every)
		wg.Add(1)
		go func() { defer wg.Done(); n.watchdog(wctx, every, probes, live) }()
	}

	isReady, terms := false, 0
	for {
		select {
		case err := <-done:
			if err != nil {
				n.send(statusLine("failed: " + err.Error()))
			}
			return err
		case <-ready:
			ready = nil
			if terms == 0 {
				isReady = true
				n.send(daemon.SdNotifyReady, statusLine("running"))
			}
		case <-probes: // the watchdog's proof that this loop runs
		case s := <-sigs:
			if s == syscall.SIGHUP {
				log.Info("SIGHUP received: reloading")
				tell := isReady && terms == 0
				if tell {
					n.send(daemon.SdNotifyReloading, monotonicUsec(), statusLine("reloading"))
				}
				reload()
				if tell {
					n.send(daemon.SdNotifyReady, statusLine("running"))
				}
				continue
			}
			terms++
			if terms == 1 {
				log.Info("signal received: draining; send it again to stop at once", "signal", s.String())
				n.send(daemon.SdNotifyStopping, statusLine("draining; signal again to stop at once"))
				stop()
			} else {
				log.Warn("second signal: stopping at once", "signal", s.String())
				n.send(statusLine("stopping at once"))
				stopHard()
			}
		}
	}
}

// WithCloser returns d, closing c after d's Run returns (a resource the
// daemon uses but does not own, such as its registry).
func WithCloser(d Daemon, c io.Closer) Daemon { return closing{d, c} }

type closing struct {
	Daemon
	c io.Closer
}

func (d closing) Run(ctx, hard context.Context) error {
	defer d.c.Close()
	return d.Daemon.Run(ctx, hard)
}
