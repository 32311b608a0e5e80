package agent

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/config"
)

// tokenFile writes a token file of the given content in t.TempDir.
func tokenFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// validYAML is a valid agent config without its targets section.
func validYAML(t *testing.T) string {
	return "agent_id: test-agent\nservers: [127.0.0.1:7000, 127.0.0.2:7000]\ntoken: {file: " +
		tokenFile(t, "token", "0123456789abcdef0123\n") + "}\n"
}

const baseTargets = `targets:
  - addr: ":8080"
  - addr: 10.0.0.5:22
    proxy_port: 20022
`

func TestConfigValidDefaults(t *testing.T) {
	var c Config
	if err := config.Parse([]byte(validYAML(t)+baseTargets), &c); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	for _, d := range []struct {
		key       string
		got, want time.Duration
	}{
		{"dial_timeout", c.DialTimeout, 5 * time.Second},
		{"connect_timeout", c.ConnectTimeout, 5 * time.Second},
		{"idle_timeout", c.IdleTimeout, time.Hour},
		{"drain_grace", c.DrainGrace, 30 * time.Second},
		{"backoff_max", c.BackoffMax, 15 * time.Second},
	} {
		if d.got != d.want {
			t.Errorf("%s default = %v; want %v", d.key, d.got, d.want)
		}
	}
	if c.Tunnel.MaxStreams <= 0 {
		t.Errorf("tunnel defaults not filled: %+v", c.Tunnel)
	}
	if len(c.Servers) != 2 || len(c.Targets) != 2 || c.Targets[1].ProxyPort != 20022 {
		t.Errorf("decoded %+v", c)
	}
	if tok, err := c.Token.Read(); err != nil || tok != "0123456789abcdef0123" {
		t.Errorf("token = %q, %v", tok, err)
	}

	// Set values are kept, and one address may be exposed in two networks.
	c = Config{}
	y := validYAML(t) + baseTargets + "  - addr: 10.0.0.5:22\n    network: lab\ndial_timeout: 2s\nbackoff_max: 1m\n"
	if err := config.Parse([]byte(y), &c); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	if c.DialTimeout != 2*time.Second || c.BackoffMax != time.Minute {
		t.Errorf("set durations overwritten: dial %v, backoff %v", c.DialTimeout, c.BackoffMax)
	}
}

func TestConfigErrorsNameTheKey(t *testing.T) {
	base := validYAML(t)
	tok := tokenFile(t, "token", "0123456789abcdef0123")
	short := tokenFile(t, "short", "short\n")
	withTarget := func(extra string) string { return base + baseTargets + extra }
	replace := func(old, new string) string {
		y := base + baseTargets
		if !strings.Contains(y, old) {
			t.Fatalf("test bug: %q not in the base config", old)
		}
		return strings.Replace(y, old, new, 1)
	}
	t.Setenv("VPCREACH_TEST_UNSET_TOKEN", "")
	os.Unsetenv("VPCREACH_TEST_UNSET_TOKEN")
	for _, tc := range []struct {
		name, yaml string
		want       []string
	}{
		{"unknown key", withTarget("bogus_key: 1\n"), []string{"bogus_key"}},
		{"unknown target key", replace(`  - addr: ":8080"`+"\n", `  - addr: ":8080"`+"\n    prot: tcp\n"), []string{"prot"}},
		{"missing servers", replace("servers: [127.0.0.1:7000, 127.0.0.2:7000]\n", ""), []string{"servers:"}},
		{"bad server", replace("127.0.0.2:7000", "127.0.0.2"), []string{"servers[1]"}},
		{"no targets", base, []string{"targets:"}},
		{"target without port", replace("10.0.0.5:22", "10.0.0.5"), []string{"targets[1].addr"}},
		{"target port 0", replace("10.0.0.5:22", "10.0.0.5:0"), []string{"targets[1].addr", "bad port"}},
		{"DNS name target", replace("10.0.0.5:22", "db.internal:22"), []string{"targets[1].addr", "DNS"}},
		{"bad network", withTarget("  - addr: 10.0.0.7:22\n    network: \"bad net!\"\n"), []string{"targets[2].network"}},
		{"duplicate target", withTarget("  - addr: 10.0.0.5:22\n"), []string{"targets[2]", "duplicate"}},
		{"duplicate, mapped spelling", withTarget("  - addr: \"[::ffff:10.0.0.5]:22\"\n"), []string{"targets[2]", "duplicate"}},
		{"duplicate, port spelling", withTarget("  - addr: 10.0.0.5:022\n"), []string{"targets[2]", "duplicate"}},
		{"duplicate, unspecified spelling", withTarget("  - addr: 0.0.0.0:8080\n"), []string{"targets[2]", "duplicate"}},
		{"duplicate, IPv6 unspecified spelling", withTarget("  - addr: \"[::]:8080\"\n"), []string{"targets[2]", "duplicate"}},
		{"short token", replace("{file: ", "{file: "+short+"} #"), []string{"token", "shorter"}},
		{"missing token file", replace("{file: ", "{file: /nonexistent/token} #"), []string{"token"}},
		{"no token", replace("token: {file: ", "#"), []string{"token"}},
		{"token env unset", replace("{file: ", "{env: VPCREACH_TEST_UNSET_TOKEN} #"), []string{"token", "VPCREACH_TEST_UNSET_TOKEN"}},
		{"token file and env", replace("{file: ", "{file: "+tok+", env: HOME} #"), []string{"token"}},
		{"negative duration", withTarget("dial_timeout: -1s\n"), []string{"dial_timeout"}},
		{"bad duration", withTarget("drain_grace: soon\n"), []string{"drain_grace"}},
		{"long agent id", replace("agent_id: test-agent", "agent_id: "+strings.Repeat("x", 200)), []string{"agent_id"}},
		{"bad log level", withTarget("log: {level: loud}\n"), []string{"log.level"}},
		{"every problem at once", strings.Replace(replace("10.0.0.5:22", "db.internal:22"), "servers: [127.0.0.1:7000, 127.0.0.2:7000]\n", "", 1) + "backoff_max: -1s\n",
			[]string{"servers:", "targets[1].addr", "backoff_max"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := config.Parse([]byte(tc.yaml), &Config{})
			if err == nil {
				t.Fatalf("accepted:\n%s", tc.yaml)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
		})
	}
}
