// Package tunnel implements the vpcreach wire protocol: the handshake an
// agent and a proxy server exchange on a fresh connection, the control
// messages they send each other over yamux afterwards, the per-stream header
// and status byte, the data framing that carries a reset across the tunnel,
// and the relay preamble socks5d speaks to a proxy server. spec.md next to
// this file is the normative description; this file is its encoding.
package tunnel

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Protocol versions. A server speaks every version in [MinVersion,
// MaxVersion]; an agent announces its own range in the hello and the server
// picks the highest version both share.
const (
	// Version1 stream headers carry no client address.
	Version1 = 1
	// Version2 adds the originating client address to each stream header,
	// so that the agent's logs name the real client.
	Version2 = 2
	// Version3 authenticates by challenge: the hello carries no token; the
	// server answers a fresh nonce and the agent proves it holds the token
	// with an HMAC over the nonce and its hello, so a captured hello cannot
	// be replayed. Stream headers are those of version 2.
	Version3   = 3
	MinVersion = Version1
	MaxVersion = Version3
)

// Magic opens every tunnel connection, before the hello frame.
var Magic = [8]byte{'V', 'P', 'C', 'R', 'E', 'A', 'C', 'H'}

// Size limits of everything read before and after authentication.
const (
	MaxHelloSize   = 64 << 10 // hello and welcome frames
	MaxControlSize = 64 << 10 // control messages after the hello
	MaxTargets     = 256      // targets in one hello or add message
	MaxIDLen       = 128      // agent, server and session ids
	MaxNetworkLen  = 32       // network names
	MaxReasonLen   = 512      // refusal reasons
	MaxDataFrame   = 1 << 20  // one data frame on a stream
)

// Errors returned by the decoders. Every decoding error wraps ErrProtocol.
var (
	ErrProtocol     = errors.New("tunnel: protocol error")
	ErrTooLarge     = fmt.Errorf("%w: message too large", ErrProtocol)
	ErrBadMagic     = fmt.Errorf("%w: not a vpcreach tunnel (bad magic)", ErrProtocol)
	ErrNoVersion    = fmt.Errorf("%w: no common protocol version", ErrProtocol)
	ErrAborted      = errors.New("tunnel: stream aborted by peer")
	ErrUnauthorized = errors.New("tunnel: unauthorized")
)

// Target names one address an agent exposes, in one network.
type Target struct {
	Network string         `json:"network,omitempty"`
	Addr    netip.AddrPort `json:"addr"`
	// Port asks for a fixed proxy port; 0 lets the server choose.
	Port uint16 `json:"port,omitempty"`
}

// String is network/ip:port, or ip:port in the default network.
func (t Target) String() string {
	if t.Network == "" {
		return t.Addr.String()
	}
	return t.Network + "/" + t.Addr.String()
}

// Hello is the first message of a tunnel, agent to server.
type Hello struct {
	MinVersion int    `json:"min_version"`
	MaxVersion int    `json:"max_version"`
	AgentID    string `json:"agent_id"`
	// Token is the version 1-2 credential, sent as such; version 3
	// leaves it empty and sets Auth.
	Token string `json:"token,omitempty"`
	// Auth names the proof the agent offers: AuthHMAC (answer a challenge
	// with HMAC-SHA256 keyed by the token), or empty (no token: the
	// client certificate alone, or an insecure server).
	Auth       string   `json:"auth,omitempty"`
	SessionID  string   `json:"session_id"`
	Generation uint64   `json:"generation"`
	Targets    []Target `json:"targets"`
	// SpliceWindow offers spliced frames (spec.md) when not 0: the
	// agent's end of the tunnel is a plain TCP socket, and this is the
	// credit a spliced stream starts with towards the agent. Older
	// servers ignore it.
	SpliceWindow uint32 `json:"splice_window,omitempty"`

	// Secret is the agent's token, never sent: ClientHandshake uses it to
	// answer a challenge.
	Secret string `json:"-"`
}

// AuthHMAC is the challenge-response proof of version 3.
const AuthHMAC = "hmac-sha256"

// RouteInfo describes one route a server made for a target.
type RouteInfo struct {
	Target Target         `json:"target"`
	Proxy  netip.AddrPort `json:"proxy"`
}

// TargetRefusal says why one target got no route.
type TargetRefusal struct {
	Target Target `json:"target"`
	Reason string `json:"reason"`
}

// Welcome is the server's answer to an accepted hello.
type Welcome struct {
	Version  int             `json:"version"`
	ServerID string          `json:"server_id"`
	Routes   []RouteInfo     `json:"routes"`
	Refused  []TargetRefusal `json:"refused,omitempty"`
	// SpliceWindow accepts the hello's offer of spliced frames when not
	// 0: the credit a spliced stream starts with towards the server.
	SpliceWindow uint32 `json:"splice_window,omitempty"`
}

// Refusal codes.
const (
	RefuseAuth     = "auth"     // bad credentials
	RefuseVersion  = "version"  // no common protocol version
	RefuseProtocol = "protocol" // malformed or unexpected message
	RefuseDraining = "draining" // the server is shutting down
	RefuseLimit    = "limit"    // a bound was exceeded
)

// Answer is the server's reply to a hello: exactly one of Welcome and
// Refusal is set.
type Answer struct {
	Welcome   *Welcome   `json:"welcome,omitempty"`
	Refusal   *Refusal   `json:"refusal,omitempty"`
	Challenge *Challenge `json:"challenge,omitempty"`
}

// Challenge asks a version-3 agent to prove it holds its token.
type Challenge struct {
	Nonce []byte `json:"nonce"` // NonceSize random bytes, fresh per connection
}

// Proof answers a Challenge.
type Proof struct {
	MAC []byte `json:"mac"`
}

// NonceSize is the size of a challenge nonce.
const NonceSize = 32

// Refusal ends a session, with a reason.
type Refusal struct {
	Code   string `json:"code"`
	Reason string `json:"reason"`
}

func (r *Refusal) Error() string { return "tunnel: refused (" + r.Code + "): " + r.Reason }

// Control message types, sent both ways on the control stream.
const (
	MsgHello      = "hello"      // never valid after the handshake: a protocol error
	MsgAdd        = "add"        // agent -> server: expose more targets
	MsgRemove     = "remove"     // agent -> server: withdraw targets; server -> agent: route revoked
	MsgRoutes     = "routes"     // server -> agent: routes made / refused for an add
	MsgWithdraw   = "withdraw"   // agent -> server: draining, remove all my routes
	MsgWithdrawn  = "withdrawn"  // server -> agent: routes removed
	MsgMove       = "move"       // server -> agent: open a new session elsewhere, then drop this one
	MsgSuperseded = "superseded" // server -> agent: a newer generation owns these targets
	MsgRefusal    = "refusal"    // either way: the session ends for Reason
)

// Control is one control message after the handshake.
type Control struct {
	Type       string          `json:"type"`
	Targets    []Target        `json:"targets,omitempty"`
	Routes     []RouteInfo     `json:"routes,omitempty"`
	Refused    []TargetRefusal `json:"refused,omitempty"`
	Generation uint64          `json:"generation,omitempty"`
	Code       string          `json:"code,omitempty"`
	Reason     string          `json:"reason,omitempty"`
}

// WriteFrame writes v as one JSON frame: a 4-byte big-endian length, then
// the JSON text.
func WriteFrame(w io.Writer, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return err
	}
	buf := make([]byte, 4+len(body))
	binary.BigEndian.PutUint32(buf, uint32(len(body)))
	copy(buf[4:], body)
	_, err = w.Write(buf)
	return err
}

// ReadFrame reads one JSON frame of at most max bytes into v. Unknown
// fields are ignored, so that a newer peer can add fields.
func ReadFrame(r io.Reader, max int, v any) error {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > uint32(max) {
		return fmt.Errorf("%w (%d bytes, limit %d)", ErrTooLarge, n, max)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("%w: %v", ErrProtocol, err)
	}
	return nil
}

// Validate checks a decoded hello against the protocol bounds.
func (h *Hello) Validate() error {
	switch {
	case h.AgentID == "" || len(h.AgentID) > MaxIDLen:
		return fmt.Errorf("%w: agent id must be 1-%d bytes", ErrProtocol, MaxIDLen)
	case h.SessionID == "" || len(h.SessionID) > MaxIDLen:
		return fmt.Errorf("%w: session id must be 1-%d bytes", ErrProtocol, MaxIDLen)
	case h.Generation == 0:
		return fmt.Errorf("%w: generation must be set", ErrProtocol)
	case h.MinVersion > h.MaxVersion || h.MinVersion <= 0:
		return fmt.Errorf("%w: bad version range [%d, %d]", ErrProtocol, h.MinVersion, h.MaxVersion)
	}
	return ValidateTargets(h.Targets)
}

// ValidateTargets checks a target list against the protocol bounds.
func ValidateTargets(ts []Target) error {
	if len(ts) > MaxTargets {
		return fmt.Errorf("%w: %d targets, limit %d", ErrTooLarge, len(ts), MaxTargets)
	}
	for _, t := range ts {
		if len(t.Network) > MaxNetworkLen {
			return fmt.Errorf("%w: network name longer than %d bytes", ErrProtocol, MaxNetworkLen)
		}
		if !t.Addr.IsValid() || t.Addr.Port() == 0 {
			return fmt.Errorf("%w: target %q is not ip:port", ErrProtocol, t.Addr)
		}
	}
	return nil
}

// Negotiate picks the highest version in both [min, max] and the local range.
func Negotiate(min, max int) (int, error) {
	v := max
	if v > MaxVersion {
		v = MaxVersion
	}
	if v < min || v < MinVersion {
		return 0, fmt.Errorf("%w: peer speaks [%d, %d], we speak [%d, %d]", ErrNoVersion, min, max, MinVersion, MaxVersion)
	}
	return v, nil
}
