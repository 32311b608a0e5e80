package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// benchToken is the shared agent token of the bench stacks (passed in
// the environment, as the configs name it); benchAgentID is the agent's
// id, and the common name of its certificate under mutual TLS.
const (
	tokenEnv     = "VPCREACH_TOKEN"
	benchToken   = "vpcbench-token-0123456789abcdef"
	benchAgentID = "vpcbench-agent"
)

// buildBinaries builds proxyserver, agent and socks5d into dir.
// -buildvcs=false: no git command runs (the tree may be mid-edit).
func buildBinaries(root, dir string) error {
	cmd := exec.Command("go", "build", "-buildvcs=false", "-o", dir+string(os.PathSeparator), "./cmd/...")
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go build ./cmd/... failed: %v\n%s", err, out)
	}
	for _, b := range []string{"proxyserver", "agent", "socks5d"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return fmt.Errorf("go build ./cmd/... did not produce %s", b)
		}
	}
	return nil
}

// tunnelSet is a tunnel: setting; zero fields are left to the defaults.
type tunnelSet struct {
	window uint32
	wbuf   int
}

func (t tunnelSet) yaml() string {
	var parts []string
	if t.window != 0 {
		parts = append(parts, fmt.Sprintf("window: %d", t.window))
	}
	if t.wbuf != 0 {
		parts = append(parts, fmt.Sprintf("write_buffer: %d", t.wbuf))
	}
	if len(parts) == 0 {
		return ""
	}
	return "tunnel: {" + strings.Join(parts, ", ") + "}\n"
}

type stackOpts struct {
	name    string
	tunnel  tunnelSet
	targets []string // target addresses the agent exposes
	socks   bool     // also run socks5d
	// viaDelay, if set, puts a delay relay between agent and server.
	viaDelay bool
	// tls, if set, puts TLS 1.3 (mutual, with the token challenge as
	// without it) on the tunnel between agent and server.
	tls *tlsFiles
}

// stack is one proxyserver + agent (+ socks5d) on loopback.
type stack struct {
	dir                  string
	server, agent, socks *proc
	delay                *delayRelay
	admin                string
	socksAddr            string
	proxy                map[string]string // target -> proxy port address
	tlsInfo              string            // what the TLS probe negotiated ("" without TLS)
}

func startStack(bins, runDir string, ports *portAlloc, o stackOpts) (st *stack, err error) {
	dir := filepath.Join(runDir, o.name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	st = &stack{dir: dir, proxy: map[string]string{}}
	defer func() {
		if err != nil {
			st.stop()
		}
	}()
	control, err := ports.addr()
	if err != nil {
		return nil, err
	}
	relay, err := ports.take(1)
	if err != nil {
		return nil, err
	}
	admin, err := ports.addr()
	if err != nil {
		return nil, err
	}
	lo, err := ports.take(len(o.targets) + 4)
	if err != nil {
		return nil, err
	}
	st.admin = admin
	env := []string{tokenEnv + "=" + benchToken}
	var serverTLS, agentTLS string
	if o.tls != nil {
		serverTLS, agentTLS = o.tls.serverYAML(), o.tls.agentYAML()
	}

	scfg := fmt.Sprintf(`server_id: vpcbench
control: %s
advertise: 127.0.0.1
relay_port: %d
admin: %s
port_range: %d-%d
token: {env: %s}
drain_grace: 1s
log: {level: warn}
%s%s`, control, relay, admin, lo, lo+len(o.targets)+3, tokenEnv, serverTLS, o.tunnel.yaml())
	if err := writeFile(dir, "proxyserver.yaml", scfg); err != nil {
		return nil, err
	}
	if st.server, err = startProc(dir, "proxyserver", env, filepath.Join(bins, "proxyserver"),
		"-config", filepath.Join(dir, "proxyserver.yaml")); err != nil {
		return nil, err
	}
	// The admin listener binds after the control and relay listeners.
	if err := waitTCP(admin, st.server, 10*time.Second); err != nil {
		return nil, err
	}

	serverAddr := control
	if o.viaDelay {
		da, err := ports.addr()
		if err != nil {
			return nil, err
		}
		if st.delay, err = startDelayRelay(da, control); err != nil {
			return nil, err
		}
		serverAddr = st.delay.addr()
	}
	var tg strings.Builder
	for _, t := range o.targets {
		fmt.Fprintf(&tg, "  - addr: %s\n", t)
	}
	acfg := fmt.Sprintf(`agent_id: %s
servers: [%s]
token: {env: %s}
drain_grace: 1s
backoff_max: 1s
log: {level: warn}
targets:
%s%s%s`, benchAgentID, serverAddr, tokenEnv, tg.String(), agentTLS, o.tunnel.yaml())
	if err := writeFile(dir, "agent.yaml", acfg); err != nil {
		return nil, err
	}
	if st.agent, err = startProc(dir, "agent", env, filepath.Join(bins, "agent"),
		"-config", filepath.Join(dir, "agent.yaml")); err != nil {
		return nil, err
	}
	if err := st.waitRoutes(o.targets, 20*time.Second); err != nil {
		return nil, err
	}
	if o.tls != nil {
		if st.tlsInfo, err = probeTLS(control, o.tls); err != nil {
			return nil, err
		}
	}

	if o.socks {
		if st.socksAddr, err = ports.addr(); err != nil {
			return nil, err
		}
		kcfg := fmt.Sprintf(`listen: %s
lookup_api: http://%s
drain_grace: 1s
log: {level: warn}
`, st.socksAddr, admin)
		if err := writeFile(dir, "socks5d.yaml", kcfg); err != nil {
			return nil, err
		}
		if st.socks, err = startProc(dir, "socks5d", nil, filepath.Join(bins, "socks5d"),
			"-config", filepath.Join(dir, "socks5d.yaml")); err != nil {
			return nil, err
		}
		if err := waitTCP(st.socksAddr, st.socks, 10*time.Second); err != nil {
			return nil, err
		}
	}
	return st, nil
}

// startStack starts a stack of the run and notes what its tunnel's TLS
// negotiated, the first time one has TLS.
func (e *env) startStack(o stackOpts) (*stack, error) {
	st, err := startStack(e.bins, e.dir, e.ports, o)
	if err == nil && st.tlsInfo != "" && e.tlsInfo == "" {
		logf("tunnel TLS: %s", st.tlsInfo)
		e.tlsInfo = st.tlsInfo
	}
	return st, err
}

// waitTCP waits until addr accepts connections, or p dies.
func waitTCP(addr string, p *proc, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if !p.alive() {
			return p.exitErr()
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: %s not accepting after %v: %v\n%s", p.name, addr, timeout, err, p.tail(10))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func writeFile(dir, name, text string) error {
	return os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644)
}

// waitRoutes polls the lookup API (GET /v1/routes, field "proxy") until
// every target has a route.
func (st *stack) waitRoutes(targets []string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	client := &http.Client{Timeout: 2 * time.Second}
	var last string
	for {
		for _, p := range []*proc{st.server, st.agent} {
			if !p.alive() {
				return p.exitErr()
			}
		}
		resp, err := client.Get("http://" + st.admin + "/v1/routes")
		if err == nil {
			var routes []struct {
				Target string `json:"target"`
				Proxy  string `json:"proxy"`
			}
			err = json.NewDecoder(resp.Body).Decode(&routes)
			resp.Body.Close()
			if err == nil {
				for _, r := range routes {
					st.proxy[r.Target] = r.Proxy
				}
				missing := 0
				for _, t := range targets {
					if st.proxy[t] == "" {
						missing++
					}
				}
				if missing == 0 {
					return nil
				}
				last = fmt.Sprintf("%d of %d targets have no route yet", missing, len(targets))
			}
		}
		if err != nil {
			last = err.Error()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("routes not up after %v (%s)\nproxyserver:\n%s\nagent:\n%s",
				timeout, last, st.server.tail(10), st.agent.tail(10))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// pids are the vpcreach processes whose CPU a path through this stack
// costs.
func (st *stack) pids(withSocks bool) []int {
	out := []int{st.server.pid(), st.agent.pid()}
	if withSocks && st.socks != nil {
		out = append(out, st.socks.pid())
	}
	return out
}

// check returns an error if a process of the stack has died.
func (st *stack) check() error {
	for _, p := range []*proc{st.server, st.agent, st.socks} {
		if p != nil && !p.alive() {
			return p.exitErr()
		}
	}
	return nil
}

func (st *stack) stop() {
	if st == nil {
		return
	}
	st.socks.stop()
	st.agent.stop()
	if st.delay != nil {
		st.delay.close()
	}
	st.server.stop()
}
