// Package redistest starts real Redis processes for tests: a single
// server, a master/replica pair watched by one Sentinel, or a cluster.
//
// Every process runs the Debian binaries (redis-server, redis-sentinel,
// redis-cli) on free 127.0.0.1 ports (never the shared 6379), keeps its
// files in t.TempDir(), has no persistence, and is killed (SIGKILL + Wait)
// at t.Cleanup. When the test failed, the cleanup logs the tail of each
// process's log file. Readiness is checked by polling over raw RESP, so the
// package needs nothing beyond the standard library.
//
// The helpers are meant for the test goroutine: a Server is not safe for
// concurrent Kill/Restart calls.
package redistest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

// startTimeout bounds how long one process may take to answer PING.
const startTimeout = 10 * time.Second

// Server is one redis-server (or redis-sentinel) process bound to
// 127.0.0.1 on a free port, with no persistence, its working directory in
// t.TempDir() and its log in that directory.
type Server struct {
	Addr string // 127.0.0.1:port; kept across Kill and Restart

	bin     string   // absolute path of the binary
	conf    string   // config file given as first argument ("" for none)
	extra   []string // caller's arguments, reused by Restart
	bus     bool     // cluster node: also needs a cluster bus port
	busPort int
	dir     string
	logPath string

	cmd  *exec.Cmd
	done chan struct{} // closed once cmd has exited and been waited for
}

// Start runs redis-server with extraArgs (command-line config such as
// "--maxmemory", "1mb") appended, and returns once it answers PING.
func Start(t testing.TB, extraArgs ...string) *Server {
	t.Helper()
	return start(t, testutil.NeedBinary(t, "redis-server"), "", false, extraArgs)
}

// start builds a Server and launches it on a free port, trying a fresh
// port if another process grabbed the chosen one first.
func start(t testing.TB, bin, conf string, bus bool, extra []string) *Server {
	t.Helper()
	s := &Server{bin: bin, conf: conf, extra: extra, bus: bus, dir: t.TempDir()}
	s.logPath = filepath.Join(s.dir, "redis.log")
	t.Cleanup(func() { s.cleanup(t) })
	for attempt := 1; ; attempt++ {
		port := testutil.FreePort(t)
		s.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if bus {
			s.busPort = testutil.FreePort(t)
			if s.busPort == port { // unlikely; a bind failure below retries
				continue
			}
		}
		err := s.launch()
		if err == nil {
			return s
		}
		if !errors.Is(err, errPortInUse) || attempt >= 3 {
			t.Fatalf("redistest: start %s on %s: %v (log tail follows at cleanup)", filepath.Base(bin), s.Addr, err)
		}
	}
}

var errPortInUse = errors.New("port already in use")

// launch starts the process on s.Addr and waits until it answers PONG.
// It returns errPortInUse when the process exited because it could not
// bind.
func (s *Server) launch() error {
	_, port, _ := net.SplitHostPort(s.Addr)
	var args []string
	if s.conf != "" {
		args = append(args, s.conf)
	}
	args = append(args,
		"--port", port,
		"--bind", "127.0.0.1",
		"--dir", s.dir,
		"--logfile", s.logPath,
		"--daemonize", "no",
		"--save", "",
		"--appendonly", "no",
	)
	if s.bus {
		args = append(args, "--cluster-port", strconv.Itoa(s.busPort))
	}
	args = append(args, s.extra...)

	// Output before the log file opens (bad arguments) goes to the log too;
	// O_APPEND keeps it from clobbering Redis's own writes. Restarts append,
	// so remember where this run's lines begin.
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	off, _ := logf.Seek(0, io.SeekEnd)
	fmt.Fprintf(logf, "=== redistest: %s %q\n", s.bin, args)

	cmd := exec.Command(s.bin, args...)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = logf, logf // *os.File: no copy goroutines, Wait returns at exit
	// t.Cleanup kills the process, but cleanups do not run when the test
	// binary dies (go test -timeout, a signal): have the kernel kill it
	// then. (Pdeathsig follows the OS thread that forked, which Go keeps
	// alive unless a goroutine exits while locked to it.)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	s.cmd, s.done = cmd, done

	exited := func() bool {
		select {
		case <-done:
			return true
		default:
			return false
		}
	}
	if !testutil.WaitFor(startTimeout, func() bool { return exited() || s.ready() }) {
		s.kill()
		return fmt.Errorf("no PONG within %v", startTimeout)
	}
	if exited() {
		if b, _ := os.ReadFile(s.logPath); int64(len(b)) > off &&
			strings.Contains(string(b[off:]), "already in use") {
			return errPortInUse
		}
		return fmt.Errorf("exited during startup: %v", cmd.ProcessState)
	}
	return nil
}

// ready reports whether s.Addr answers PING and is served by our process,
// not by some other test's Redis that took the port first. It gives up
// quickly so that startup polling also notices a process that exited.
func (s *Server) ready() bool {
	if v, err := doWithin(time.Second, s.Addr, "PING"); err != nil || v != "PONG" {
		return false
	}
	return infoField(s.Addr, "server", "process_id") == strconv.Itoa(s.cmd.Process.Pid)
}

// kill SIGKILLs the current process, if any, and waits for it to exit.
func (s *Server) kill() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	<-s.done
	s.cmd = nil
}

func (s *Server) cleanup(t testing.TB) {
	s.kill()
	if t.Failed() {
		t.Logf("redistest: tail of %s log (%s):\n%s", s.Addr, s.logPath, s.logTail())
	}
}

// logTail returns the last lines of the log file.
func (s *Server) logTail() string {
	const keep = 40
	b, err := os.ReadFile(s.logPath)
	if err != nil {
		return "(no log: " + err.Error() + ")"
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > keep {
		lines = lines[len(lines)-keep:]
	}
	return strings.Join(lines, "\n")
}

// Kill SIGKILLs the process and waits for it to exit. s.Addr stays the
// same, and Restart brings the server back there.
func (s *Server) Kill(t testing.TB) {
	t.Helper()
	if s.cmd == nil {
		t.Fatalf("redistest: Kill %s: not running", s.Addr)
	}
	s.kill()
}

// Restart starts the server again on the same address, with the same
// arguments, and waits for PONG. It kills a running process first. The
// server comes back empty, since nothing is persisted (a cluster node
// keeps its nodes.conf, so it rejoins its cluster with its slots).
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.kill()
	// Redis sets SO_REUSEADDR, so TIME_WAIT alone does not stop it, but
	// another process may hold the port for a moment: wait until we could
	// bind it ourselves (Go also sets SO_REUSEADDR), then launch.
	for attempt := 1; ; attempt++ {
		testutil.Eventually(t, startTimeout, "port of "+s.Addr+" to be free", func() bool {
			ln, err := net.Listen("tcp", s.Addr)
			if err == nil {
				ln.Close()
			}
			return err == nil
		})
		err := s.launch()
		if err == nil {
			return
		}
		if !errors.Is(err, errPortInUse) || attempt >= 3 {
			t.Fatalf("redistest: restart %s: %v (log tail follows at cleanup)", s.Addr, err)
		}
	}
}

// Do sends one command and renders the reply as a string: simple and bulk
// strings as they are, integers in decimal, a nil reply as "(nil)", an
// error reply as "(error) " + message, and arrays as their rendered
// elements joined by "\n" (nested arrays flattened). A network or protocol
// failure fails the test.
func (s *Server) Do(t testing.TB, args ...string) string {
	t.Helper()
	return Do(t, s.Addr, args...)
}

// Do is Server.Do for any address.
func Do(t testing.TB, addr string, args ...string) string {
	t.Helper()
	v, err := do(addr, args...)
	if err != nil {
		t.Fatalf("redistest: %s %q: %v", addr, args, err)
	}
	return render(v)
}

// respError is an error reply ("-ERR ...").
type respError string

func (e respError) Error() string { return string(e) }

// do sends one command on a fresh connection and returns the reply as
// string, int64, nil, respError or []any.
func do(addr string, args ...string) (any, error) {
	return doWithin(5*time.Second, addr, args...)
}

// doWithin is do with a deadline for the whole exchange.
func doWithin(timeout time.Duration, addr string, args ...string) (any, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := io.WriteString(c, b.String()); err != nil {
		return nil, err
	}
	return readReply(bufio.NewReader(c))
}

// readReply parses one RESP2 reply.
func readReply(r *bufio.Reader) (any, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return nil, errors.New("empty RESP line")
	}
	body := line[1:]
	switch line[0] {
	case '+':
		return body, nil
	case '-':
		return respError(body), nil
	case ':':
		return strconv.ParseInt(body, 10, 64)
	case '$':
		n, err := strconv.Atoi(body)
		if err != nil || n < 0 {
			return nil, err // $-1: nil
		}
		buf := make([]byte, n+2) // data + CRLF
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(body)
		if err != nil || n < 0 {
			return nil, err // *-1: nil
		}
		arr := make([]any, n)
		for i := range arr {
			if arr[i], err = readReply(r); err != nil {
				return nil, err
			}
		}
		return arr, nil
	}
	return nil, fmt.Errorf("unexpected RESP line %q", line)
}

func render(v any) string {
	switch v := v.(type) {
	case nil:
		return "(nil)"
	case respError:
		return "(error) " + string(v)
	case int64:
		return strconv.FormatInt(v, 10)
	case []any:
		parts := make([]string, len(v))
		for i, e := range v {
			parts[i] = render(e)
		}
		return strings.Join(parts, "\n")
	default:
		return fmt.Sprint(v)
	}
}

// infoField returns one "field:value" line of INFO section at addr ("" if
// unreachable or absent).
func infoField(addr, section, field string) string {
	v, err := do(addr, "INFO", section)
	s, ok := v.(string)
	if err != nil || !ok {
		return ""
	}
	for _, line := range strings.Split(s, "\r\n") {
		if val, ok := strings.CutPrefix(line, field+":"); ok {
			return val
		}
	}
	return ""
}
