// Package pkg_test checks the .deb packages: it runs `make package` as a
// subprocess (so nfpm never enters a test binary built with -race),
// inspects both packages with dpkg-deb, then installs them on this
// machine, runs the installed binaries on the installed example configs,
// and purges them, leaving the machine as it was.
package pkg_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/proctest"
	"github.com/vpcreach/vpcreach/internal/testutil"
)

const (
	// gitVersion is what the test passes as VERSION: stamped into the
	// binaries as is, and converted by tools/mkdeb into debVersion.
	gitVersion = "v1.2.3-rc.1-4-g0abc123-dirty"
	debVersion = "1.2.3~rc.1+git4.g0abc123.dirty"

	sysUser   = "vpcreach"
	tokenFile = "/etc/vpcreach/token"
	confDir   = "/etc/vpcreach"
)

// pkgSpec is what one package must hold.
type pkgSpec struct {
	name     string
	binaries []string
	units    []string
	configs  []string
}

var specs = []pkgSpec{
	{"vpcreach-agent", []string{"agent"}, []string{"vpcreach-agent.service"}, []string{"agent.yaml"}},
	{"vpcreach-proxyserver", []string{"proxyserver", "socks5d"},
		[]string{"vpcreach-proxyserver.service", "vpcreach-socks5d.service"},
		[]string{"proxyserver.yaml", "socks5d.yaml"}},
}

func TestDeb(t *testing.T) {
	makeBin := testutil.NeedBinary(t, "make")
	testutil.NeedBinary(t, "dpkg-deb")
	dpkg := testutil.NeedBinary(t, "dpkg")
	root := proctest.ModuleRoot(t)
	arch := strings.TrimSpace(run(t, dpkg, "--print-architecture"))
	debs := buildPackages(t, makeBin, root)

	for _, s := range specs {
		t.Run("Inspect/"+s.name, func(t *testing.T) {
			inspect(t, root, s, debs[s.name], arch)
		})
	}
	t.Run("Install", func(t *testing.T) {
		install(t, debs)
	})
}

// buildPackages runs `make package` into a temp dir and returns the path
// of each package by name.
func buildPackages(t *testing.T, makeBin, root string) map[string]string {
	dist := t.TempDir()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, makeBin, "-C", root, "package", "VERSION="+gitVersion, "DIST="+dist)
	// A parent make (make test) must not hand its jobserver or flags down.
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "GOOS", "GOARCH":
			continue
		}
		cmd.Env = append(cmd.Env, kv)
	}
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("make package: %v\n%s", err, out)
	}
	t.Logf("make package: %v", time.Since(start).Round(time.Millisecond))
	debs := map[string]string{}
	for _, s := range specs {
		matches, _ := filepath.Glob(filepath.Join(dist, s.name+"_*.deb"))
		if len(matches) != 1 {
			t.Fatalf("want one %s_*.deb in %s, found %v\nmake output:\n%s", s.name, dist, matches, out)
		}
		debs[s.name] = matches[0]
	}
	return debs
}

// entry is one line of `dpkg-deb --contents`.
type entry struct{ perm, owner string }

// inspect checks one package's fields, files, conffiles and scripts.
func inspect(t *testing.T, root string, s pkgSpec, deb, arch string) {
	wantName := fmt.Sprintf("%s_%s_%s.deb", s.name, debVersion, arch)
	if filepath.Base(deb) != wantName {
		t.Errorf("file name %s, want %s", filepath.Base(deb), wantName)
	}
	fields := map[string]string{
		"Package":      s.name,
		"Version":      debVersion,
		"Architecture": arch,
		"Section":      "net",
		"Priority":     "optional",
		"Homepage":     "https://github.com/vpcreach/vpcreach",
	}
	for f, want := range fields {
		if got := strings.TrimSpace(run(t, "dpkg-deb", "-f", deb, f)); got != want {
			t.Errorf("%s: %s = %q, want %q", s.name, f, got, want)
		}
	}
	for _, f := range []string{"Maintainer", "Description", "Depends"} {
		if strings.TrimSpace(run(t, "dpkg-deb", "-f", deb, f)) == "" {
			t.Errorf("%s: field %s is empty", s.name, f)
		}
	}
	if m := run(t, "dpkg-deb", "-f", deb, "Maintainer"); !regexp.MustCompile(`^.+ <[^@ ]+@[^> ]+>\s*$`).MatchString(m) {
		t.Errorf("Maintainer %q is not 'Name <address>'", m)
	}

	// Files: exactly these regular files, with these modes, all root's.
	got := contents(t, deb)
	want := map[string]string{}
	for _, b := range s.binaries {
		want["/usr/bin/"+b] = "-rwxr-xr-x"
	}
	for _, u := range s.units {
		want["/lib/systemd/system/"+u] = "-rw-r--r--"
	}
	for _, c := range s.configs {
		want[confDir+"/"+c] = "-rw-r--r--"
	}
	want["/usr/share/doc/"+s.name+"/README.md"] = "-rw-r--r--"
	want["/usr/share/doc/"+s.name+"/copyright"] = "-rw-r--r--"
	for _, u := range s.units {
		// A DynamicUser reads secrets (the token) through the group the
		// package creates: root:vpcreach 0640.
		unit := readFile(t, filepath.Join(root, "configs", "systemd", u))
		if unitSetting(unit, "DynamicUser") == "yes" && unitSetting(unit, "User") != sysUser &&
			!slices.Contains(strings.Fields(strings.Join(unitValues(unit, "SupplementaryGroups"), " ")), sysUser) {
			t.Errorf("%s runs as a DynamicUser without the group %s (SupplementaryGroups=%s):"+
				" it cannot read a root:%s 0640 token", u, sysUser, sysUser, sysUser)
		}
		for _, doc := range strings.Fields(strings.Join(unitValues(unit, "Documentation"), " ")) {
			if path, ok := strings.CutPrefix(doc, "file://"); ok {
				if _, ok := want[path]; !ok {
					t.Errorf("%s: Documentation=%s, a file %s does not ship", u, doc, s.name)
				}
			}
		}
		// What the unit runs is in this package, with a config it ships.
		for _, key := range []string{"ExecStart", "ExecStartPre"} {
			args := strings.Fields(strings.TrimLeft(unitSetting(unit, key), "-@+!:"))
			if len(args) == 0 {
				t.Errorf("%s: no %s=", u, key)
				continue
			}
			if _, ok := want[args[0]]; !ok || !strings.HasPrefix(args[0], "/usr/bin/") {
				t.Errorf("%s: %s=%s, which is not a binary in %s", u, key, args[0], s.name)
			}
			for i := 1; i+1 < len(args); i++ {
				if _, ok := want[args[i+1]]; args[i] == "-config" && !ok {
					t.Errorf("%s: %s reads %s, not a config the package ships", u, key, args[i+1])
				}
			}
		}
	}
	for path, e := range got {
		if e.perm[0] == 'd' {
			if e.perm != "drwxr-xr-x" || e.owner != "root/root" {
				t.Errorf("directory %s: %s %s, want drwxr-xr-x root/root", path, e.perm, e.owner)
			}
			continue
		}
		w, ok := want[path]
		switch {
		case !ok:
			t.Errorf("unexpected file %s (%s)", path, e.perm)
		case e.perm != w || e.owner != "root/root":
			t.Errorf("%s: %s %s, want %s root/root", path, e.perm, e.owner, w)
		}
	}
	for path := range want {
		if _, ok := got[path]; !ok {
			t.Errorf("missing %s", path)
		}
	}

	// Conffiles: every example config, nothing else.
	var wantConf []string
	for _, c := range s.configs {
		wantConf = append(wantConf, confDir+"/"+c)
	}
	if got := strings.Fields(run(t, "dpkg-deb", "--info", deb, "conffiles")); strings.Join(got, " ") != strings.Join(wantConf, " ") {
		t.Errorf("conffiles %v, want %v", got, wantConf)
	}

	// Maintainer scripts: valid sh; nothing enabled or started; every
	// systemctl call only when systemd runs; removal stops the units.
	for _, name := range []string{"postinst", "prerm", "postrm"} {
		script := run(t, "dpkg-deb", "--info", deb, name)
		f := filepath.Join(t.TempDir(), name)
		if err := os.WriteFile(f, []byte(script), 0o644); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("sh", "-n", f).CombinedOutput(); err != nil {
			t.Errorf("%s: sh -n: %v\n%s", name, err, out)
		}
		for _, bad := range []string{"systemctl start", "systemctl enable", "systemctl restart",
			"systemctl try-restart", "systemctl reload", "deb-systemd-invoke", "invoke-rc.d", "--now"} {
			for _, line := range strings.Split(script, "\n") {
				line = strings.TrimSpace(line)
				if strings.HasPrefix(line, "#") || strings.HasPrefix(line, "echo") || strings.HasPrefix(line, `"`) {
					continue // comments and the hint printed to the admin
				}
				if strings.Contains(line, bad) {
					t.Errorf("%s runs %q: %s", name, bad, line)
				}
			}
		}
		if strings.Contains(script, "systemctl ") && !strings.Contains(script, "[ -d /run/systemd/system ]") {
			t.Errorf("%s calls systemctl without checking that systemd runs:\n%s", name, script)
		}
		switch name {
		case "postinst":
			if !strings.Contains(script, "adduser --system") || !strings.Contains(script, "useradd --system") {
				t.Errorf("postinst does not create the system user %s:\n%s", sysUser, script)
			}
		case "prerm":
			if !strings.Contains(script, "systemctl stop "+strings.Join(s.units, " ")) {
				t.Errorf("prerm does not stop %v:\n%s", s.units, script)
			}
		}
	}
}

// contents lists a package's entries by absolute path.
func contents(t *testing.T, deb string) map[string]entry {
	got := map[string]entry{}
	for _, line := range strings.Split(strings.TrimSpace(run(t, "dpkg-deb", "--contents", deb)), "\n") {
		// drwxr-xr-x root/root 0 2026-01-01 00:00 ./etc/
		f := strings.Fields(line)
		if len(f) < 6 {
			t.Fatalf("dpkg-deb --contents line %q", line)
		}
		path := strings.TrimSuffix(strings.TrimPrefix(f[5], "."), "/")
		if path == "" {
			continue
		}
		got[path] = entry{perm: f[0], owner: f[1]}
	}
	return got
}

// unitSetting returns the value of the last key= line of a unit.
func unitSetting(unit, key string) string {
	v := unitValues(unit, key)
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

// unitValues returns the values of every key= line of a unit.
func unitValues(unit, key string) []string {
	var v []string
	for _, line := range strings.Split(unit, "\n") {
		if k, val, ok := strings.Cut(strings.TrimSpace(line), "="); ok && strings.TrimSpace(k) == key {
			v = append(v, strings.TrimSpace(val))
		}
	}
	return v
}

// install puts both packages on this machine, runs what they installed,
// checks that a reinstall keeps a local config edit, and purges them; a
// cleanup undoes all of it even when the test fails.
func install(t *testing.T, debs map[string]string) {
	testutil.NeedRoot(t)
	// Never clobber: skip when anything the packages install is there.
	var installed []string
	for _, s := range specs {
		if st := status(s.name); !strings.HasSuffix(st, "not-installed") {
			testutil.Skip(t, fmt.Sprintf("%s is known to dpkg (%s); not touching it", s.name, st))
		}
		for path, e := range contents(t, debs[s.name]) {
			if e.perm[0] != 'd' {
				installed = append(installed, path)
			}
		}
	}
	for _, path := range append(installed, tokenFile) {
		if _, err := os.Lstat(path); err == nil {
			testutil.Skip(t, path+" exists on this machine; not clobbering it with a test install")
		}
	}
	_, err := user.Lookup(sysUser)
	userExisted := err == nil
	_, err = user.LookupGroup(sysUser)
	groupExisted := err == nil
	_, err = os.Lstat(confDir)
	confDirExisted := err == nil

	t.Cleanup(func() {
		for _, s := range specs {
			if st := status(s.name); !strings.HasSuffix(st, "not-installed") {
				if out, err := exec.Command("dpkg", "--purge", s.name).CombinedOutput(); err != nil {
					t.Errorf("cleanup: dpkg --purge %s: %v\n%s", s.name, err, out)
				}
			}
		}
		if err := os.Remove(tokenFile); err != nil && !os.IsNotExist(err) {
			t.Errorf("cleanup: %v", err)
		}
		if !confDirExisted {
			if err := os.RemoveAll(confDir); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
		if _, err := user.Lookup(sysUser); err == nil && !userExisted {
			if out, err := exec.Command("userdel", sysUser).CombinedOutput(); err != nil {
				t.Errorf("cleanup: userdel %s: %v\n%s", sysUser, err, out)
			}
		}
		if _, err := user.LookupGroup(sysUser); err == nil && !groupExisted {
			if out, err := exec.Command("groupdel", sysUser).CombinedOutput(); err != nil {
				t.Errorf("cleanup: groupdel %s: %v\n%s", sysUser, err, out)
			}
		}
		for _, path := range installed {
			if _, err := os.Lstat(path); err == nil {
				t.Errorf("cleanup: %s is still there", path)
			}
		}
	})

	out := dpkgRun(t, "-i", debs["vpcreach-agent"], debs["vpcreach-proxyserver"])
	t.Logf("dpkg -i:\n%s", out)
	for _, s := range specs {
		if st := status(s.name); st != "install ok installed" {
			t.Fatalf("%s: dpkg status %q after dpkg -i", s.name, st)
		}
	}
	u, err := user.Lookup(sysUser)
	if err != nil {
		t.Fatalf("postinst did not create the system user: %v", err)
	}
	g, err := user.LookupGroup(sysUser)
	if err != nil {
		t.Fatalf("postinst did not create the system group: %v", err)
	}
	if u.Gid != g.Gid {
		t.Errorf("user %s has gid %s, want its own group %s", sysUser, u.Gid, g.Gid)
	}
	if uid, _ := strconv.Atoi(u.Uid); uid == 0 || uid >= 1000 {
		t.Errorf("user %s has uid %d, want a system uid (1-999)", sysUser, uid)
	}
	if p, _ := filepath.Glob("/etc/systemd/system/*.wants/vpcreach-*"); len(p) > 0 {
		t.Errorf("installing enabled units: %v", p)
	}

	// The token the example configs read: root:vpcreach 0640, as documented.
	gid, _ := strconv.Atoi(g.Gid)
	if err := os.WriteFile(tokenFile, []byte("test-pkg-token-0123456789abcdef\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(tokenFile, 0, gid); err != nil {
		t.Fatal(err)
	}
	setpriv, _ := exec.LookPath("setpriv") // util-linux: always on Debian
	for _, s := range specs {
		for _, b := range s.binaries {
			bin := "/usr/bin/" + b
			if got, want := strings.TrimSpace(run(t, bin, "-version")), b+" "+gitVersion; got != want {
				t.Errorf("%s -version = %q, want %q", bin, got, want)
			}
			cfg := confDir + "/" + b + ".yaml"
			if got := run(t, bin, "-check-config", "-config", cfg); !strings.Contains(got, "configuration OK") {
				t.Errorf("%s -check-config -config %s: %q", bin, cfg, got)
			}
			if setpriv == "" {
				continue
			}
			// As the units run it: an unprivileged user (nobody here, a
			// DynamicUser there) with the supplementary group vpcreach
			// reads the config and the token; without the group, not the token.
			asUser := []string{"--reuid=65534", "--regid=65534", "--groups=" + g.Gid, bin, "-check-config", "-config", cfg}
			if got := run(t, setpriv, asUser...); !strings.Contains(got, "configuration OK") {
				t.Errorf("as uid 65534 with group %s: %s -check-config: %q", sysUser, bin, got)
			}
			if b == "socks5d" {
				continue // reads no token
			}
			asUser[2] = "--clear-groups"
			out, err := exec.Command(setpriv, asUser...).CombinedOutput()
			if err == nil || !strings.Contains(string(out), "permission denied") {
				t.Errorf("as uid 65534 without group %s, %s -check-config: %v, %s; want the 0640 token refused",
					sysUser, bin, err, out)
			}
		}
	}

	// A local edit of a conffile survives a reinstall (the upgrade path).
	cfg := confDir + "/agent.yaml"
	edited := readFile(t, cfg) + "# local edit (test/pkg)\n"
	if err := os.WriteFile(cfg, []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	dpkgRun(t, "-i", debs["vpcreach-agent"])
	if got := readFile(t, cfg); got != edited {
		t.Errorf("reinstall replaced the edited %s", cfg)
	}
	if got := run(t, "/usr/bin/agent", "-check-config", "-config", cfg); !strings.Contains(got, "configuration OK") {
		t.Errorf("after reinstall: agent -check-config: %q", got)
	}

	// Purge removes the package's files and conffiles, not the admin's token.
	dpkgRun(t, "--purge", "vpcreach-agent", "vpcreach-proxyserver")
	for _, path := range installed {
		if _, err := os.Lstat(path); err == nil {
			t.Errorf("after purge: %s is still there", path)
		}
	}
	if _, err := os.Stat(tokenFile); err != nil {
		t.Errorf("purge removed the admin's token file: %v", err)
	}
}

// status is dpkg's status of a package, "not-installed" if unknown.
func status(name string) string {
	out, err := exec.Command("dpkg-query", "-W", "-f=${Status}", name).Output()
	if err != nil {
		return "unknown ok not-installed"
	}
	return strings.TrimSpace(string(out))
}

// dpkgRun runs dpkg with no terminal (a conffile prompt would fail, not
// wait) and fails the test on an error.
func dpkgRun(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command("dpkg", args...)
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("dpkg %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// run runs a command and returns its stdout, failing the test on an error.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out, stderr.String())
	}
	return string(out)
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
