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
	"syscall"

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
	if err := RunDaemon(d, log); err != nil {
		log.Error("stopped with error", "err", err)
		return 1
	}
	return 0
}

// RunDaemon runs d with two-phase signal handling: the first SIGINT or
// SIGTERM starts a drain, a second one stops at once; SIGHUP reloads.
func RunDaemon(d Daemon, log *slog.Logger) error {
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	hard, stopHard := context.WithCancel(context.Background())
	defer stopHard()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, hard) }()
	terms := 0
	for {
		select {
		case err := <-done:
			return err
		case s := <-sigs:
			if s == syscall.SIGHUP {
				log.Info("SIGHUP received: reloading")
				d.Reload()
				continue
			}
			terms++
			if terms == 1 {
				log.Info("signal received: draining; send it again to stop at once", "signal", s.String())
				stop()
			} else {
				log.Warn("second signal: stopping at once", "signal", s.String())
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
