package tunnel

import (
	"bytes"
	"errors"
	"net"
	"testing"
)

// challengeServer answers one hello with a challenge and checks the proof
// against token; it returns the proof it received.
func challengeServer(conn net.Conn, token string) <-chan error {
	ch := make(chan error, 1)
	go func() {
		h, err := ReadHello(conn, testSettings())
		if err != nil {
			conn.Close()
			ch <- err
			return
		}
		nonce, mac, err := SendChallenge(conn)
		if err != nil {
			conn.Close()
			ch <- err
			return
		}
		if !VerifyProof(token, nonce, h, mac) {
			Refuse(conn, &Refusal{Code: RefuseAuth, Reason: "bad credentials"})
			ch <- errors.New("bad proof")
			return
		}
		s, err := Accept(conn, &Welcome{Version: Version3, ServerID: "srv"}, testSettings())
		if err == nil {
			s.Close()
		}
		ch <- err
	}()
	return ch
}

func v3Hello(secret string) Hello {
	h := validHello()
	h.MinVersion, h.MaxVersion = Version3, Version3
	h.Token, h.Auth, h.Secret = "", AuthHMAC, secret
	return h
}

func TestChallengeProof(t *testing.T) {
	const token = "right-token-0123456789"
	t.Run("right token", func(t *testing.T) {
		a, s := tcpPair(t)
		srv := challengeServer(s, token)
		h := v3Hello(token)
		sess, _, err := ClientHandshake(a, &h, testSettings())
		if err != nil {
			t.Fatalf("client: %v", err)
		}
		defer sess.Close()
		if err := <-srv; err != nil {
			t.Fatalf("server: %v", err)
		}
	})
	t.Run("wrong token", func(t *testing.T) {
		a, s := tcpPair(t)
		srv := challengeServer(s, token)
		h := v3Hello("wrong-token-0123456789")
		_, _, err := ClientHandshake(a, &h, testSettings())
		if ref, ok := IsRefusal(err); !ok || ref.Code != RefuseAuth {
			t.Fatalf("client: %v, want an auth refusal", err)
		}
		if err := <-srv; err == nil {
			t.Fatal("server accepted a wrong proof")
		}
	})
	t.Run("the token never travels", func(t *testing.T) {
		h := v3Hello(token)
		var b bytes.Buffer
		if err := WriteFrame(&b, &h); err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b.Bytes(), []byte(token)) {
			t.Fatal("the hello frame contains the token")
		}
	})
	t.Run("a proof is bound to its nonce and session", func(t *testing.T) {
		h := v3Hello(token)
		n1, n2 := bytes.Repeat([]byte{1}, NonceSize), bytes.Repeat([]byte{2}, NonceSize)
		mac := HelloMAC(token, n1, &h)
		if !VerifyProof(token, n1, &h, mac) {
			t.Fatal("proof does not verify")
		}
		if VerifyProof(token, n2, &h, mac) {
			t.Fatal("a captured proof verified against another nonce (replay)")
		}
		h2 := h
		h2.SessionID = "other-session"
		if VerifyProof(token, n1, &h2, mac) {
			t.Fatal("a proof verified for another session")
		}
	})
	t.Run("no secret", func(t *testing.T) {
		a, s := tcpPair(t)
		srv := challengeServer(s, token)
		h := v3Hello("")
		if _, _, err := ClientHandshake(a, &h, testSettings()); !errors.Is(err, ErrProtocol) {
			t.Fatalf("client without a token answered a challenge: %v", err)
		}
		<-srv
	})
}
