package server

import (
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"reflect"
	"sort"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/vpcreach/vpcreach/internal/acl"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/registry"
	"github.com/vpcreach/vpcreach/tunnel"
)

// Identity of agents authenticated by the shared token: with one shared
// token every agent has the same identity, and any of them may take over
// the others' routes.
const sharedIdentity = "shared-token"

// insecureIdentity is every agent's identity on a server without
// authentication (insecure_no_auth).
const insecureIdentity = "unauthenticated"

// ServerTLS configures TLS 1.3 on the control listener.
type ServerTLS struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ClientCAFile turns on mutual TLS: agents present a certificate
	// signed by this CA, and their identity is its common name (a hello
	// claiming another agent id is refused).
	ClientCAFile string `yaml:"client_ca_file"`
}

// PolicyRule says what one agent identity may expose: acl rules
// "[network/]CIDR:PORTS" (see internal/acl).
type PolicyRule struct {
	Identity string   `yaml:"identity"`
	Allow    []string `yaml:"allow"`
}

// authState is everything a reload may change about authentication and
// policy, swapped whole.
type authState struct {
	shared   string            // shared token, "" if none
	perAgent map[string]string // agent id -> token, nil if none
	tls      *tls.Config       // nil: plain TCP
	mtls     bool
	insecure bool
	policy   map[string]acl.List // identity -> what it may expose; nil: no policy
	minVer   int                 // oldest protocol version accepted
}

// loadAuth reads every credential file the config names.
func loadAuth(c *Config) (*authState, error) {
	a := &authState{insecure: c.InsecureNoAuth, minVer: c.MinAgentVersion}
	if c.Token.IsSet() {
		tok, err := c.Token.Read()
		if err != nil {
			return nil, fmt.Errorf("token: %w", err)
		}
		a.shared = tok
	}
	if c.TokensFile != "" {
		m, err := readTokens(c.TokensFile)
		if err != nil {
			return nil, fmt.Errorf("tokens_file: %w", err)
		}
		a.perAgent = m
	}
	if c.TLS != nil {
		cfg, err := c.TLS.config()
		if err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		a.tls, a.mtls = cfg, c.TLS.ClientCAFile != ""
	}
	if c.Policy != nil {
		a.policy = map[string]acl.List{}
		for i, p := range c.Policy {
			l, err := acl.ParseList(p.Allow)
			if err != nil {
				return nil, fmt.Errorf("policy[%d] (%s): %w", i, p.Identity, err)
			}
			a.policy[p.Identity] = append(a.policy[p.Identity], l...)
		}
	}
	return a, nil
}

// readTokens reads a per-agent token file: a YAML map of agent id to
// token, each at least config.MinSecretLen characters.
func readTokens(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var m map[string]string
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: want a YAML map of agent id to token: %v", path, err)
	}
	ids := make([]string, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		if id == "" || len(m[id]) < config.MinSecretLen {
			return nil, fmt.Errorf("%s: agent %q: token shorter than %d characters", path, id, config.MinSecretLen)
		}
	}
	return m, nil
}

func (t *ServerTLS) config() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{cert}}
	if t.ClientCAFile != "" {
		pool, err := config.CertPool("client_ca_file", t.ClientCAFile)
		if err != nil {
			return nil, err
		}
		cfg.ClientCAs, cfg.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}

// hasCredential reports whether any authentication is configured.
func (a *authState) hasCredential() bool {
	return a.shared != "" || a.perAgent != nil || a.mtls
}

// identityFor is the identity these credentials give an agent: its
// certificate's name under mutual TLS, its agent id with per-agent tokens,
// one shared identity with a shared token.
func (a *authState) identityFor(agentID, certID string) string {
	switch {
	case a.mtls:
		return certID
	case a.perAgent != nil:
		return agentID
	case a.shared != "":
		return sharedIdentity
	}
	return insecureIdentity
}

// tokenFor is the token an agent must prove ("" if tokens are off, or the
// agent has none: then it fails).
func (a *authState) tokenFor(agentID string) string {
	if a.perAgent != nil {
		return a.perAgent[agentID]
	}
	return a.shared
}

// authenticate decides who the agent behind a hello is. cert is its
// verified client certificate under mutual TLS (nil if none). It runs the
// version-3 challenge on conn when a token is due. It returns the identity
// and the token proven ("" if none), or a refusal code and reason.
func (a *authState) authenticate(conn net.Conn, h *tunnel.Hello, version int, cert *x509.Certificate) (identity, token, code, reason string) {
	certID := ""
	if a.mtls {
		if cert == nil {
			return "", "", tunnel.RefuseAuth, "no client certificate"
		}
		if certID = cert.Subject.CommonName; h.AgentID != certID {
			return "", "", tunnel.RefuseAuth, fmt.Sprintf("agent id %q differs from its certificate's %q", h.AgentID, certID)
		}
	}
	identity = a.identityFor(h.AgentID, certID)
	if a.perAgent == nil && a.shared == "" {
		if !a.mtls && !a.insecure {
			return "", "", tunnel.RefuseAuth, "no credentials configured"
		}
		return identity, "", "", ""
	}
	want := a.tokenFor(h.AgentID)
	if version >= tunnel.Version3 {
		if h.Token != "" {
			return "", "", tunnel.RefuseProtocol, "a version 3 hello must not carry its token"
		}
		if h.Auth != tunnel.AuthHMAC {
			return "", "", tunnel.RefuseAuth, "no token proof offered"
		}
		nonce, mac, err := tunnel.SendChallenge(conn)
		if err != nil {
			return "", "", tunnel.RefuseProtocol, err.Error()
		}
		if !tunnel.VerifyProof(want, nonce, h, mac) || want == "" {
			return "", "", tunnel.RefuseAuth, "bad credentials"
		}
		return identity, want, "", ""
	}
	// Versions 1-2 send the token itself: compared in constant time,
	// over digests so the length does not leak either.
	got, exp := sha256.Sum256([]byte(h.Token)), sha256.Sum256([]byte(want))
	if subtle.ConstantTimeCompare(got[:], exp[:]) != 1 || want == "" {
		return "", "", tunnel.RefuseAuth, "bad credentials"
	}
	return identity, want, "", ""
}

// allows applies the claim policy: with no policy configured every
// identity may expose anything; with one, only what its rules allow.
func (a *authState) allows(identity string, k registry.Key) bool {
	if a.policy == nil {
		return true
	}
	return a.policy[identity].Allows(k)
}

// errPolicy is a claim outside the identity's policy.
var errPolicy = errors.New("outside this agent's claim policy")

// stillValid reports whether a live session would authenticate under
// these credentials, with the same identity (revocation on reload).
func (a *authState) stillValid(as *agentSession) bool {
	certID := ""
	if a.mtls {
		if as.cert == nil {
			return false
		}
		if _, err := as.cert.Verify(x509.VerifyOptions{Roots: a.tls.ClientCAs,
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			return false
		}
		certID = as.cert.Subject.CommonName
	}
	if a.identityFor(as.agent, certID) != as.identity {
		return false
	}
	if a.perAgent == nil && a.shared == "" {
		return a.mtls || a.insecure
	}
	want := a.tokenFor(as.agent)
	return want != "" && subtle.ConstantTimeCompare([]byte(want), []byte(as.token)) == 1
}

// warnAuth logs what the credentials imply for operators.
func (s *Server) warnAuth(a *authState) {
	switch {
	case !a.hasCredential():
		s.log.Warn("insecure_no_auth: every agent is accepted without credentials; for labs only")
	case a.shared != "" && !a.mtls:
		s.log.Warn("one shared token: every agent has the same identity and may take over another's targets; use tokens_file or mutual TLS for separate identities")
	}
	if a.tls == nil && a.hasCredential() {
		s.log.Info("control listener without TLS: tunnels are not encrypted (tokens are proven by challenge from protocol version 3 on)")
	}
}

// Apply takes a new configuration on SIGHUP (loaded and validated). The
// credentials (token, tokens_file, TLS certificate and client CA), the
// minimum agent version, the claim policy and the in-process SOCKS5 front
// end's users and ACLs change live; sessions whose
// credentials no longer pass are closed at once and routes the new policy
// no longer allows are removed at once (revocation). Anything else needs a
// restart: a change there is refused and the running configuration stays.
func (s *Server) Apply(cfg *Config) error {
	if field := restartField(&s.cfg, cfg); field != "" {
		return fmt.Errorf("%s changed: restart the proxy server to apply it", field)
	}
	a, err := loadAuth(cfg)
	if err != nil {
		return err
	}
	if s.socks != nil && cfg.Socks5 != nil {
		// The in-process front end: users, ACLs and timeouts live; its
		// own Apply refuses a listen change.
		if err := s.socks.Apply(*cfg.Socks5); err != nil {
			return fmt.Errorf("socks5: %w", err)
		}
	}
	s.auth.Store(a)
	s.warnAuth(a)
	s.revoke(a)
	return nil
}

// revoke closes the sessions a no longer admits and removes the routes
// its policy no longer allows.
func (s *Server) revoke(a *authState) {
	var closeSessions []*agentSession
	var drop []*route
	s.mu.Lock()
	for as := range s.sessions {
		if !a.stillValid(as) {
			closeSessions = append(closeSessions, as)
			continue
		}
		for _, r := range as.routes {
			if !a.allows(as.identity, r.key) {
				drop = append(drop, r)
			}
		}
	}
	s.mu.Unlock()
	for _, as := range closeSessions {
		s.log.Warn("audit: session revoked: its credentials no longer pass", "identity", as.identity,
			"agent", as.agent, "session", as.id, "remote", as.remote)
		_ = as.ts.Send(&tunnel.Control{Type: tunnel.MsgRefusal, Code: tunnel.RefuseAuth, Reason: "credentials revoked"})
		as.ts.Close() // its handler removes the routes
	}
	for _, r := range drop {
		s.log.Warn("audit: route revoked by policy", "identity", r.sess.identity, "agent", r.sess.agent,
			"session", r.sess.id, "target", r.key.String())
		s.removeRoute(r, true)
		ts := r.sess.ts
		if ts != nil {
			_ = ts.Send(&tunnel.Control{Type: tunnel.MsgRemove, Targets: []tunnel.Target{r.target},
				Reason: "no longer allowed by the claim policy"})
		}
	}
}

// restartField names the first setting that differs between the running
// and the new configuration and cannot change without a restart.
func restartField(cur, next *Config) string {
	a, b := *cur, *next
	if (a.Socks5 == nil) != (b.Socks5 == nil) {
		return "socks5"
	}
	for _, c := range []*Config{&a, &b} {
		c.Token, c.TokensFile, c.TLS, c.InsecureNoAuth, c.MinAgentVersion, c.Policy = config.Secret{}, "", nil, false, 0, nil
		c.Socks5 = nil // applied by the front end itself
	}
	av, bv := reflect.ValueOf(a), reflect.ValueOf(b)
	for i := range av.NumField() {
		f := av.Type().Field(i)
		if !f.IsExported() {
			continue
		}
		if !reflect.DeepEqual(av.Field(i).Interface(), bv.Field(i).Interface()) {
			if tag := strings.Split(f.Tag.Get("yaml"), ",")[0]; tag != "" {
				return tag
			}
			return f.Name
		}
	}
	return ""
}
