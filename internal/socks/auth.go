package socks

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strings"

	socks5 "github.com/things-go/go-socks5"
	"github.com/things-go/go-socks5/statute"

	"github.com/vpcreach/vpcreach/internal/acl"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/registry"
)

// User is one SOCKS5 / HTTP proxy user. Once any user is configured,
// clients must authenticate (RFC 1929 username/password for SOCKS5,
// Proxy-Authorization: Basic for HTTP), and every CONNECT is checked
// against the user's Allow list; nothing else is allowed.
type User struct {
	// Name is the user name: 1-255 bytes, no ':' (HTTP Basic splits
	// there), no spaces or control characters.
	Name string `yaml:"name"`
	// Password comes from a file or the environment; 8-255 bytes
	// (RFC 1929 carries at most 255).
	Password config.Secret `yaml:"password"`
	// Allow lists the targets the user may reach, default deny; the
	// syntax is internal/acl's "[network/]CIDR:PORTS", the one of the
	// proxy server's claim policy: "10.1.0.0/16:6379", "10.1.0.5:80-443",
	// "vpc-a/10.2.0.0/16:*" (a network, as in a route key; none: the
	// default network; "*/": every network), "[fd00::/8]:443".
	Allow []string `yaml:"allow"`
}

// MinPasswordLen is the shortest user password accepted.
const MinPasswordLen = 8

// authTable is an immutable snapshot of the users: swapped whole on
// reload, never changed in place.
type authTable struct {
	users  []*userEntry
	byName map[string]*userEntry
	// dummy stands in for the password digest of an unknown user, so
	// that a wrong name costs the same as a wrong password. Its value
	// does not matter (an unknown name never passes), so it is zero:
	// two tables of the same users are equal (reflect.DeepEqual), as a
	// reload's change detection expects.
	dummy [sha256.Size]byte
	// denyAll requires authentication that nobody passes: the users
	// could not be loaded (fail closed).
	denyAll bool
}

// userEntry is one user, its password kept only as a digest.
type userEntry struct {
	name    string
	nameSum [sha256.Size]byte
	passSum [sha256.Size]byte
	rules   acl.List
}

// required reports whether clients must authenticate.
func (t *authTable) required() bool { return t != nil && (len(t.users) > 0 || t.denyAll) }

// compileUsers reads the passwords and parses the ACLs; problems are
// recorded under key (e.g. "users"). It returns nil when there are no
// users or when a problem was recorded.
func compileUsers(users []User, network string, p *config.Problems, key string) *authTable {
	if len(users) == 0 {
		return nil
	}
	t := &authTable{byName: map[string]*userEntry{}}
	before := len(*p)
	for i, u := range users {
		k := fmt.Sprintf("%s[%d]", key, i)
		e := &userEntry{name: u.Name}
		switch {
		case u.Name == "":
			p.Addf(k+".name", "required")
		case len(u.Name) > 255:
			p.Addf(k+".name", "longer than 255 bytes")
		case strings.ContainsFunc(u.Name, func(r rune) bool { return r == ':' || r <= ' ' || r == 0x7f }):
			p.Addf(k+".name", "%q: no ':', spaces or control characters", u.Name)
		case t.byName[u.Name] != nil:
			p.Addf(k+".name", "%q appears twice", u.Name)
		}
		if !u.Password.IsSet() {
			p.Addf(k+".password", "required: {file: path} or {env: NAME}")
		} else if pw, err := u.Password.ReadAny(); err != nil {
			p.Addf(k+".password", "%v", err)
		} else if len(pw) < MinPasswordLen || len(pw) > 255 {
			p.Addf(k+".password", "must be %d-255 bytes long, is %d", MinPasswordLen, len(pw))
		} else {
			e.passSum = sha256.Sum256([]byte(pw))
		}
		if len(u.Allow) == 0 {
			p.Addf(k+".allow", "required: the targets this user may reach (default deny)")
		}
		reachable := false
		for j, a := range u.Allow {
			r, err := acl.Parse(a)
			if err != nil {
				p.Addf(fmt.Sprintf("%s.allow[%d]", k, j), "%v", err)
				continue
			}
			reachable = reachable || r.Network == "*" || r.Network == network
			e.rules = append(e.rules, r)
		}
		if len(e.rules) > 0 && !reachable {
			p.Addf(k+".allow", "no rule applies to network %q that this front end serves (prefix rules with %q or \"*/\")",
				network, network+"/")
		}
		e.nameSum = sha256.Sum256([]byte(u.Name))
		t.users = append(t.users, e)
		if u.Name != "" {
			t.byName[u.Name] = e
		}
	}
	if len(*p) > before {
		return nil
	}
	return t
}

// check returns the user whose name and password these are, or nil. It
// takes the same path for a known and an unknown name, whatever the
// lengths: every user's name digest is compared, the matching user's
// password digest (or a random one) is selected, and the digest of the
// given password is compared with it, all in constant time.
func (t *authTable) check(name, pass string) *userEntry {
	if !t.required() || t.denyAll {
		return nil
	}
	ns, ps := sha256.Sum256([]byte(name)), sha256.Sum256([]byte(pass))
	want := t.dummy
	found, sel := 0, 0
	for i, u := range t.users {
		eq := subtle.ConstantTimeCompare(ns[:], u.nameSum[:])
		subtle.ConstantTimeCopy(eq, want[:], u.passSum[:])
		sel = subtle.ConstantTimeSelect(eq, i, sel)
		found |= eq
	}
	if subtle.ConstantTimeCompare(ps[:], want[:])&found != 1 {
		return nil
	}
	return t.users[sel]
}

// checkBasic checks a Proxy-Authorization header value ("Basic
// base64(name:password)").
func (t *authTable) checkBasic(h string) (*userEntry, string) {
	scheme, cred, ok := strings.Cut(strings.TrimSpace(h), " ")
	if !ok || !strings.EqualFold(scheme, "basic") {
		return nil, ""
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(cred))
	if err != nil {
		return nil, ""
	}
	name, pass, ok := strings.Cut(string(raw), ":")
	if !ok {
		return nil, name
	}
	return t.check(name, pass), name
}

// denial is why a CONNECT is not allowed.
type denial int

const (
	allowed   denial = iota
	needsAuth        // anonymous connection, or a user that no longer exists
	notInACL         // the user's rules do not name the target
)

func (d denial) String() string {
	switch d {
	case allowed:
		return "allowed"
	case needsAuth:
		return "not authenticated as a configured user"
	default:
		return "not in the user's allow list"
	}
}

// permits decides whether u may connect to k under t. u is the entry the
// connection authenticated as, possibly from an older table: it must
// still exist in t with the same password.
func (t *authTable) permits(u *userEntry, k registry.Key) (*userEntry, denial) {
	if !t.required() {
		return u, allowed
	}
	if u == nil {
		return nil, needsAuth
	}
	cur := t.byName[u.name]
	if cur == nil || subtle.ConstantTimeCompare(cur.passSum[:], u.passSum[:]) != 1 {
		return nil, needsAuth
	}
	if cur.rules.Allows(k) {
		return cur, allowed
	}
	return cur, notInACL
}

// RFC 1929 username/password subnegotiation.
const (
	userPassVersion = 1
	authOK          = 0
	authFailed      = 1
)

// errAuth marks an authentication failure the authenticator logged.
var errAuth = errors.New("authentication failed")

// userPassAuth is the RFC 1929 method: it offers username/password,
// reads the subnegotiation itself (go-socks5's parser tolerates a
// zero-length name) and checks it against the current users.
type userPassAuth struct{ s *Server }

func (userPassAuth) GetCode() uint8 { return statute.MethodUserPassAuth }

func (a userPassAuth) Authenticate(r io.Reader, w io.Writer, client string) (*socks5.AuthContext, error) {
	if _, err := w.Write([]byte{socks5Version, statute.MethodUserPassAuth}); err != nil {
		return nil, err
	}
	name, pass, err := readUserPass(r)
	if err != nil {
		if errors.Is(err, errBadUserPass) {
			_, _ = w.Write([]byte{userPassVersion, authFailed})
		}
		a.s.results.Inc("bad request")
		a.s.logLimited("auth", client, "socks5 authentication: bad or incomplete request", "client", client, "err", err)
		return nil, fmt.Errorf("%w: %w", errHandled, err)
	}
	u := a.s.live.Load().auth.check(name, pass)
	if u == nil {
		_, _ = w.Write([]byte{userPassVersion, authFailed})
		a.s.results.Inc("auth failed")
		a.s.logLimited("auth", client, "socks5 authentication failed", "client", client, "user", name)
		return nil, fmt.Errorf("%w: %w", errHandled, errAuth)
	}
	if _, err := w.Write([]byte{userPassVersion, authOK}); err != nil {
		return nil, err
	}
	if rc, ok := w.(*readerConn); ok && rc.st != nil {
		a.s.mu.Lock()
		rc.st.user = u
		a.s.mu.Unlock()
	}
	return &socks5.AuthContext{Method: statute.MethodUserPassAuth, Payload: map[string]string{"username": name}}, nil
}

// errBadUserPass marks a subnegotiation that breaks RFC 1929 (as opposed
// to one cut short).
var errBadUserPass = errors.New("malformed username/password request")

// readUserPass reads VER ULEN UNAME PLEN PASSWD (RFC 1929).
func readUserPass(r io.Reader) (name, pass string, err error) {
	var hd [2]byte
	if _, err := io.ReadFull(r, hd[:]); err != nil {
		return "", "", fmt.Errorf("truncated: %w", err)
	}
	if hd[0] != userPassVersion {
		return "", "", fmt.Errorf("%w: version %d, want 1", errBadUserPass, hd[0])
	}
	if hd[1] == 0 {
		return "", "", fmt.Errorf("%w: empty user name", errBadUserPass)
	}
	b := make([]byte, int(hd[1])+1)
	if _, err := io.ReadFull(r, b); err != nil {
		return "", "", fmt.Errorf("truncated: %w", err)
	}
	name = string(b[:hd[1]])
	p := make([]byte, b[hd[1]])
	if _, err := io.ReadFull(r, p); err != nil {
		return "", "", fmt.Errorf("truncated: %w", err)
	}
	return name, string(p), nil
}
