package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/cli"
	"github.com/vpcreach/vpcreach/internal/config"
	"github.com/vpcreach/vpcreach/internal/netx"
	"github.com/vpcreach/vpcreach/internal/socks"
	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// cli.Main hands socks5d the reloaded configuration through Apply.
var _ cli.Applier[*socks.DaemonConfig] = (*socks.Daemon)(nil)

// socks5d live reload (SIGHUP -> Apply): users appear and disappear and
// ACLs narrow while connections carry data. Connections the new users and
// ACLs still allow stay; those they no longer allow are closed at once
// (revocation is immediate); restart-only keys refuse the reload.
func TestSocks5dReloadUsers(t *testing.T) {
	e1, e2 := testutil.EchoTarget(t), testutil.EchoTarget(t)
	port := func(a string) string { return a[strings.LastIndexByte(a, ':')+1:] }
	reg := registry.NewMemory(nil)
	srv := startServer(t, reg, nil)
	startAgent(t, []string{srv.ControlAddr().String()}, []string{e1, e2}, nil)
	waitRoute(t, reg, e1, "")
	waitRoute(t, reg, e2, "")

	// The daemon's configuration goes through the YAML loader, as the
	// SIGHUP path does, so the documented syntax is what is tested.
	alicePass := tokenFile(t, "alice-password").File
	bobPass := tokenFile(t, "bob-password").File
	t.Setenv("SA_CAROL_PASSWORD", "carol-password")
	parse := func(listen, admin, users string) *socks.DaemonConfig {
		t.Helper()
		yml := fmt.Sprintf("listen: %s\nlookup_api: http://%s\nadmin: %s\nhandshake_timeout: 5s\nusers:\n%s",
			listen, srv.APIAddr(), admin, users)
		var c socks.DaemonConfig
		if err := config.Parse([]byte(yml), &c); err != nil {
			t.Fatalf("%v\n%s", err, yml)
		}
		return &c
	}
	alice := func(allow string) string {
		return fmt.Sprintf("  - name: alice\n    password: {file: %s}\n    allow: [%s]\n", alicePass, allow)
	}
	bob := fmt.Sprintf("  - name: bob\n    password: {file: %s}\n    allow: [\"127.0.0.0/8:*\"]\n", bobPass)
	carol := "  - name: carol\n    password: {env: SA_CAROL_PASSWORD}\n    allow: [\"*/127.0.0.1:" + port(e1) + "\"]\n"
	both := "127.0.0.1/32:" + port(e1) + ", 127.0.0.1:" + port(e2)

	listen := "127.0.0.1:" + fmt.Sprint(testutil.FreePort(t))
	admin := "127.0.0.1:" + fmt.Sprint(testutil.FreePort(t))
	var logs testutil.LogBuffer
	d, err := socks.NewDaemon(*parse(listen, admin, alice(both)+bob), logger(&logs))
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx, context.Background()) }()
	t.Cleanup(func() { stop(); <-done })
	<-d.Ready()
	apply := func(c *socks.DaemonConfig) {
		t.Helper()
		if err := d.Apply(c); err != nil {
			t.Fatalf("Apply: %v", err)
		}
	}
	open := func(user, pass, target string) net.Conn {
		t.Helper()
		c := saDial(t, listen, "")
		if a, rep := saConnect(t, c, user, pass, target); a != 0 || rep != 0 {
			t.Fatalf("%s -> %s: auth %d, reply %d", user, target, a, rep)
		}
		return c
	}
	refused := func(user, pass, target string) (auth, rep byte) {
		t.Helper()
		c := saDial(t, listen, "")
		defer c.Close()
		return saConnect(t, c, user, pass, target)
	}
	closed := func(name string, c net.Conn) {
		t.Helper()
		testutil.Eventually(t, 5*time.Second, name+" closed by the reload", func() bool {
			_ = c.SetDeadline(time.Now().Add(time.Second))
			_, werr := c.Write([]byte("x"))
			_, rerr := c.Read(make([]byte, 1))
			return werr != nil || (rerr != nil && !netx.IsTimeout(rerr))
		})
	}

	a1, a2 := open("alice", "alice-password", e1), open("alice", "alice-password", e2)
	b1 := open("bob", "bob-password", e1)
	for _, c := range []net.Conn{a1, a2, b1} {
		saEcho(t, c, "before")
	}

	// 1. A user is added; nothing open is touched.
	apply(parse(listen, admin, alice(both)+bob+carol))
	c1 := open("carol", "carol-password", e1)
	for _, c := range []net.Conn{a1, a2, b1, c1} {
		saEcho(t, c, "after adding carol")
	}
	if a, rep := refused("carol", "carol-password", e2); a != 0 || rep != 2 {
		t.Fatalf("carol outside her ACL: auth %d, reply %d; want 0, 2", a, rep)
	}

	// 2. A user is removed: his connection is closed, the others go on.
	apply(parse(listen, admin, alice(both)+carol))
	closed("bob's connection", b1)
	for _, c := range []net.Conn{a1, a2, c1} {
		saEcho(t, c, "after removing bob")
	}
	if a, _ := refused("bob", "bob-password", e1); a == 0 {
		t.Fatal("a removed user authenticated")
	}

	// 3. An ACL narrows: the connection it no longer allows is closed.
	apply(parse(listen, admin, alice("127.0.0.1:"+port(e2))+carol))
	closed("alice's connection to e1", a1)
	for _, c := range []net.Conn{a2, c1} {
		saEcho(t, c, "after narrowing alice")
	}
	if a, rep := refused("alice", "alice-password", e1); a != 0 || rep != 2 {
		t.Fatalf("alice to e1 after narrowing: auth %d, reply %d; want 0, 2", a, rep)
	}
	for _, w := range []string{"user=bob", "user=alice"} {
		if !saLogHas(&logs, `msg="connection closed: no longer allowed after reload"`, w) {
			t.Errorf("no revocation line with %s", w)
		}
	}

	// 4. listen and admin need a restart: the reload is refused whole.
	other := "127.0.0.1:" + fmt.Sprint(testutil.FreePort(t))
	err = d.Apply(parse(other, other, alice(both)))
	if !errors.Is(err, socks.ErrRestartNeeded) || !strings.Contains(err.Error(), "listen, admin") {
		t.Fatalf("listen/admin change: %v; want ErrRestartNeeded naming listen and admin", err)
	}
	for _, c := range []net.Conn{a2, c1} {
		saEcho(t, c, "after a refused reload")
	}
	if a, rep := refused("alice", "alice-password", e1); a != 0 || rep != 2 {
		t.Fatalf("the refused reload changed alice's ACL: auth %d, reply %d", a, rep)
	}

	// Without users the front end is open again.
	apply(parse(listen, admin, "  []\n"))
	c, rep := socksConnect(t, listen, e1)
	if rep != 0 {
		t.Fatalf("no-auth CONNECT after the users were removed: %d", rep)
	}
	saEcho(t, c, "open")
	testutil.Eventually(t, 5*time.Second, "socks5d counters", func() bool {
		m := scrape(t, d.AdminAddr())
		return m[`vpcreach_socks5d_socks_connections_revoked_total`] == 2 &&
			m[`vpcreach_socks5d_socks_connects_total{result="denied"}`] == 3
	})
}
