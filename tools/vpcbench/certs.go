package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// tlsFiles are the throwaway CA and certificates of a run's TLS stacks,
// as PEM files: a server certificate for IP 127.0.0.1 and a client
// certificate whose common name is the bench agent's id (mutual TLS).
type tlsFiles struct {
	ca                    string
	serverCert, serverKey string
	clientCert, clientKey string
	// For probeTLS: the CA as a pool, the client certificate loaded.
	caPool     *x509.CertPool
	clientPair tls.Certificate
}

// makeCerts writes a fresh ECDSA P-256 CA and the two certificates it
// signs into dir. They are valid for a day and never leave the run's
// temporary directory.
func makeCerts(dir string) (*tlsFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f := &tlsFiles{
		ca:         filepath.Join(dir, "ca.pem"),
		serverCert: filepath.Join(dir, "server.pem"), serverKey: filepath.Join(dir, "server-key.pem"),
		clientCert: filepath.Join(dir, "client.pem"), clientKey: filepath.Join(dir, "client-key.pem"),
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	caTmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "vpcbench throwaway CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := signCert(caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	if err := writePEM(f.ca, "CERTIFICATE", caDER); err != nil {
		return nil, err
	}
	leaf := func(cn string, usage x509.ExtKeyUsage, ips []net.IP, certPath, keyPath string) error {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			Subject:     pkix.Name{CommonName: cn},
			NotBefore:   now.Add(-time.Hour),
			NotAfter:    now.Add(24 * time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: ips,
		}
		der, err := signCert(tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		kder, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		if err := writePEM(certPath, "CERTIFICATE", der); err != nil {
			return err
		}
		return writePEM(keyPath, "PRIVATE KEY", kder)
	}
	if err := leaf("127.0.0.1", x509.ExtKeyUsageServerAuth, []net.IP{net.IPv4(127, 0, 0, 1)},
		f.serverCert, f.serverKey); err != nil {
		return nil, err
	}
	if err := leaf(benchAgentID, x509.ExtKeyUsageClientAuth, nil, f.clientCert, f.clientKey); err != nil {
		return nil, err
	}
	f.caPool = x509.NewCertPool()
	f.caPool.AddCert(ca)
	if f.clientPair, err = tls.LoadX509KeyPair(f.clientCert, f.clientKey); err != nil {
		return nil, err
	}
	return f, nil
}

func signCert(tmpl, parent *x509.Certificate, pub *ecdsa.PublicKey, signer *ecdsa.PrivateKey) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl.SerialNumber = serial
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		return nil, fmt.Errorf("certificate %q: %w", tmpl.Subject.CommonName, err)
	}
	return der, nil
}

func writePEM(path, typ string, der []byte) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}

// serverYAML is the proxyserver's tls: setting (mutual TLS).
func (f *tlsFiles) serverYAML() string {
	return fmt.Sprintf("tls: {cert_file: %q, key_file: %q, client_ca_file: %q}\n", f.serverCert, f.serverKey, f.ca)
}

// agentYAML is the agent's tls: setting.
func (f *tlsFiles) agentYAML() string {
	return fmt.Sprintf("tls: {ca_file: %q, server_name: 127.0.0.1, cert_file: %q, key_file: %q}\n",
		f.ca, f.clientCert, f.clientKey)
}

// probeTLS handshakes with the control listener at addr as the agent
// would and describes what was negotiated (version, cipher suite, key
// exchange). It then closes without a hello, which the server logs as a
// failed handshake and ignores.
func probeTLS(addr string, f *tlsFiles) (string, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{MinVersion: tls.VersionTLS13,
		RootCAs: f.caPool, ServerName: "127.0.0.1", Certificates: []tls.Certificate{f.clientPair}})
	if err != nil {
		return "", fmt.Errorf("TLS probe of %s: %w", addr, err)
	}
	defer c.Close()
	cs := c.ConnectionState()
	return fmt.Sprintf("%s, %s, %s", tls.VersionName(cs.Version), tls.CipherSuiteName(cs.CipherSuite), cs.CurveID), nil
}
