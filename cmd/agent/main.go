// Command agent runs inside a VPC and keeps a reverse tunnel to the
// vpcreach proxy cluster open, serving connections to the targets it
// exposes.
package main

import (
	"log/slog"
	"os"

	"github.com/vpcreach/vpcreach/internal/agent"
	"github.com/vpcreach/vpcreach/internal/cli"
	"github.com/vpcreach/vpcreach/internal/config"
)

func main() {
	os.Exit(cli.Main("agent", os.Args[1:], os.Stdout, os.Stderr,
		func() *agent.Config { return &agent.Config{} },
		func(c *agent.Config) config.Log { return c.Log },
		func(c *agent.Config, log *slog.Logger) (cli.Daemon, error) {
			return agent.New(*c, log)
		}))
}
