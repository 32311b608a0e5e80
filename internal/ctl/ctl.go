// Package ctl is vpcreachctl, the operator's command-line view of a
// vpcreach cluster: it lists routes and agents from a proxy server's
// admin listener (the lookup API) or from the cluster's Redis, looks one
// target up, and walks the path a request to a target would take,
// saying at which step it would fail.
//
// cmd/vpcreachctl is a thin main around Run; everything else lives here
// so that tests call Run directly against real servers and agents.
package ctl

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/vpcreach/vpcreach/internal/cli"
	"github.com/vpcreach/vpcreach/registry"
)

// Exit codes.
const (
	exitOK    = 0
	exitFail  = 1 // a failed lookup, an unreachable source, a failed explain step
	exitUsage = 2
)

// Environment variables read for Redis credentials: secrets never come
// from a flag value.
const (
	EnvRedisPassword         = "VPCREACH_REDIS_PASSWORD"
	EnvRedisSentinelPassword = "VPCREACH_REDIS_SENTINEL_PASSWORD"
)

const usageHead = `usage: vpcreachctl [flags] <command> [TARGET]

Shows the routes of a vpcreach cluster (target -> proxy member ip:port) and
the agents behind them, read from a proxyserver's admin listener (-api) or
from the cluster's Redis (-redis), and walks the path to one target.

commands:
  routes           every route: target -> proxy, relay, agent, server,
                   session, generation, registered age
  lookup TARGET    one route; TARGET is ip:port or network/ip:port
  agents           agent sessions: with -api the member's live sessions
                   (GET /v1/agents); with -redis only, derived from routes
  explain TARGET   walks the path a request takes: 1 route, 2 member alive
                   (relay port), 3 proxy port open, 4 agent connected and
                   target reachable (relay preamble, as socks5d does); says
                   where it fails. Steps 3 and 4 each open one connection
                   to the target through the tunnel and close it at once.

sources (at least one; flags may also follow the command):
  -api URL         a proxyserver's admin listener, e.g. http://10.0.0.2:7070
  -redis ADDRS     host:port[,host:port] with -redis-prefix; -redis-master
                   NAME for Sentinel, -redis-cluster for Redis Cluster;
                   password from $` + EnvRedisPassword + `, Sentinel's
                   from $` + EnvRedisSentinelPassword + `
  -config PATH     a proxyserver or socks5d YAML file: its registry (redis),
                   admin (proxyserver) or lookup_api (socks5d) is used
  With both: routes, lookup and explain read Redis; agents asks the API.

flags:
`

const usageTail = `
exit status: 0 success; 1 no route, source error, or a failed explain
step; 2 usage error.
`

// options are the parsed flags.
type options struct {
	api          string
	redis        string
	redisPrefix  string
	redisMaster  string
	redisCluster bool
	config       string
	output       string
	timeout      time.Duration
	version      bool
}

// Main is the binary's entry point: Run on the process's arguments, with
// go-redis's own log lines silenced (vpcreachctl reports Redis errors
// itself). That setting is process-wide, so it is not in Run, which tests
// call next to live Redis clients.
func Main() int {
	redis.SetLogger(quietRedis{})
	return Run(os.Args[1:], os.Stdout, os.Stderr)
}

type quietRedis struct{}

func (quietRedis) Printf(context.Context, string, ...any) {}

// Run is vpcreachctl: args without the program name; it returns the exit
// code.
func Run(args []string, stdout, stderr io.Writer) int {
	var o options
	fs := flag.NewFlagSet("vpcreachctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.api, "api", "", "admin listener (lookup API) URL of a proxyserver, e.g. http://127.0.0.1:7070")
	fs.StringVar(&o.redis, "redis", "", "Redis address(es), host:port[,host:port]")
	fs.StringVar(&o.redisPrefix, "redis-prefix", registry.DefaultPrefix, "Redis key prefix")
	fs.StringVar(&o.redisMaster, "redis-master", "", "Sentinel master name (-redis then lists the sentinels)")
	fs.BoolVar(&o.redisCluster, "redis-cluster", false, "-redis lists seed addresses of a Redis Cluster")
	fs.StringVar(&o.config, "config", "", "proxyserver or socks5d YAML file to take the source from")
	fs.StringVar(&o.output, "o", "table", "output: table or json")
	fs.DurationVar(&o.timeout, "timeout", 5*time.Second, "bound of each request to the source (explain: TCP connects take at most 2s, the last step waits at least 12s for the agent's answer)")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprint(stderr, usageHead)
		fs.PrintDefaults()
		fmt.Fprint(stderr, usageTail)
	}
	// Flags may come before and after the command: parse, take one
	// positional argument, parse the rest, and so on.
	var pos []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return exitOK
			}
			return exitUsage
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	if o.version {
		fmt.Fprintf(stdout, "vpcreachctl %s\n", cli.Version)
		return exitOK
	}
	usage := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "vpcreachctl: "+format+"\n", a...)
		fmt.Fprintln(stderr, "run vpcreachctl -h for help")
		return exitUsage
	}
	if len(pos) == 0 {
		fs.Usage()
		return exitUsage
	}
	if o.output != "table" && o.output != "json" {
		return usage("-o %q: want table or json", o.output)
	}
	if o.timeout <= 0 {
		return usage("-timeout must be positive")
	}
	cmd, cmdArgs := pos[0], pos[1:]
	var key registry.Key
	switch cmd {
	case "routes", "agents":
		if len(cmdArgs) != 0 {
			return usage("%s takes no arguments (got %q)", cmd, strings.Join(cmdArgs, " "))
		}
	case "lookup", "explain":
		if len(cmdArgs) != 1 {
			return usage("%s needs one TARGET, ip:port or network/ip:port", cmd)
		}
		var err error
		if key, err = registry.ParseKey(cmdArgs[0]); err != nil {
			return usage("%s: %v", cmd, err)
		}
	default:
		return usage("unknown command %q: want routes, lookup, agents or explain", cmd)
	}
	src, err := openSource(o)
	if errors.Is(err, errUsage) {
		return usage("%v", err)
	}
	if err != nil {
		fmt.Fprintf(stderr, "vpcreachctl: %v\n", err)
		return exitFail
	}
	defer src.Close()

	c := &command{o: o, src: src, stdout: stdout, stderr: stderr, now: time.Now()}
	ctx := context.Background()
	switch cmd {
	case "routes":
		return c.routes(ctx)
	case "lookup":
		return c.lookup(ctx, key)
	case "agents":
		return c.agents(ctx)
	default:
		return c.explain(ctx, key)
	}
}

// command is one invocation: options, source and output.
type command struct {
	o              options
	src            *source
	stdout, stderr io.Writer
	now            time.Time
}

func (c *command) json() bool { return c.o.output == "json" }

// fail reports an error on stderr and returns exitFail.
func (c *command) fail(format string, a ...any) int {
	fmt.Fprintf(c.stderr, "vpcreachctl: "+format+"\n", a...)
	return exitFail
}

// ctx returns a context bounded by -timeout.
func (c *command) ctx(parent context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(parent, c.o.timeout)
}

func (c *command) routes(ctx context.Context) int {
	ctx, cancel := c.ctx(ctx)
	defer cancel()
	rs, err := c.src.routes.List(ctx)
	if err != nil {
		return c.fail("list routes from %s: %v", c.src.routesFrom, err)
	}
	sortRoutes(rs)
	if c.json() {
		out := make([]routeJSON, 0, len(rs))
		for _, r := range rs {
			out = append(out, routeOut(r, c.now))
		}
		return c.writeJSON(out)
	}
	if len(rs) == 0 {
		fmt.Fprintf(c.stderr, "no routes in %s\n", c.src.routesFrom)
		return exitOK
	}
	writeRouteTable(c.stdout, rs, c.now)
	return exitOK
}

func (c *command) lookup(ctx context.Context, key registry.Key) int {
	ctx, cancel := c.ctx(ctx)
	defer cancel()
	r, err := c.src.routes.Lookup(ctx, key)
	if errors.Is(err, registry.ErrNotFound) {
		return c.fail("no route for %s in %s: %s", key, c.src.routesFrom, hintNoRoute)
	}
	if err != nil {
		return c.fail("lookup %s in %s: %v", key, c.src.routesFrom, err)
	}
	if c.json() {
		return c.writeJSON(routeOut(r, c.now))
	}
	writeRouteDetail(c.stdout, r, c.now)
	return exitOK
}
