package socks

import (
	"encoding/base64"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/registry"
)

func key(t *testing.T, s string) registry.Key {
	t.Helper()
	k, err := registry.ParseKey(s)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func table(t *testing.T, network string, users ...User) *authTable {
	t.Helper()
	var p config.Problems
	tb := compileUsers(users, network, &p, "users")
	if err := p.Err(); err != nil {
		t.Fatal(err)
	}
	return tb
}

func TestCheckCredentials(t *testing.T) {
	tb := table(t, "",
		user(t, "alice", "alice-password", "10.0.0.0/8:*"),
		user(t, "bob", "b0b-password-that-is-much-longer-than-alice's", "10.0.0.0/8:*"))
	long := strings.Repeat("x", 1000)
	for _, tc := range []struct {
		name, pass string
		want       string // "" none
	}{
		{"alice", "alice-password", "alice"},
		{"bob", "b0b-password-that-is-much-longer-than-alice's", "bob"},
		{"alice", "alice-passwore", ""},
		{"alice", "alice-password ", ""},
		{"alice", "", ""},
		{"alice", "b0b-password-that-is-much-longer-than-alice's", ""}, // another user's password
		{"carol", "alice-password", ""},                                // unknown user
		{"", "", ""},
		{long, long, ""},
		{"Alice", "alice-password", ""}, // names are case sensitive
	} {
		u := tb.check(tc.name, tc.pass)
		got := ""
		if u != nil {
			got = u.name
		}
		if got != tc.want {
			t.Errorf("check(%.20q, %.20q) = %q; want %q", tc.name, tc.pass, got, tc.want)
		}
	}
	var none *authTable
	if none.required() || none.check("alice", "alice-password") != nil {
		t.Error("a nil table requires auth or lets someone in")
	}
	if deny := (&authTable{denyAll: true}); !deny.required() || deny.check("", "") != nil {
		t.Error("a deny-all table lets someone in")
	}

	basic := func(s string) string { return "Basic " + base64.StdEncoding.EncodeToString([]byte(s)) }
	for _, tc := range []struct{ h, want, name string }{
		{basic("alice:alice-password"), "alice", "alice"},
		{"basic " + base64.StdEncoding.EncodeToString([]byte("alice:alice-password")), "alice", "alice"},
		{basic("alice:wrong-password"), "", "alice"},
		{basic("alice:alice-password:x"), "", "alice"}, // the password is everything after the first ':'
		{basic("alice"), "", "alice"},
		{"Basic !!!", "", ""},
		{"Bearer abc", "", ""},
		{"", "", ""},
	} {
		u, name := tb.checkBasic(tc.h)
		got := ""
		if u != nil {
			got = u.name
		}
		if got != tc.want || name != tc.name {
			t.Errorf("checkBasic(%q) = %q, name %q; want %q, %q", tc.h, got, name, tc.want, tc.name)
		}
	}
}

func TestPermits(t *testing.T) {
	alice := user(t, "alice", "alice-password", "10.1.0.0/16:6379", "10.2.0.5:80-443")
	bob := user(t, "bob", "bob-password", "*/10.0.0.0/8:*")
	old := table(t, "", alice, bob)
	a, b := old.byName["alice"], old.byName["bob"]
	for _, tc := range []struct {
		u    *userEntry
		k    string
		want denial
	}{
		{a, "10.1.2.3:6379", allowed},
		{a, "10.1.2.3:6380", notInACL},
		{a, "10.2.0.5:443", allowed},
		{a, "10.2.0.6:443", notInACL},
		{a, "vpc-a/10.1.2.3:6379", notInACL},
		{b, "vpc-z/10.200.0.1:1", allowed},
		{b, "192.168.0.1:80", notInACL},
		{nil, "10.1.2.3:6379", needsAuth},
	} {
		if _, got := old.permits(tc.u, key(t, tc.k)); got != tc.want {
			t.Errorf("permits(%v, %s) = %v; want %v", tc.u != nil, tc.k, got, tc.want)
		}
	}
	// Without users anything goes, anonymous included.
	var open *authTable
	if _, got := open.permits(nil, key(t, "1.2.3.4:5")); got != allowed {
		t.Errorf("no users: %v", got)
	}
	// A newer table: alice narrowed, bob's password changed, carol new.
	next := table(t, "", user(t, "alice", "alice-password", "10.1.0.0/16:6379"),
		user(t, "bob", "bob-new-password", "*/10.0.0.0/8:*"), user(t, "carol", "carol-password", "10.0.0.0/8:*"))
	if u, got := next.permits(a, key(t, "10.1.2.3:6379")); got != allowed || u != next.byName["alice"] {
		t.Errorf("alice, still allowed: %v (entry updated: %v)", got, u == next.byName["alice"])
	}
	if _, got := next.permits(a, key(t, "10.2.0.5:443")); got != notInACL {
		t.Errorf("alice, narrowed: %v", got)
	}
	if _, got := next.permits(b, key(t, "10.1.2.3:6379")); got != needsAuth {
		t.Errorf("bob with his old password: %v", got)
	}
	gone := table(t, "", user(t, "carol", "carol-password", "10.0.0.0/8:*"))
	if _, got := gone.permits(a, key(t, "10.1.2.3:6379")); got != needsAuth {
		t.Errorf("alice removed: %v", got)
	}
}

func TestConfigValidateUsers(t *testing.T) {
	c := Config{Listen: ":1080", Users: []User{user(t, "alice", "alice-password", "10.0.0.0/8:*")}}
	if err := c.Validate(); err != nil {
		t.Fatalf("valid users refused: %v", err)
	}
	if c.auth == nil || c.auth.check("alice", "alice-password") == nil {
		t.Fatal("Validate did not compile the users")
	}
	if c.MaxConnsPerSource != DefaultMaxConnsPerSource {
		t.Errorf("max_conns_per_source default %d", c.MaxConnsPerSource)
	}
	t.Setenv("SOCKS_TEST_PASS", "from-the-environment")
	c = Config{Listen: ":1080", Network: "vpc-a", MaxConnsPerSource: 5, Users: []User{
		{Name: "env", Password: config.Secret{Env: "SOCKS_TEST_PASS"}, Allow: []string{"vpc-a/10.0.0.0/8:*"}}}}
	if err := c.Validate(); err != nil {
		t.Fatalf("valid users refused: %v", err)
	}
	if c.auth.check("env", "from-the-environment") == nil || c.MaxConnsPerSource != 5 {
		t.Error("env password or max_conns_per_source not taken")
	}

	ok := user(t, "ok", "ok-password", "10.0.0.0/8:*")
	for _, tc := range []struct {
		name    string
		network string
		users   []User
		max     int
		want    []string
	}{
		{"no name", "", []User{user(t, "", "long-enough", "10.0.0.0/8:*")}, 0, []string{"users[0].name: required"}},
		{"colon in name", "", []User{user(t, "a:b", "long-enough", "10.0.0.0/8:*")}, 0, []string{"users[0].name:"}},
		{"space in name", "", []User{user(t, "a b", "long-enough", "10.0.0.0/8:*")}, 0, []string{"users[0].name:"}},
		{"long name", "", []User{user(t, strings.Repeat("n", 256), "long-enough", "10.0.0.0/8:*")}, 0, []string{"users[0].name: longer"}},
		{"duplicate", "", []User{ok, ok}, 0, []string{"users[1].name: \"ok\" appears twice"}},
		{"no password", "", []User{{Name: "x", Allow: []string{"10.0.0.0/8:*"}}}, 0, []string{"users[0].password: required"}},
		{"short password", "", []User{user(t, "x", "short", "10.0.0.0/8:*")}, 0, []string{"users[0].password: must be 8-255"}},
		{"long password", "", []User{user(t, "x", strings.Repeat("p", 256), "10.0.0.0/8:*")}, 0, []string{"users[0].password: must be 8-255"}},
		{"missing file", "", []User{{Name: "x", Password: config.Secret{File: "/nonexistent/pass"}, Allow: []string{"10.0.0.0/8:*"}}}, 0, []string{"users[0].password:"}},
		{"no allow", "", []User{user(t, "x", "long-enough")}, 0, []string{"users[0].allow: required"}},
		{"bad rule", "", []User{user(t, "x", "long-enough", "10.0.0.0/8:*", "10.0.0.0/8")}, 0, []string{"users[0].allow[1]:"}},
		{"other network only", "vpc-a", []User{user(t, "x", "long-enough", "10.0.0.0/8:*", "vpc-b/10.0.0.0/8:*")}, 0, []string{`users[0].allow: no rule applies to network "vpc-a"`}},
		{"negative cap", "", nil, -1, []string{"max_conns_per_source:"}},
		{"all at once", "", []User{ok, user(t, "", "short"), user(t, "z", "long-enough", "x:1")}, -1,
			[]string{"users[1].name:", "users[1].password:", "users[1].allow:", "users[2].allow[0]:", "max_conns_per_source:"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{Listen: ":1080", Network: tc.network, Users: tc.users, MaxConnsPerSource: tc.max}
			err := c.Validate()
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "long-enough") {
				t.Errorf("error %q shows a password", err)
			}
		})
	}
}

// The commented users example in configs/socks5d.yaml, uncommented,
// loads: the documented syntax is the real one.
func TestExampleConfigUsers(t *testing.T) {
	data, err := os.ReadFile("../../configs/socks5d.yaml")
	if err != nil {
		t.Fatal(err)
	}
	pass := user(t, "x", "controller-password").Password.File
	t.Setenv("VPCREACH_SOCKS_METRICS_PASSWORD", "metrics-password")
	var out []string
	in := false
	for _, line := range strings.Split(string(data), "\n") {
		if line == "# users:" {
			in = true
		} else if in && !strings.HasPrefix(line, "#   ") {
			in = false
		}
		if in {
			line = strings.Replace(strings.TrimPrefix(line, "# "), "/etc/vpcreach/socks-controller.pass", pass, 1)
		}
		out = append(out, line)
	}
	var c DaemonConfig
	if err := config.Parse([]byte(strings.Join(out, "\n")), &c); err != nil {
		t.Fatal(err)
	}
	if len(c.Users) != 2 || c.auth.check("controller", "controller-password") == nil ||
		c.auth.check("metrics", "metrics-password") == nil {
		t.Fatalf("users not loaded: %+v", c.Users)
	}
	ctl := c.auth.byName["controller"]
	for k, want := range map[string]bool{"10.1.2.3:6379": true, "10.1.0.5:443": true, "vpc-a/10.2.0.1:22": true,
		"10.1.2.3:6380": false, "10.2.0.1:22": false} {
		if got := ctl.rules.Allows(key(t, k)); got != want {
			t.Errorf("controller -> %s: %v, want %v", k, got, want)
		}
	}
	if m := c.auth.byName["metrics"]; !m.rules.Allows(key(t, "vpc-z/10.9.9.9:9100")) || !m.rules.Allows(key(t, "[fd00::1]:9100")) {
		t.Error("metrics rules wrong")
	}
}

// Two validations of the same users compare equal, so that a reload
// (the proxy server's restart-field check uses reflect.DeepEqual) sees no
// change where there is none, and a changed password is a change.
func TestCompiledUsersCompare(t *testing.T) {
	u := user(t, "alice", "alice-password", "10.0.0.0/8:*")
	a := Config{Listen: ":1080", Users: []User{u}}
	b := Config{Listen: ":1080", Users: []User{u}}
	if err := a.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := b.Validate(); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Fatal("the same users compile to different tables")
	}
	if err := os.WriteFile(u.Password.File, []byte("another-password"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := b.Validate(); err != nil {
		t.Fatal(err)
	}
	if reflect.DeepEqual(a, b) {
		t.Fatal("a changed password compiles to the same table")
	}
}
