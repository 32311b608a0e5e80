// Command proxyserver is one member of a vpcreach proxy cluster: it
// accepts agent tunnels, opens a proxy port per exposed target, records
// the routes, and forwards connections through the tunnels.
package main

import (
	"log/slog"
	"os"

	"github.com/vpcreach/vpcreach/internal/cli"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/server"
	"github.com/vpcreach/vpcreach/internal/statuspage"
)

func main() {
	os.Exit(cli.Main("proxyserver", os.Args[1:], os.Stdout, os.Stderr,
		func() *server.Config { return &server.Config{} },
		func(c *server.Config) config.Log { return c.Log },
		func(c *server.Config, log *slog.Logger) (cli.Daemon, error) {
			// The status page shows the last warnings and errors.
			log = slog.New(statuspage.NewRecent(log.Handler(), statuspage.DefaultRecent))
			reg, err := c.Registry.Open(log)
			if err != nil {
				return nil, err
			}
			s, err := server.New(*c, reg, log)
			if err != nil {
				reg.Close()
				return nil, err
			}
			return cli.WithCloser(s, reg), nil
		}))
}
