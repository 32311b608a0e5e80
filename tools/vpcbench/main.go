// Command vpcbench measures vpcreach on loopback against a direct
// connection and a plain-relay floor, all in one run with the paths
// alternated on every repetition, and prints markdown tables.
//
//	go run ./tools/vpcbench [-reps 5] [-quick] [-only bulk,rr,mem,window] [-tls off|on|both] [-out FILE]
//
// Sections: bulk (iperf3), rr (redis-benchmark), mem (RSS per idle
// connection), window (tunnel.window and tunnel.write_buffer under added
// RTT). -tls on puts TLS 1.3 on the agent's tunnel (a throwaway CA and
// certificates made at start, mutual TLS); -tls both runs the vpcreach
// paths of bulk, rr and mem without and with it, alternated, and adds a
// TLS cost table. It needs iperf3, redis-benchmark and redis-server on
// PATH (Debian: apt-get install -y iperf3 redis-tools redis-server) and
// builds the vpcreach binaries from the module it runs in.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type options struct {
	reps      int
	quick     bool
	only      map[string]bool
	out       string
	paths     []string
	secs      int
	rrReps    int
	rrN50     int
	rrN1      int
	memReps   int
	conns     int
	rtts      []time.Duration
	windows   []int64
	wbufs     []int64
	grid      bool
	winSecs   int
	winBudget time.Duration
	bin       string
	keep      bool
	tls       string // tlsOff, tlsOn or tlsBoth
}

var allSections = []string{"bulk", "rr", "mem", "window"}

const (
	pDirect = "direct"
	pFloor  = "floor"
	// pFloorCopy is the floor copying through user space (floorCopyBuf
	// bytes a read), as a multiplexer must: the bound for bulk transfer.
	pFloorCopy = "floor-copy"
	// pFloorYamux is the floor with the relays joined by one yamux
	// session: what the multiplexer itself costs.
	pFloorYamux = "floor-yamux"
	pProxy      = "proxy-port"
	pFloorFw    = "floor+fwd"
	pSocks      = "socks5d+fwd"
)

var allPaths = []string{pDirect, pFloor, pFloorCopy, pFloorYamux, pProxy, pFloorFw, pSocks}

const floorCopyBuf = 256 << 10

// -tls modes.
const (
	tlsOff  = "off"
	tlsOn   = "on"
	tlsBoth = "both"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "relay" {
		os.Exit(relayMain(os.Args[2:]))
	}
	os.Exit(run())
}

func parseFlags() (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("vpcbench", flag.ContinueOnError)
	fs.IntVar(&o.reps, "reps", 5, "bulk (iperf3) repetitions per path and direction")
	fs.BoolVar(&o.quick, "quick", false, "smoke run: fewer repetitions, shorter tests (results are indicative only)")
	only := fs.String("only", strings.Join(allSections, ","), "sections to run: bulk,rr,mem,window")
	fs.StringVar(&o.out, "out", "", "also write the markdown report to this file")
	paths := fs.String("paths", strings.Join(allPaths, ","), "paths for bulk and rr")
	fs.IntVar(&o.secs, "secs", 5, "iperf3 -t seconds (bulk)")
	fs.IntVar(&o.rrReps, "rr-reps", 3, "redis-benchmark repetitions per path")
	fs.IntVar(&o.memReps, "mem-reps", 3, "memory test repetitions (fresh processes each)")
	fs.IntVar(&o.conns, "conns", 1000, "idle connections held open in the memory test")
	rtts := fs.String("rtts", "1,10,50", "window test: added RTTs in ms")
	windows := fs.String("windows", "256K,1M,4M,16M", "window test: tunnel.window values")
	wbufs := fs.String("wbufs", "64K,256K,1M", "window test: tunnel.write_buffer values")
	fs.BoolVar(&o.grid, "window-grid", false, "window test: every window x write_buffer pair (default: vary one at a time around the defaults 4M/256K)")
	fs.StringVar(&o.bin, "bin", "", "directory holding prebuilt proxyserver, agent and socks5d (default: go build them)")
	fs.BoolVar(&o.keep, "keep", false, "keep the temporary directory (configs and process logs)")
	fs.StringVar(&o.tls, "tls", tlsOff, "TLS 1.3 on the agent's tunnel: off, on, or both (the vpcreach paths of bulk, rr and mem each way, alternated; the window test then runs without)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: go run ./tools/vpcbench [flags]\n\nBenchmarks vpcreach on loopback; see the package comment.\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %v", fs.Args())
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	o.rrN50, o.rrN1 = 100000, 20000
	o.winSecs, o.winBudget = 5, 5*time.Second
	if o.quick {
		def := func(name string, p *int, v int) {
			if !set[name] {
				*p = v
			}
		}
		def("reps", &o.reps, 2)
		def("secs", &o.secs, 2)
		def("rr-reps", &o.rrReps, 1)
		def("mem-reps", &o.memReps, 1)
		o.rrN50, o.rrN1 = 20000, 5000
		o.winSecs, o.winBudget = 2, 2*time.Second
		if !set["rtts"] {
			*rtts = "1,50"
		}
		if !set["windows"] {
			*windows = "256K,4M"
		}
		if !set["wbufs"] {
			*wbufs = "256K"
		}
	}
	if o.reps < 1 || o.rrReps < 1 || o.memReps < 1 || o.secs < 1 || o.conns < 1 {
		return nil, fmt.Errorf("-reps, -rr-reps, -mem-reps, -secs and -conns must be at least 1")
	}
	if o.tls != tlsOff && o.tls != tlsOn && o.tls != tlsBoth {
		return nil, fmt.Errorf("-tls: %q is not off, on or both", o.tls)
	}
	o.only = map[string]bool{}
	for _, s := range splitList(*only) {
		if !contains(allSections, s) {
			return nil, fmt.Errorf("-only: unknown section %q (have %s)", s, strings.Join(allSections, ","))
		}
		o.only[s] = true
	}
	for _, p := range splitList(*paths) {
		if !contains(allPaths, p) {
			return nil, fmt.Errorf("-paths: unknown path %q (have %s)", p, strings.Join(allPaths, ","))
		}
		o.paths = append(o.paths, p)
	}
	if (o.only["bulk"] || o.only["rr"]) && !contains(o.paths, pDirect) {
		o.paths = append([]string{pDirect}, o.paths...) // ratios need it
	}
	for _, s := range splitList(*rtts) {
		v, err := strconv.ParseFloat(s, 64)
		if err != nil || v <= 0 {
			return nil, fmt.Errorf("-rtts: bad RTT %q", s)
		}
		o.rtts = append(o.rtts, time.Duration(v*float64(time.Millisecond)))
	}
	for _, s := range splitList(*windows) {
		v, err := parseSize(s)
		if err != nil || v > 1<<31 {
			return nil, fmt.Errorf("-windows: %v", err)
		}
		o.windows = append(o.windows, v)
	}
	for _, s := range splitList(*wbufs) {
		v, err := parseSize(s)
		if err != nil {
			return nil, fmt.Errorf("-wbufs: %v", err)
		}
		o.wbufs = append(o.wbufs, v)
	}
	return o, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// env is what every section shares.
type env struct {
	o         *options
	root      string // module root
	dir       string // temporary directory of the run
	bins      string
	ports     *portAlloc
	iperfAddr string
	redisAddr string
	echo      *echoServer
	rep       *report
	certs     *tlsFiles          // nil with -tls off
	tlsInfo   string             // what the tunnel's TLS negotiated, once a TLS stack ran
	res       map[string]results // by section, for the TLS cost table
}

func run() int {
	o, err := parseFlags()
	if err != nil {
		if err == flag.ErrHelp {
			return 0
		}
		fmt.Fprintln(os.Stderr, "vpcbench:", err)
		return 2
	}
	start := time.Now()
	if err := preflight(o); err != nil {
		fmt.Fprintln(os.Stderr, "vpcbench:", err)
		return 2
	}
	root, err := moduleRoot()
	if err != nil && o.bin == "" {
		fmt.Fprintln(os.Stderr, "vpcbench:", err)
		return 2
	}
	raiseNofile()

	dir, err := os.MkdirTemp("", "vpcbench-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "vpcbench:", err)
		return 1
	}
	cleanup := func() {
		killAll()
		if !o.keep {
			os.RemoveAll(dir)
		}
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "\nvpcbench: %v: stopping every process it started\n", s)
		cleanup()
		os.Exit(130)
	}()
	defer cleanup()

	e := &env{o: o, root: root, dir: dir, ports: newPortAlloc(), rep: newReport(o.out), res: map[string]results{}}
	if o.keep {
		logf("temporary directory (kept): %s", dir)
	}
	if o.tls != tlsOff {
		if e.certs, err = makeCerts(filepath.Join(dir, "tls")); err != nil {
			fmt.Fprintln(os.Stderr, "vpcbench: certificates:", err)
			return 1
		}
	}
	logf("estimated runtime: about %s", estimate(o).Round(time.Minute/2))
	if e.bins = o.bin; e.bins == "" {
		e.bins = filepath.Join(dir, "bin")
		logf("building proxyserver, agent, socks5d (go build ./cmd/...)")
		if err := buildBinaries(root, e.bins); err != nil {
			fmt.Fprintln(os.Stderr, "vpcbench:", err)
			return 1
		}
	}
	if err := e.startTargets(); err != nil {
		fmt.Fprintln(os.Stderr, "vpcbench:", err)
		return 1
	}
	e.rep.add(header(o))

	failed := false
	if o.only["bulk"] || o.only["rr"] {
		if err := runPathSections(e); err != nil {
			e.rep.add(fmt.Sprintf("**bulk/rr aborted:** %v\n", err))
			failed = true
		}
	}
	if o.only["mem"] {
		if err := runMem(e); err != nil {
			e.rep.add(fmt.Sprintf("**mem aborted:** %v\n", err))
			failed = true
		}
	}
	if o.only["window"] {
		if err := runWindow(e); err != nil {
			e.rep.add(fmt.Sprintf("**window aborted:** %v\n", err))
			failed = true
		}
	}
	if o.tls != tlsOff {
		e.rep.add(tlsSummary(e))
	}
	e.rep.add(fmt.Sprintf("Total runtime: %s.\n", time.Since(start).Round(time.Second)))
	if err := e.rep.flush(); err != nil {
		fmt.Fprintln(os.Stderr, "vpcbench:", err)
		return 1
	}
	if failed {
		return 1
	}
	return 0
}

// preflight checks the outside programs the chosen sections need.
func preflight(o *options) error {
	need := map[string]string{}
	if o.only["bulk"] || o.only["window"] {
		need["iperf3"] = "iperf3"
	}
	if o.only["rr"] || o.only["window"] {
		need["redis-benchmark"] = "redis-tools"
		need["redis-server"] = "redis-server"
	}
	if o.bin == "" {
		need["go"] = "golang (the Go toolchain, to build ./cmd/...)"
	}
	var missing, pkgs []string
	for _, b := range []string{"iperf3", "redis-benchmark", "redis-server", "go"} {
		pkg, ok := need[b]
		if !ok {
			continue
		}
		if _, err := exec.LookPath(b); err != nil {
			missing = append(missing, b)
			if b != "go" {
				pkgs = append(pkgs, pkg)
			}
		}
	}
	if len(missing) == 0 {
		return nil
	}
	msg := "missing programs on PATH: " + strings.Join(missing, ", ")
	if len(pkgs) > 0 {
		msg += "\n  install them (Debian/Ubuntu, as root): apt-get update && apt-get install -y " + strings.Join(pkgs, " ")
	}
	return fmt.Errorf("%s", msg)
}

// moduleRoot finds the directory of go.mod from the working directory up.
func moduleRoot() (string, error) {
	d, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if b, err := os.ReadFile(filepath.Join(d, "go.mod")); err == nil {
			if strings.Contains(string(b), "module github.com/vpcreach/vpcreach") {
				return d, nil
			}
		}
		up := filepath.Dir(d)
		if up == d {
			return "", fmt.Errorf("run from inside the vpcreach module (no go.mod of github.com/vpcreach/vpcreach above the working directory), or pass -bin")
		}
		d = up
	}
}

// raiseNofile raises RLIMIT_NOFILE to its hard limit. Setting it
// explicitly (rather than relying on the Go runtime's own raise) makes the
// child processes inherit it.
func raiseNofile() {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return
	}
	if r.Max > 1<<20 { // also RLIM_INFINITY
		r.Max = 1 << 20
	}
	r.Cur = r.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		logf("warning: cannot raise RLIMIT_NOFILE: %v", err)
	}
	if r.Cur < 4*1024+256 {
		logf("warning: RLIMIT_NOFILE is %d; the memory test with many connections may fail (raise the hard limit)", r.Cur)
	}
}

// startTargets starts the shared targets: iperf3 -s, a private
// redis-server and the in-tool echo server.
func (e *env) startTargets() error {
	var err error
	if e.o.only["bulk"] || e.o.only["window"] {
		if e.iperfAddr, err = e.ports.addr(); err != nil {
			return err
		}
		if _, err = startIperfServer(e.dir, e.iperfAddr); err != nil {
			return err
		}
	} else if e.iperfAddr, err = e.ports.addr(); err != nil {
		return err
	}
	if e.o.only["rr"] || e.o.only["window"] {
		if e.redisAddr, err = e.ports.addr(); err != nil {
			return err
		}
		if _, err = startRedis(e.dir, e.redisAddr); err != nil {
			return err
		}
	} else if e.redisAddr, err = e.ports.addr(); err != nil {
		return err
	}
	ea, err := e.ports.addr()
	if err != nil {
		return err
	}
	e.echo, err = startEcho(ea)
	return err
}

// estimate is a rough runtime forecast of the chosen sections.
func estimate(o *options) time.Duration {
	var d time.Duration
	np := time.Duration(len(runPaths(o)))
	if o.only["bulk"] {
		d += time.Duration(o.reps) * np * 2 * (time.Duration(o.secs)*time.Second + 200*time.Millisecond)
	}
	if o.only["rr"] {
		per := time.Duration(o.rrN50/8000+o.rrN1/2500) * time.Second
		d += time.Duration(o.rrReps) * np * per
	}
	if o.only["mem"] {
		d += time.Duration(o.memReps*len(memPaths(o))) * 3500 * time.Millisecond
	}
	if o.only["window"] {
		n := time.Duration(len(windowSettings(o)) * len(o.rtts))
		d += n * (time.Duration(o.winSecs)*time.Second + o.winBudget + 4*time.Second)
		d += time.Duration(len(o.rtts)) * o.winBudget
	}
	return d + 15*time.Second
}

func header(o *options) string {
	var b strings.Builder
	fmt.Fprintf(&b, "# vpcbench %s\n\n", time.Now().Format("2006-01-02 15:04"))
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	fmt.Fprintf(&b, "Loopback, %d CPUs, kernel %s, %s; %s; %s. ", runtime.NumCPU(),
		strings.TrimSpace(string(kernel)), runtime.Version(), toolVersion("iperf3", "--version"),
		toolVersion("redis-benchmark", "--version"))
	if c := commit(); c != "" {
		fmt.Fprintf(&b, "Tree at %s (plus uncommitted changes, if any). ", c)
	}
	fmt.Fprintf(&b, "Cells are median (min–max) over the repetitions; paths alternate within each repetition.")
	if o.quick {
		fmt.Fprintf(&b, " **-quick run: few repetitions, short tests; indicative only.**")
	}
	b.WriteString("\n\nPaths:\n\n")
	b.WriteString("- **direct**: client → target.\n")
	b.WriteString("- **floor**: client → relay1 → relay2 → target; two separate processes of a plain Go relay (io.Copy per direction, half-close; on Linux io.Copy between TCP sockets is splice(2), no user-space copy).\n")
	b.WriteString("- **floor-copy**: the floor with each relay copying through a 256 KiB user-space buffer (read, then write) instead of splice(2), as any relay that frames or multiplexes must: the bound for bulk transfer through a tunnel on this machine.\n")
	b.WriteString("- **floor-yamux**: the floor with the two relays joined by one yamux v0.1.2 session (a stream per connection, vpcreach's window and copy buffer size, no protocol, framing or write combining): what the multiplexer alone costs.\n")
	b.WriteString("- **proxy-port**: client → proxyserver proxy port → tunnel → agent → target.\n")
	b.WriteString("- **floor+fwd**: client → in-tool forwarder → relay1 → relay2 → relay3 → target: the same number of hops as socks5d+fwd, the fair floor for it.\n")
	b.WriteString("- **socks5d+fwd**: client → in-tool forwarder (SOCKS5 CONNECT, because iperf3 and redis-benchmark do not speak SOCKS5) → socks5d → relay port → tunnel → agent → target.\n")
	if o.tls != tlsOff {
		b.WriteString("- **proxy-port+tls**, **socks5d+fwd+tls**: the same through a stack whose tunnel (agent → proxyserver control port) runs TLS 1.3: a throwaway ECDSA P-256 CA made at start, a server certificate for IP 127.0.0.1, mutual TLS with a client certificate, and the token challenge as without TLS. Only the tunnel is encrypted; the proxy port, the relay port and socks5d are plain TCP either way.")
		if o.tls == tlsBoth {
			b.WriteString(" With -tls both the plain and the TLS stack run side by side and their paths alternate like the others.")
		}
		b.WriteString("\n")
	}
	b.WriteString("\n")
	b.WriteString("CPU columns count the intermediate processes only: proxyserver+agent (+socks5d), or the relay processes; never the in-tool forwarder, the client or the target.\n\n")
	return b.String()
}

func toolVersion(bin string, arg string) string {
	out, err := exec.Command(bin, arg).Output()
	if err != nil {
		return bin + " (version unknown)"
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	if f := strings.Fields(line); len(f) >= 2 {
		return f[0] + " " + f[1]
	}
	return line
}

// commit reads HEAD's commit (read-only: no git command runs).
func commit() string {
	root, err := moduleRoot()
	if err != nil {
		return ""
	}
	head, err := os.ReadFile(filepath.Join(root, ".git", "HEAD"))
	if err != nil {
		return ""
	}
	h := strings.TrimSpace(string(head))
	if ref, ok := strings.CutPrefix(h, "ref: "); ok {
		h = ref
		if b, err := os.ReadFile(filepath.Join(root, ".git", ref)); err == nil {
			h = strings.TrimSpace(string(b))
		} else if b, err := os.ReadFile(filepath.Join(root, ".git", "packed-refs")); err == nil {
			for _, line := range strings.Split(string(b), "\n") {
				if f := strings.Fields(line); len(f) == 2 && f[1] == ref {
					h = f[0]
				}
			}
		}
	}
	if len(h) > 12 {
		h = h[:12]
	}
	return h
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "[%s] %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}
