// Command vpcreachctl shows a vpcreach cluster's routes and agents, read
// from a proxyserver's admin listener or from Redis, and walks the path to
// one target, saying where a request would fail. See internal/ctl.
package main

import (
	"os"

	"github.com/vpcreach/vpcreach/internal/ctl"
)

func main() {
	os.Exit(ctl.Main())
}
