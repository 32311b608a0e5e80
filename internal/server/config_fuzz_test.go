package server

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vpcreach/vpcreach/internal/config"
)

// FuzzConfig: any file gives a Config or an error, never a panic; an
// accepted one has its defaults filled.
func FuzzConfig(f *testing.F) {
	for _, name := range []string{"proxyserver.yaml", "demo/proxyserver.yaml"} {
		if data, err := os.ReadFile(filepath.Join("..", "..", "configs", name)); err == nil {
			f.Add(data)
		}
	}
	f.Add([]byte("control: 127.0.0.1:0\nadvertise: 127.0.0.1\nport_range: 1-2\ninsecure_no_auth: true\n"))
	f.Add([]byte("policy: [{identity: a, allow: ['10.0.0.0/8:*', 'x/1.2.3.4:80-90']}]\n"))
	f.Add([]byte("proxy_allow: [10.0.0.0/33]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var c Config
		if err := config.Parse(data, &c); err != nil {
			return
		}
		if c.Lease <= 0 || c.MinAgentVersion == 0 || c.MaxTunnelsPerSource <= 0 {
			t.Fatalf("accepted config without defaults: %+v", c)
		}
	})
}
