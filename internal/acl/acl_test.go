package acl

import (
	"strings"
	"testing"

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

func TestRules(t *testing.T) {
	for _, tc := range []struct {
		rule  string
		allow []string
		deny  []string
	}{
		{"10.1.0.0/16:6379", []string{"10.1.2.3:6379"}, []string{"10.2.0.1:6379", "10.1.2.3:6380", "vpc-a/10.1.2.3:6379"}},
		{"10.1.0.5:80-443", []string{"10.1.0.5:80", "10.1.0.5:443", "10.1.0.5:200"}, []string{"10.1.0.5:79", "10.1.0.5:444", "10.1.0.6:80"}},
		{"vpc-a/10.2.0.0/16:*", []string{"vpc-a/10.2.9.9:1", "vpc-a/10.2.0.1:65535"}, []string{"10.2.0.1:80", "vpc-b/10.2.0.1:80"}},
		{"*/0.0.0.0/0:*", []string{"1.2.3.4:5", "vpc-z/10.0.0.1:22"}, []string{"[2001:db8::1]:80"}},
		{"[2001:db8::/32]:443", []string{"[2001:db8::5]:443"}, []string{"[2001:db9::5]:443", "10.0.0.1:443"}},
		{"[::1]:22", []string{"[::1]:22"}, []string{"127.0.0.1:22"}},
	} {
		r, err := Parse(tc.rule)
		if err != nil {
			t.Fatalf("Parse(%q): %v", tc.rule, err)
		}
		if r.String() != tc.rule {
			t.Errorf("String() = %q", r.String())
		}
		for _, s := range tc.allow {
			if !r.Allows(key(t, s)) {
				t.Errorf("%s does not allow %s", tc.rule, s)
			}
		}
		for _, s := range tc.deny {
			if r.Allows(key(t, s)) {
				t.Errorf("%s allows %s", tc.rule, s)
			}
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, s := range []string{"", "10.0.0.0/8", "10.0.0.0/8:0", "10.0.0.0/8:70000", "10.0.0.0/8:9-3",
		"bad net!/10.0.0.0/8:1", "10.0.0.300:1", "[2001:db8::/32:443", "::ffff:10.0.0.1:80", "10.0.0.0/33:1"} {
		if _, err := Parse(s); err == nil || !strings.Contains(err.Error(), "acl rule") {
			t.Errorf("Parse(%q) = %v, want an error naming the rule", s, err)
		}
	}
}

func TestList(t *testing.T) {
	l, err := ParseList([]string{"10.1.0.0/16:6379", "vpc-a/10.2.0.0/16:80"})
	if err != nil {
		t.Fatal(err)
	}
	if !l.Allows(key(t, "10.1.0.9:6379")) || !l.Allows(key(t, "vpc-a/10.2.0.9:80")) || l.Allows(key(t, "10.2.0.9:80")) {
		t.Fatal("list matching wrong")
	}
	if (List{}).Allows(key(t, "10.1.0.9:6379")) {
		t.Fatal("an empty list allowed something")
	}
	if _, err := ParseList([]string{"10.0.0.0/8:1", "nonsense"}); err == nil {
		t.Fatal("ParseList accepted a bad rule")
	}
}
