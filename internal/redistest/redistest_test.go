package redistest

import (
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

func TestServerKillRestart(t *testing.T) {
	t.Parallel()
	s := Start(t)
	if strings.HasSuffix(s.Addr, ":6379") {
		t.Fatalf("started on the shared port: %s", s.Addr)
	}
	if got := s.Do(t, "PING"); got != "PONG" {
		t.Fatalf("PING = %q", got)
	}
	if got := s.Do(t, "SET", "k", "v 1"); got != "OK" {
		t.Fatalf("SET = %q", got)
	}
	if got := s.Do(t, "GET", "k"); got != "v 1" {
		t.Fatalf("GET = %q", got)
	}
	if got := s.Do(t, "GET", "missing"); got != "(nil)" {
		t.Fatalf("GET missing = %q", got)
	}
	if got := s.Do(t, "DBSIZE"); got != "1" {
		t.Fatalf("DBSIZE = %q", got)
	}
	if got := s.Do(t, "NOSUCHCMD"); !strings.HasPrefix(got, "(error) ERR") {
		t.Fatalf("bad command = %q", got)
	}
	if got := s.Do(t, "CONFIG", "GET", "save"); got != "save\n" {
		t.Fatalf("CONFIG GET save = %q (persistence must be off)", got)
	}

	addr := s.Addr
	s.Kill(t)
	if _, err := do(addr, "PING"); err == nil {
		t.Fatal("PING answered after Kill")
	}
	s.Restart(t)
	if s.Addr != addr {
		t.Fatalf("Restart moved %s to %s", addr, s.Addr)
	}
	if got := s.Do(t, "DBSIZE"); got != "0" {
		t.Fatalf("DBSIZE after restart = %q, want empty", got)
	}
	s.Restart(t) // also works on a running server
	if got := s.Do(t, "PING"); got != "PONG" {
		t.Fatalf("PING after second restart = %q", got)
	}
}

func TestSentinelFailover(t *testing.T) {
	t.Parallel()
	s := StartSentinel(t)
	oldMaster, oldReplica := s.Master, s.Replica
	if got := s.Master.Do(t, "SET", "before", "1"); got != "OK" {
		t.Fatalf("SET on master = %q", got)
	}
	if got := s.Master.Do(t, "DBSIZE"); got != "1" {
		t.Fatalf("DBSIZE on master = %q, want only our key", got)
	}
	// Replication is asynchronous: wait for the key on the replica.
	testutil.Eventually(t, 5*time.Second, "key to replicate", func() bool {
		return s.Replica.Do(t, "GET", "before") == "1"
	})
	if got := s.Replica.Do(t, "SET", "x", "1"); !strings.Contains(got, "READONLY") {
		t.Fatalf("SET on replica = %q, want READONLY", got)
	}

	s.Failover(t)
	if s.Master != oldReplica || s.Replica != oldMaster {
		t.Fatal("Failover did not swap Master and Replica")
	}
	if got := s.masterAddr(); got != s.Master.Addr {
		t.Fatalf("sentinel reports %s, want %s", got, s.Master.Addr)
	}
	if got := s.Master.Do(t, "SET", "after", "2"); got != "OK" {
		t.Fatalf("SET on new master = %q", got)
	}
	if got := s.Master.Do(t, "GET", "before"); got != "1" {
		t.Fatalf("new master lost replicated key: GET before = %q", got)
	}
}

func TestCluster(t *testing.T) {
	t.Parallel()
	c := StartCluster(t, 3)
	if len(c.Nodes) != 3 || len(c.Addrs) != 3 {
		t.Fatalf("%d nodes, %d addrs", len(c.Nodes), len(c.Addrs))
	}
	for _, n := range c.Nodes {
		info := n.Do(t, "CLUSTER", "INFO")
		for _, want := range []string{"cluster_state:ok", "cluster_slots_assigned:16384", "cluster_known_nodes:3", "cluster_size:3"} {
			if !strings.Contains(info, want) {
				t.Fatalf("%s CLUSTER INFO lacks %s:\n%s", n.Addr, want, info)
			}
		}
	}

	// CLUSTER SLOTS: every slot has exactly one owner among our nodes.
	owner := make([]string, 16384)
	v, err := do(c.Addrs[0], "CLUSTER", "SLOTS")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range v.([]any) {
		r := r.([]any) // start, end, [ip, port, id, ...], replicas...
		master := r[2].([]any)
		addr := net.JoinHostPort(render(master[0]), render(master[1]))
		for slot := r[0].(int64); slot <= r[1].(int64); slot++ {
			if owner[slot] != "" {
				t.Fatalf("slot %d owned by %s and %s", slot, owner[slot], addr)
			}
			owner[slot] = addr
		}
	}
	for slot, a := range owner {
		if !slices.Contains(c.Addrs, a) {
			t.Fatalf("slot %d owned by %q, not one of %v", slot, a, c.Addrs)
		}
	}

	// Keys spread over slots land on every node, each key on the node
	// that owns its slot.
	const keys = 30
	for i := range keys {
		k := fmt.Sprintf("key-%d", i)
		if got := c.Do(t, "SET", k, k); got != "OK" {
			t.Fatalf("SET %s = %q", k, got)
		}
	}
	total := 0
	for _, n := range c.Nodes {
		size, _ := strconv.Atoi(n.Do(t, "DBSIZE"))
		if size == 0 {
			t.Errorf("node %s holds no keys", n.Addr)
		}
		total += size
		for _, k := range strings.Fields(n.Do(t, "KEYS", "*")) {
			slot, _ := strconv.Atoi(n.Do(t, "CLUSTER", "KEYSLOT", k))
			if owner[slot] != n.Addr {
				t.Errorf("%s holds %s, whose slot %d belongs to %s", n.Addr, k, slot, owner[slot])
			}
			if got := n.Do(t, "GET", k); got != k {
				t.Errorf("GET %s on its own node = %q", k, got)
			}
		}
	}
	if total != keys {
		t.Fatalf("nodes hold %d keys in all, want %d", total, keys)
	}
	if got := c.Do(t, "GET", "key-7"); got != "key-7" {
		t.Fatalf("cluster GET key-7 = %q", got)
	}
}
