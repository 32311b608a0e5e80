package systemd

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/cli/notifytest"
	"github.com/vpcreach/vpcreach/internal/proctest"
	"github.com/vpcreach/vpcreach/internal/testutil"
)

const (
	token = "systemd-notify-test-token"
	// wait bounds each wait for a notification; the watchdog pings every
	// 100 ms (WATCHDOG_USEC=200000).
	wait = 10 * time.Second
)

// TestNotify runs each binary as systemd would with Type=notify and
// WatchdogSec= (NOTIFY_SOCKET, WATCHDOG_USEC) and checks what it reports:
// READY=1 once it serves, WATCHDOG=1 pings, RELOADING=1 then READY=1 on
// SIGHUP, STOPPING=1 on SIGTERM, and exit status 0.
func TestNotify(t *testing.T) {
	bin := proctest.Build(t)
	loop := func(port int) string { return fmt.Sprintf("127.0.0.1:%d", port) }

	t.Run("proxyserver", func(t *testing.T) {
		control, admin := loop(testutil.FreePort(t)), loop(testutil.FreePort(t))
		cfg := writeConfig(t, "proxyserver.yaml", fmt.Sprintf(`control: %s
advertise: 127.0.0.1
relay_port: 0
admin: %s
port_range: 41000-41099
token: {env: VPCREACH_TOKEN}
drain_grace: 2s
`, control, admin))
		lifecycle(t, bin, "proxyserver", cfg, func(t *testing.T) {
			// Ready means every listener is bound: no retry needed.
			mustDial(t, control)
			mustBeReady(t, admin)
		})
	})

	t.Run("socks5d", func(t *testing.T) {
		listen, admin := loop(testutil.FreePort(t)), loop(testutil.FreePort(t))
		cfg := writeConfig(t, "socks5d.yaml", fmt.Sprintf(`listen: %s
lookup_api: http://127.0.0.1:1
admin: %s
drain_grace: 2s
`, listen, admin))
		lifecycle(t, bin, "socks5d", cfg, func(t *testing.T) {
			mustDial(t, listen)
			mustBeReady(t, admin)
		})
	})

	t.Run("agent", func(t *testing.T) {
		// No server listens: the agent is ready (it runs and retries)
		// without a tunnel, so a cluster outage cannot fail its start.
		cfg := writeConfig(t, "agent.yaml", fmt.Sprintf(`servers: [%s]
token: {env: VPCREACH_TOKEN}
targets:
  - addr: 127.0.0.1:9
drain_grace: 2s
`, loop(testutil.FreePort(t))))
		lifecycle(t, bin, "agent", cfg, nil)
	})
}

// lifecycle starts binary name with config cfg under a fake systemd, and
// walks it through start, watchdog, reload and stop; ready checks what
// READY=1 promises.
func lifecycle(t *testing.T, bin, name, cfg string, ready func(t *testing.T)) {
	sock := notifytest.Listen(t)
	t.Setenv("WATCHDOG_USEC", "200000")
	t.Setenv("WATCHDOG_PID", "") // the child's pid is not known yet: any
	start := time.Now()
	p := proctest.Start(t, token, name, filepath.Join(bin, name), "-config", cfg)

	msg, _ := sock.Await(t, "READY=1", wait)
	t.Logf("READY=1 after %v: %q", time.Since(start).Round(time.Millisecond), msg)
	if ready != nil {
		ready(t)
	}
	for range 3 {
		sock.Await(t, "WATCHDOG=1", wait)
	}

	p.Signal(t, syscall.SIGHUP)
	sock.Await(t, "RELOADING=1", wait)
	sock.Await(t, "READY=1", wait)
	sock.Await(t, "WATCHDOG=1", wait)

	p.Terminate(t)
	sock.Await(t, "STOPPING=1", wait)
	if code := p.WaitExit(t, wait); code != 0 {
		t.Fatalf("%s exited %d after SIGTERM, want 0", name, code)
	}
}

func writeConfig(t *testing.T, name, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(text+"log: {level: debug}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func mustDial(t *testing.T, addr string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		t.Fatalf("READY=1 sent, but %s does not accept: %v", addr, err)
	}
	c.Close()
}

func mustBeReady(t *testing.T, admin string) {
	t.Helper()
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get("http://" + admin + "/readyz")
	if err != nil {
		t.Fatalf("READY=1 sent, but the admin listener %s does not answer: %v", admin, err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("READY=1 sent, but %s/readyz answers %d %s", admin, resp.StatusCode, body)
	}
}
