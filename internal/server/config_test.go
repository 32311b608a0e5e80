package server

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vpcreach/vpcreach/internal/config"
)

func TestConfigErrorsNameTheKey(t *testing.T) {
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	os.WriteFile(tok, []byte("0123456789abcdef0123"), 0o600)
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("short"), 0o600)
	base := "control: 127.0.0.1:7000\nadvertise: 127.0.0.1\nrelay_port: 7001\nport_range: 20000-20999\ntoken: {file: " + tok + "}\n"
	if err := config.Parse([]byte(base), &Config{}); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	for _, tc := range []struct{ name, yaml, want string }{
		{"unknown key", base + "bogus_key: 1\n", "bogus_key"},
		{"missing control", strings.Replace(base, "control: 127.0.0.1:7000\n", "", 1), "control"},
		{"missing advertise", strings.Replace(base, "advertise: 127.0.0.1\n", "", 1), "advertise"},
		{"bad range", strings.Replace(base, "20000-20999", "20999-20000", 1), "port_range"},
		{"relay in range", strings.Replace(base, "relay_port: 7001", "relay_port: 20001", 1), "relay_port"},
		{"short token", strings.Replace(base, tok, short, 1), "token"},
		{"no token", strings.Replace(base, "token: {file: "+tok+"}\n", "", 1), "token"},
		{"bad duration", base + "lease: fast\n", "lease"},
		{"unknown nested key", base + "tunnel: {windw: 5}\n", "windw"},
		{"bad log level", base + "log: {level: loud}\n", "log.level"},
		{"bad policy CIDR", base + "policy: [{identity: a, allow: ['10.0.0.0/33:80']}]\n", "policy[0]"},
		{"bad policy port", base + "policy: [{identity: a, allow: ['10.0.0.0/8:0']}]\n", "policy[0]"},
		{"bad proxy_allow", base + "proxy_allow: [not-a-cidr]\n", "proxy_allow"},
		{"bad relay_allow", base + "relay_allow: [10.0.0.0/40]\n", "relay_allow"},
		{"bad proxy_bind", base + "proxy_bind: nowhere\n", "proxy_bind"},
		{"bad balancer", base + "proxy_protocol_from: [x.y]\n", "proxy_protocol_from"},
		{"token and tokens_file", base + "tokens_file: " + tok + "\n", "tokens_file"},
		{"tokens_file not a map", strings.Replace(base, "token: {file: "+tok+"}", "tokens_file: "+tok, 1), "tokens_file"},
		{"tls without key", base + "tls: {cert_file: /nonexistent}\n", "tls"},
		{"min_agent_version", base + "min_agent_version: 9\n", "min_agent_version"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := config.Parse([]byte(tc.yaml), &Config{})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v; want one naming %q", err, tc.want)
			}
		})
	}
}
