// Command mkdeb builds the vpcreach .deb packages (vpcreach-agent and
// vpcreach-proxyserver) from binaries built beforehand, with nfpm as a
// library. `make package` builds the binaries and runs it:
//
//	mkdeb -version $(git describe --tags --always --dirty) -arch amd64 \
//	      -bin dist/build/linux_amd64 -out dist
//
// It prints the path of every package it writes. SOURCE_DATE_EPOCH, when
// set, fixes the file times, so the same inputs give the same packages.
package main

import (
	"bytes"
	"embed"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"text/template"

	"github.com/goreleaser/nfpm/v2"
	_ "github.com/goreleaser/nfpm/v2/deb" // registers the "deb" packager
	"github.com/goreleaser/nfpm/v2/files"

	"github.com/vpcreach/vpcreach/tools/mkdeb/debver"
)

//go:embed scripts/*.tmpl
var scriptFS embed.FS

type options struct {
	version    string // git describe string, as stamped into the binaries
	goarch     string
	binDir     string
	root       string // repository root: configs/, README.md
	out        string
	maintainer string
	homepage   string
	license    string
}

func main() {
	var o options
	flag.StringVar(&o.version, "version", "", "version as stamped into the binaries (git describe --tags --always --dirty); converted to a Debian version")
	flag.StringVar(&o.goarch, "arch", runtime.GOARCH, "GOARCH the binaries were built for")
	flag.StringVar(&o.binDir, "bin", "", "directory holding the built binaries (agent, proxyserver, socks5d)")
	flag.StringVar(&o.root, "root", ".", "repository root (configs/, README.md)")
	flag.StringVar(&o.out, "out", "dist", "directory to write the packages to")
	flag.StringVar(&o.maintainer, "maintainer", "vpcreach maintainers <vpcreach@users.noreply.github.com>", "Maintainer field")
	flag.StringVar(&o.homepage, "homepage", "https://github.com/vpcreach/vpcreach", "Homepage field")
	flag.StringVar(&o.license, "license", "Proprietary", "license named in /usr/share/doc/<package>/copyright")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "mkdeb:", err)
		os.Exit(1)
	}
}

func run(o options) error {
	if o.version == "" || o.binDir == "" {
		return errors.New("-version and -bin are required")
	}
	version, err := debver.FromGit(o.version)
	if err != nil {
		return err
	}
	arch, ok := debArch[o.goarch]
	if !ok {
		return fmt.Errorf("no Debian architecture known for GOARCH %q", o.goarch)
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	gen, err := os.MkdirTemp("", "mkdeb-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(gen)
	for _, p := range packages {
		path, err := build(o, p, version, arch, filepath.Join(gen, p.Name))
		if err != nil {
			return fmt.Errorf("%s: %w", p.Name, err)
		}
		fmt.Println(path)
	}
	return nil
}

// debArch maps GOARCH to the Debian architecture name. GOARCH=arm is
// armhf, which needs GOARM=7 (Go's default when cross-compiling).
var debArch = map[string]string{
	"amd64":    "amd64",
	"arm64":    "arm64",
	"386":      "i386",
	"arm":      "armhf",
	"ppc64le":  "ppc64el",
	"s390x":    "s390x",
	"riscv64":  "riscv64",
	"loong64":  "loong64",
	"mips64le": "mips64el",
	"mipsle":   "mipsel",
}

// build writes one package into o.out and returns its path. gen is a
// scratch directory for the generated files (scripts, copyright).
func build(o options, p pkgDef, version, arch, gen string) (string, error) {
	if err := os.MkdirAll(gen, 0o755); err != nil {
		return "", err
	}
	var contents files.Contents
	add := func(src, dst, typ string, mode os.FileMode) {
		contents = append(contents, &files.Content{Source: src, Destination: dst, Type: typ,
			FileInfo: &files.ContentFileInfo{Owner: "root", Group: "root", Mode: mode}})
	}
	for _, b := range p.Binaries {
		src := filepath.Join(o.binDir, b)
		if _, err := os.Stat(src); err != nil {
			return "", fmt.Errorf("binary: %w (build it first: make package)", err)
		}
		add(src, binDir+"/"+b, files.TypeFile, 0o755)
	}
	for _, u := range p.Units {
		src := filepath.Join(o.root, "configs", "systemd", u)
		add(src, unitDir+"/"+u, files.TypeFile, 0o644)
	}
	contents = append(contents, &files.Content{Destination: confDir, Type: files.TypeDir,
		FileInfo: &files.ContentFileInfo{Owner: "root", Group: "root", Mode: 0o755}})
	var confPaths []string
	for _, c := range p.Configs {
		add(filepath.Join(o.root, "configs", c), confDir+"/"+c, files.TypeConfigNoReplace, 0o644)
		confPaths = append(confPaths, confDir+"/"+c)
	}
	copyright := filepath.Join(gen, "copyright")
	if err := os.WriteFile(copyright, []byte(fmt.Sprintf(copyrightText, o.homepage, o.license, p.Binaries[0])), 0o644); err != nil {
		return "", err
	}
	add(copyright, docDir+"/"+p.Name+"/copyright", files.TypeFile, 0o644)
	add(filepath.Join(o.root, "README.md"), docDir+"/"+p.Name+"/README.md", files.TypeFile, 0o644)

	scripts := map[string]string{}
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		path := filepath.Join(gen, s)
		if err := writeScript(s, path, p, confPaths); err != nil {
			return "", err
		}
		scripts[s] = path
	}

	info := nfpm.WithDefaults(&nfpm.Info{
		Name:          p.Name,
		Arch:          arch,
		Platform:      "linux",
		Version:       version,
		VersionSchema: "none", // already a Debian version: no semver splitting
		Section:       "net",
		Priority:      "optional",
		Maintainer:    o.maintainer,
		Description:   p.Description,
		Vendor:        "vpcreach",
		Homepage:      o.homepage,
		License:       o.license,
		Overridables: nfpm.Overridables{
			// postinst creates the system user with adduser, or useradd.
			Depends:  []string{"adduser | passwd"},
			Contents: contents,
			Scripts: nfpm.Scripts{
				PostInstall: scripts["postinst"],
				PreRemove:   scripts["prerm"],
				PostRemove:  scripts["postrm"],
			},
			Deb: nfpm.Deb{Arch: arch},
		},
	})
	packager, err := nfpm.Get("deb")
	if err != nil {
		return "", err
	}
	name := filepath.Join(o.out, packager.ConventionalFileName(info))
	f, err := os.CreateTemp(o.out, ".mkdeb-*.deb")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name()) // after the rename: a no-op
	if err := packager.Package(info, f); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	return name, os.Rename(f.Name(), name)
}

const copyrightText = `Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: vpcreach
Source: %s

Files: *
Copyright: the vpcreach authors
License: %s
Comment: The binaries are statically linked Go programs; the Go modules
 they contain, with their versions, are listed by
 go version -m /usr/bin/%s
`

// writeScript renders scripts/<name>.tmpl for p into path.
func writeScript(name, path string, p pkgDef, confPaths []string) error {
	t, err := template.ParseFS(scriptFS, "scripts/"+name+".tmpl")
	if err != nil {
		return err
	}
	var b bytes.Buffer
	err = t.Execute(&b, map[string]any{
		"Name":       p.Name,
		"User":       sysUser,
		"Units":      p.Units,
		"UnitList":   strings.Join(p.Units, " "),
		"ConfigList": strings.Join(confPaths, " and "),
	})
	if err != nil {
		return err
	}
	return os.WriteFile(path, b.Bytes(), 0o755)
}
