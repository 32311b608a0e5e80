// Command socks5d is the vpcreach SOCKS5 front end: clients ask for a
// target's own IP:port and socks5d connects them through the tunnel that
// exposes it.
package main

import (
	"log/slog"
	"os"

	"github.com/vpcreach/vpcreach/internal/cli"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/socks"
)

func main() {
	os.Exit(cli.Main("socks5d", os.Args[1:], os.Stdout, os.Stderr,
		func() *socks.DaemonConfig { return &socks.DaemonConfig{} },
		func(c *socks.DaemonConfig) config.Log { return c.Log },
		func(c *socks.DaemonConfig, log *slog.Logger) (cli.Daemon, error) {
			return socks.NewDaemon(*c, log)
		}))
}
