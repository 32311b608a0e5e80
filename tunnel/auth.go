package tunnel

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net"
	"time"
)

// HelloMAC is the version-3 proof: HMAC-SHA256 keyed by the token over a
// domain label, the server's nonce and the hello's identity fields, so a
// proof is good for one connection, one agent id and one session only.
func HelloMAC(token string, nonce []byte, h *Hello) []byte {
	m := hmac.New(sha256.New, []byte(token))
	m.Write([]byte("vpcreach hello v3\x00"))
	m.Write(nonce)
	var b [8]byte
	for _, s := range []string{h.AgentID, h.SessionID} {
		binary.BigEndian.PutUint32(b[:4], uint32(len(s)))
		m.Write(b[:4])
		m.Write([]byte(s))
	}
	binary.BigEndian.PutUint64(b[:], h.Generation)
	m.Write(b[:])
	binary.BigEndian.PutUint32(b[:4], uint32(h.MinVersion))
	binary.BigEndian.PutUint32(b[4:], uint32(h.MaxVersion))
	m.Write(b[:])
	return m.Sum(nil)
}

// SendChallenge sends a fresh nonce to the agent and reads its proof, within
// the hello deadline ReadHello set. The caller checks the proof with
// VerifyProof against the token of the identity the hello claims.
func SendChallenge(conn net.Conn) (nonce, mac []byte, err error) {
	nonce = make([]byte, NonceSize)
	if _, err := rand.Read(nonce); err != nil {
		return nil, nil, err
	}
	if err := WriteFrame(conn, &Answer{Challenge: &Challenge{Nonce: nonce}}); err != nil {
		return nil, nil, fmt.Errorf("send challenge: %w", err)
	}
	var p Proof
	if err := ReadFrame(conn, MaxHelloSize, &p); err != nil {
		return nil, nil, fmt.Errorf("read proof: %w", err)
	}
	if len(p.MAC) != sha256.Size {
		return nil, nil, fmt.Errorf("%w: proof of %d bytes", ErrProtocol, len(p.MAC))
	}
	return nonce, p.MAC, nil
}

// VerifyProof reports, in constant time, whether mac proves token for the
// challenge nonce and hello h.
func VerifyProof(token string, nonce []byte, h *Hello, mac []byte) bool {
	return hmac.Equal(HelloMAC(token, nonce, h), mac)
}

// answerChallenge is the agent's side: prove the token for nonce.
func answerChallenge(conn net.Conn, h *Hello, c *Challenge, timeout time.Duration) error {
	if h.Auth != AuthHMAC || h.Secret == "" {
		return fmt.Errorf("%w: the server asks for a token proof, and this agent has no token", ErrProtocol)
	}
	if len(c.Nonce) != NonceSize {
		return fmt.Errorf("%w: challenge nonce of %d bytes", ErrProtocol, len(c.Nonce))
	}
	_ = conn.SetWriteDeadline(time.Now().Add(timeout))
	return WriteFrame(conn, &Proof{MAC: HelloMAC(h.Secret, c.Nonce, h)})
}
