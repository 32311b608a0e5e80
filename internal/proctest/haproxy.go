package proctest

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// HAProxyServer is one backend line of the rendered haproxy config.
type HAProxyServer struct{ Name, Addr string }

// HAProxyConfig renders configs/haproxy/haproxy.cfg for a test: the VIP
// bound to vip, the members between the BEGIN and END markers, health
// checks and forwarded connections from source (the members' trusted
// balancer address). The shipped example is what the tests run.
func HAProxyConfig(t testing.TB, vip, source string, members []HAProxyServer) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(ModuleRoot(t), "configs", "haproxy", "haproxy.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(data)
	bind := regexp.MustCompile(`(?m)^(\s*bind )\S+`)
	if !bind.MatchString(cfg) {
		t.Fatal("configs/haproxy/haproxy.cfg has no bind line")
	}
	cfg = bind.ReplaceAllString(cfg, "${1}"+vip)
	var servers strings.Builder
	servers.WriteString("    # BEGIN members\n    source " + source + "\n")
	for _, m := range members {
		fmt.Fprintf(&servers, "    server %s %s\n", m.Name, m.Addr)
	}
	block := regexp.MustCompile(`(?s)    # BEGIN members\n.*    # END members`)
	if !block.MatchString(cfg) {
		t.Fatal("configs/haproxy/haproxy.cfg lost its BEGIN/END members markers")
	}
	return block.ReplaceAllLiteralString(cfg, servers.String()+"    # END members")
}
