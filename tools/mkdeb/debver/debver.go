// Package debver turns a `git describe --tags --always --dirty` string
// into a Debian package version that sorts the way the builds were made.
//
//	v1.2.3                       -> 1.2.3
//	v1.2.3-rc.1                  -> 1.2.3~rc.1               (before 1.2.3)
//	v1.2.3-4-g0abc123            -> 1.2.3+git4.g0abc123      (after 1.2.3)
//	v1.2.3-rc.1-4-g0abc123-dirty -> 1.2.3~rc.1+git4.g0abc123.dirty
//	0307980                      -> 0.0.0~git0307980         (no tag yet)
//	0307980-dirty                -> 0.0.0~git0307980+dirty
//	dev                          -> 0.0.0~dev
//
// The result has no epoch and no Debian revision (the packages are
// native), so it holds only [0-9A-Za-z.+~] and starts with a digit.
package debver

import (
	"fmt"
	"regexp"
	"strings"
)

var (
	// describeRE is "<tag>-<commits since tag>-g<sha>".
	describeRE = regexp.MustCompile(`^(.+)-([0-9]+)-g([0-9a-f]{4,40})$`)
	// shaRE is what --always prints when no tag is reachable.
	shaRE = regexp.MustCompile(`^[0-9a-f]{7,40}$`)
	// validRE is a Debian upstream version without epoch or revision.
	validRE = regexp.MustCompile(`^[0-9][0-9A-Za-z.+~]*$`)
)

// FromGit converts a git describe string (a leading "v" on a tag is
// dropped) into a Debian version, or reports why it cannot.
func FromGit(describe string) (string, error) {
	s := strings.TrimSpace(describe)
	if s == "" {
		return "", fmt.Errorf("debver: empty version")
	}
	s, dirty := strings.CutSuffix(s, "-dirty")
	var v string
	switch m := describeRE.FindStringSubmatch(s); {
	case m != nil:
		v = tag(m[1]) + "+git" + m[2] + ".g" + m[3]
	case shaRE.MatchString(s) && !strings.Contains(s, "."):
		v = "0.0.0~git" + s
	case startsWithDigit(tag(s)):
		v = tag(s)
	default:
		v = "0.0.0~" + strings.ReplaceAll(s, "-", ".")
	}
	if dirty {
		if strings.Contains(v, "+") {
			v += ".dirty"
		} else {
			v += "+dirty"
		}
	}
	if !validRE.MatchString(v) {
		return "", fmt.Errorf("debver: %q gives %q, not a valid Debian version (only 0-9 A-Z a-z . + ~ allowed)", describe, v)
	}
	return v, nil
}

// tag maps a release tag to Debian: "v1.2.3-rc.1" -> "1.2.3~rc.1" (a
// semver pre-release sorts before the release, as "~" does in Debian).
func tag(t string) string {
	if len(t) > 1 && t[0] == 'v' && t[1] >= '0' && t[1] <= '9' {
		t = t[1:]
	}
	t = strings.Replace(t, "-", "~", 1)
	return strings.ReplaceAll(t, "-", ".")
}

func startsWithDigit(s string) bool { return s != "" && s[0] >= '0' && s[0] <= '9' }
