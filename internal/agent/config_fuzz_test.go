package agent

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vpcreach/vpcreach/internal/config"
)

// FuzzConfig: any file gives a Config or an error, never a panic; every
// target of an accepted one parses.
func FuzzConfig(f *testing.F) {
	for _, name := range []string{"agent.yaml", "demo/agent.yaml"} {
		if data, err := os.ReadFile(filepath.Join("..", "..", "configs", name)); err == nil {
			f.Add(data)
		}
	}
	f.Add([]byte("servers: [a:1]\ntoken: {env: HOME}\ntargets: [{addr: ':80'}, {addr: '[::1]:22', network: lab}]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		var c Config
		if err := config.Parse(data, &c); err != nil {
			return
		}
		for _, tc := range c.Targets {
			if _, err := tc.parse(); err != nil {
				t.Fatalf("accepted config with a bad target %+v: %v", tc, err)
			}
		}
	})
}
