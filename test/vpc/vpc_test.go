package vpc

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// TestVPC: the controller in vpc-b cannot reach vpc-a, but reaches its
// HTTP service and its Redis through socks5d, also while the member
// holding the tunnel is killed (kill -9) in the middle of 200 INCRs.
func TestVPC(t *testing.T) {
	t.Parallel()
	v := newVPC(t)

	// The target is up (vpc-a reaches it) but the controller cannot
	// connect to it directly: the centre does not forward.
	if r := runIn(t, v.nsA, 5*time.Second, "curl", "-sS", "--max-time", "2", "http://"+httpTarget+"/"); r.code != 0 ||
		!strings.Contains(r.stdout, pagePrefix) {
		t.Fatalf("the target from inside vpc-a: %v", r)
	}
	direct := runIn(t, v.nsB, 5*time.Second, "curl", "-sS", "--connect-timeout", "2", "--max-time", "3", "http://"+httpTarget+"/")
	if direct.code == 0 || strings.Contains(direct.stdout, pagePrefix) {
		t.Fatalf("the controller reached vpc-a's target directly: %v", direct)
	}
	t.Logf("direct connect from vpc-b to %s fails as it must: %v", httpTarget, direct)

	// Through socks5d: the page, served to the agent's address.
	page := v.curlViaSocks(5 * time.Second)
	if page.code != 0 || !strings.Contains(page.stdout, pagePrefix) ||
		!strings.Contains(page.stdout, "connection from "+vpcAIP+":") {
		t.Fatalf("curl --socks5-hostname through socks5d: %v", page)
	}

	// 200 INCRs through proxychains4 and socks5d; after the 50th, the
	// member holding the tunnel is killed while the next ones run.
	before, err := v.route(redisTgt)
	if err != nil {
		t.Fatal(err)
	}
	dead := v.member(before.Server)

	// A command in flight across the kill: a BLPOP on a list nobody fills
	// holds its connection open through that member. When the member dies
	// it must end as a failure after the connect: not a hang, and not
	// mistaken for a refused connect (which would be retried).
	type heldResult struct {
		res outcome
		r   cmdResult
		err error
		at  time.Time
	}
	held := make(chan heldResult, 1)
	go func() {
		res, r, err := v.redisViaSocks(20*time.Second, "BLPOP", "vpcr:never", "0")
		held <- heldResult{res, r, err, time.Now()}
	}()
	testutil.Eventually(t, 5*time.Second, "the BLPOP waiting in vpc-a's Redis", func() bool {
		select {
		case h := <-held:
			t.Fatalf("BLPOP through socks5d ended before the kill: %v %v", h.r, h.err)
		default:
		}
		r := runIn(t, v.nsA, 5*time.Second, "redis-cli", "-h", vpcAIP, "-p", "6379", "CLIENT", "LIST")
		return strings.Contains(r.stdout, "cmd=blpop")
	})

	const total, killAfter = 200, 50
	var (
		acked, failedAfterConnect, connectFails int
		lastValue                               int64
		killedAt                                atomic.Int64 // unix nanoseconds, once reaped
		firstOKAfterKill                        time.Time
		afterConnectErrs                        []string
		start                                   = time.Now()
	)
	for i := 1; i <= total; i++ {
		deadline := time.Now().Add(10 * time.Second)
		for {
			began := time.Now()
			res, n, r := v.incr()
			if res == ok {
				if n <= lastValue {
					t.Fatalf("INCR %d answered %d after %d", i, n, lastValue)
				}
				acked, lastValue = acked+1, n
				if k := killedAt.Load(); firstOKAfterKill.IsZero() && k != 0 && began.UnixNano() > k {
					firstOKAfterKill = time.Now()
				}
				break
			}
			if res == afterConnect {
				failedAfterConnect++
				afterConnectErrs = append(afterConnectErrs, fmt.Sprintf("INCR %d: %v", i, r))
				break // not retried: it may have run
			}
			connectFails++
			if time.Now().After(deadline) {
				t.Fatalf("INCR %d: no connect through socks5d for 10 s; last: %v", i, r)
			}
		}
		if i == killAfter {
			// Killed concurrently with the next INCRs, so that one may be
			// in flight when the member dies.
			// The kill time is when the process is reaped, so an INCR
			// counted as "after the kill" cannot have used the member.
			go func() {
				if dead.proc.Cmd.Process.Kill() == nil {
					<-dead.proc.Done()
					killedAt.Store(time.Now().UnixNano())
				}
			}()
		}
	}
	loopTook := time.Since(start)
	select {
	case <-dead.proc.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("%s still running after kill -9", dead.id)
	}
	if killedAt.Load() == 0 {
		t.Fatalf("kill -9 of %s failed", dead.id)
	}

	var h heldResult
	select {
	case h = <-held:
	case <-time.After(5 * time.Second):
		t.Fatal("the BLPOP held across the kill still hangs")
	}
	heldEnded := h.at.Sub(time.Unix(0, killedAt.Load()))
	t.Logf("BLPOP in flight through %s ended %v after the kill: %v", dead.id, heldEnded.Round(time.Millisecond), h.r)
	if h.err != nil || h.res != afterConnect {
		t.Fatalf("BLPOP in flight across the kill: outcome %d, %v, %v; want a failure after the connect", h.res, h.r, h.err)
	}
	if heldEnded > 3*time.Second {
		t.Fatalf("BLPOP in flight ended %v after the kill; the dead member's connections must fail at once", heldEnded)
	}

	counter := strings.TrimSpace(mustRunIn(t, v.nsA, "redis-cli", "-h", vpcAIP, "-p", "6379", "GET", "visits"))
	var got int
	if _, err := fmt.Sscanf(counter, "%d", &got); err != nil {
		t.Fatalf("GET visits in vpc-a: %q", counter)
	}
	t.Logf("%d INCRs in %v: %d acked, %d connect failures retried, %d failed after connect %v; counter %d; "+
		"kill -9 of %s -> first acked INCR after %v",
		total, loopTook.Round(time.Millisecond), acked, connectFails, failedAfterConnect, afterConnectErrs, got, dead.id,
		firstOKAfterKill.Sub(time.Unix(0, killedAt.Load())).Round(time.Millisecond))
	if acked+failedAfterConnect != total {
		t.Fatalf("%d acked + %d failed after connect != %d INCRs", acked, failedAfterConnect, total)
	}
	if failedAfterConnect > 1 {
		t.Fatalf("%d INCRs failed after their connect; at most one per kill: %v", failedAfterConnect, afterConnectErrs)
	}
	if got < acked || got > acked+failedAfterConnect {
		t.Fatalf("counter %d in vpc-a; want acked %d <= counter <= %d", got, acked, acked+failedAfterConnect)
	}
	if firstOKAfterKill.IsZero() {
		t.Fatal("no INCR acked after the kill")
	}

	// The later INCRs went through another member: the route names it,
	// its API lists the agent, and the dead member is dead.
	after, err := v.route(redisTgt)
	if err != nil || after.Server == dead.id || after.Generation <= before.Generation {
		t.Fatalf("route after the kill = %+v, %v; want a newer one on a live member (was %s)", after, err, dead.id)
	}
	if ags, err := v.agentsOn(v.member(after.Server)); err != nil || !slices.Contains(ags, "vpc-a") {
		t.Fatalf("member %s's agents: %v, %v; want vpc-a", after.Server, ags, err)
	}
	if res, n, r := v.incr(); res != ok || n != int64(got)+1 {
		t.Fatalf("INCR after the loop: %v (want %d)", r, got+1)
	}
}

// TestFaultMemberHostLost (fault b): the host of the member holding the
// tunnel is lost: its namespace drops every packet both ways, so nothing
// answers and nothing is reset. (a) socks5d's connect to that member fails
// within its relay_dial_timeout (default 2 s) and the client gets a
// failure reply, not a hang; (b) the agent notices its dead peer through
// the tunnel keepalive (bound 15 s: ping interval 5 s + ping timeout
// 7.5 s) and moves to another member; (c) requests through socks5d
// succeed again, through the new member.
func TestFaultMemberHostLost(t *testing.T) {
	t.Parallel()
	v := newVPC(t)
	if r := v.curlViaSocks(5 * time.Second); r.code != 0 || !strings.Contains(r.stdout, pagePrefix) {
		t.Fatalf("curl through socks5d before the fault: %v", r)
	}
	before, err := v.route(httpTarget)
	if err != nil {
		t.Fatal(err)
	}
	lost := v.member(before.Server)

	// Lose the host: drop everything in and out of the member's
	// namespace, before any other hook (priority -300), so the kernel
	// answers nothing (no SYN-ACK, no RST) and the process's own packets
	// (data, FIN, RST) never leave.
	mustRunIn(t, lost.ns, "nft", "add", "table", "inet", "vpcrbh")
	mustRunIn(t, lost.ns, "nft", "add", "chain", "inet", "vpcrbh", "in",
		"{ type filter hook input priority -300 ; policy drop ; }")
	mustRunIn(t, lost.ns, "nft", "add", "chain", "inet", "vpcrbh", "out",
		"{ type filter hook output priority -300 ; policy drop ; }")
	cut := time.Now()

	// (a) A SOCKS5 CONNECT from the controller while the route still
	// names the lost member. socks5d's relay dial times out after
	// relay_dial_timeout (2 s), it looks the route up once more, finds the
	// same one and answers "host unreachable". Asserted at 4 s: 2 s of
	// margin for the lookups and a loaded CI machine.
	const relayDialTimeout = 2 * time.Second
	reply, took, err := v.socksConnect(httpTarget, 10*time.Second)
	still, lerr := v.route(httpTarget)
	stillLost := lerr == nil && still.Server == lost.id
	t.Logf("SOCKS5 CONNECT through socks5d while %s's host is lost: reply %d after %v (route still on it: %v)",
		lost.id, reply, took.Round(time.Millisecond), stillLost)
	if err != nil {
		t.Fatalf("SOCKS5 CONNECT while %s's host is lost: no reply after %v: %v", lost.id, took, err)
	}
	if took > relayDialTimeout+2*time.Second {
		t.Fatalf("SOCKS5 reply after %v; want within relay_dial_timeout %v (asserted at %v)", took, relayDialTimeout, relayDialTimeout+2*time.Second)
	}
	if stillLost && reply != 4 {
		t.Fatalf("SOCKS5 reply %d while the route names the lost member; want 4 (host unreachable)", reply)
	}
	if stillLost && took < relayDialTimeout-100*time.Millisecond {
		t.Fatalf("SOCKS5 reply after %v, before relay_dial_timeout %v: the lost host answered something", took, relayDialTimeout)
	}
	// The drop is silent: a connect from the centre to the member times
	// out instead of being refused or accepted.
	if c, err := dialInTimeout(v.centre, lost.addr(relayPort), time.Second); err == nil {
		c.Close()
		t.Fatalf("connected to %s's relay port through the blackhole", lost.id)
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Fatalf("connect to %s's relay port: %v; want a timeout (the blackhole must not answer)", lost.id, err)
	}

	// (b) The agent moves: its tunnel to haproxy stays up, so only the
	// keepalive can tell. Bound 15 s, asserted at 20 s (margin for a
	// loaded CI machine).
	moved := v.waitRoute(httpTarget, 25*time.Second, "the route moved off the lost member", func(r registry.Route) bool {
		return r.Server != lost.id
	})
	movedAfter := time.Since(cut)
	t.Logf("agent moved from %s to %s %v after the host was lost", lost.id, moved.Server, movedAfter.Round(time.Millisecond))
	if movedAfter > 20*time.Second {
		t.Fatalf("route moved %v after the host was lost; bound 15 s (asserted at 20 s)", movedAfter)
	}
	// Nothing but the keepalive can have moved it: the ping timeout alone
	// is 7.5 s. A faster move means the lost host's FIN or RST reached
	// haproxy, and the blackhole was not silent.
	if movedAfter < 5*time.Second {
		t.Fatalf("route moved %v after the host was lost: too soon for a keepalive, the blackhole leaked a FIN or RST", movedAfter)
	}
	if moved.Generation <= before.Generation {
		t.Fatalf("moved route generation %d not newer than %d", moved.Generation, before.Generation)
	}

	// (c) Through socks5d again, through the new member.
	var r cmdResult
	attempts := 0
	testutil.Eventually(t, 5*time.Second, "curl through socks5d after the move", func() bool {
		attempts++
		r = v.curlViaSocks(5 * time.Second)
		return r.code == 0 && strings.Contains(r.stdout, pagePrefix)
	})
	t.Logf("curl through socks5d good %v after the host was lost (%d attempts after the move)",
		time.Since(cut).Round(time.Millisecond), attempts)
	for i := 0; i < 5; i++ {
		if r := v.curlViaSocks(5 * time.Second); r.code != 0 || !strings.Contains(r.stdout, pagePrefix) {
			t.Fatalf("curl %d through socks5d after the move: %v", i, r)
		}
	}
	if res, _, r := v.incr(); res != ok {
		t.Fatalf("INCR through socks5d after the move: %v", r)
	}
	if ags, err := v.agentsOn(v.member(moved.Server)); err != nil || !slices.Contains(ags, "vpc-a") {
		t.Fatalf("member %s's agents: %v, %v; want vpc-a", moved.Server, ags, err)
	}
}

// socksConnect sends a SOCKS5 CONNECT to target through socks5d from
// vpc-b and returns the reply code and how long the reply took.
func (v *vpc) socksConnect(target string, timeout time.Duration) (byte, time.Duration, error) {
	start := time.Now()
	conn, err := dialInTimeout(v.nsB, socksAddr, 2*time.Second)
	if err != nil {
		return 0, time.Since(start), err
	}
	defer conn.Close()
	_ = conn.SetDeadline(start.Add(timeout))
	ap := netip.MustParseAddrPort(target)
	a4 := ap.Addr().As4()
	req := append([]byte{5, 1, 0, 5, 1, 0, 1}, a4[:]...)
	req = binary.BigEndian.AppendUint16(req, ap.Port())
	if _, err := conn.Write(req); err != nil {
		return 0, time.Since(start), err
	}
	var rep [12]byte
	if _, err := io.ReadFull(conn, rep[:]); err != nil {
		return 0, time.Since(start), fmt.Errorf("socks5 reply: %w", err)
	}
	took := time.Since(start)
	if rep[0] != 5 || rep[1] != 0 {
		return 0, took, errors.New("bad socks5 method reply")
	}
	return rep[3], took, nil
}
