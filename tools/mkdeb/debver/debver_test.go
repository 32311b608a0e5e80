package debver

import (
	"os/exec"
	"testing"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

func TestFromGit(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"v1.2.3", "1.2.3"},
		{"1.2.3", "1.2.3"},
		{"v1.2.3-rc.1", "1.2.3~rc.1"},
		{"v1.2.3-4-g0abc123", "1.2.3+git4.g0abc123"},
		{"v1.2.3-rc.1-4-g0abc123-dirty", "1.2.3~rc.1+git4.g0abc123.dirty"},
		{"v1.2.3-dirty", "1.2.3+dirty"},
		{"0307980", "0.0.0~git0307980"},
		{"0307980-dirty", "0.0.0~git0307980+dirty"},
		{"1234567", "0.0.0~git1234567"}, // an all-digit short sha is still a sha
		{"dev", "0.0.0~dev"},
		{" v2.0.0\n", "2.0.0"},
	} {
		got, err := FromGit(c.in)
		if err != nil || got != c.want {
			t.Errorf("FromGit(%q) = %q, %v; want %q", c.in, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "v1.2.3_beta", "release/1.0", "1.0:1"} {
		if got, err := FromGit(bad); err == nil {
			t.Errorf("FromGit(%q) = %q, want an error", bad, got)
		}
	}
}

// TestOrder: dpkg itself agrees that the versions sort in build order.
func TestOrder(t *testing.T) {
	dpkg := testutil.NeedBinary(t, "dpkg")
	order := []string{"0307980", "0307980-dirty", "v1.2.3-rc.1", "v1.2.3-rc.1-4-g0abc123",
		"v1.2.3", "v1.2.3-4-g0abc123", "v1.2.3-4-g0abc123-dirty", "v1.2.3-5-g0000000", "v1.10.0"}
	for i := 1; i < len(order); i++ {
		a, err := FromGit(order[i-1])
		if err != nil {
			t.Fatal(err)
		}
		b, err := FromGit(order[i])
		if err != nil {
			t.Fatal(err)
		}
		if err := exec.Command(dpkg, "--compare-versions", a, "lt", b).Run(); err != nil {
			t.Errorf("dpkg --compare-versions %s lt %s: %v (from %s, %s)", a, b, err, order[i-1], order[i])
		}
	}
}
