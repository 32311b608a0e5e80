package redistest

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
)

// Cluster is a Redis Cluster of master-only nodes covering all 16384 slots.
type Cluster struct {
	Addrs []string // node addresses, in the order of Nodes
	Nodes []*Server
}

// clusterTimeout bounds cluster creation and each wait for a healthy state.
const clusterTimeout = 20 * time.Second

// StartCluster starts masters (at least 3) cluster-enabled redis-server
// nodes, each with nodes.conf in its own directory, cluster-node-timeout
// 2000 and an explicit cluster bus port (so no dependence on port+10000),
// joins them with `redis-cli --cluster create`, and returns once every node
// reports cluster_state:ok with all 16384 slots ok.
func StartCluster(t testing.TB, masters int) *Cluster {
	t.Helper()
	if masters < 3 {
		t.Fatalf("redistest: StartCluster(%d): redis-cli --cluster create needs at least 3 masters", masters)
	}
	server := testutil.NeedBinary(t, "redis-server")
	cli := testutil.NeedBinary(t, "redis-cli")
	c := &Cluster{}
	for range masters {
		n := start(t, server, "", true, []string{
			"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf", // relative to the node's own dir
			"--cluster-node-timeout", "2000",
		})
		c.Nodes = append(c.Nodes, n)
		c.Addrs = append(c.Addrs, n.Addr)
	}

	ctx, cancel := context.WithTimeout(context.Background(), clusterTimeout)
	defer cancel()
	args := append([]string{"--cluster", "create"}, c.Addrs...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	if out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput(); err != nil {
		t.Fatalf("redistest: redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}

	for _, n := range c.Nodes {
		testutil.Eventually(t, clusterTimeout, "cluster_state:ok on "+n.Addr, func() bool {
			v, err := do(n.Addr, "CLUSTER", "INFO")
			info, _ := v.(string)
			return err == nil &&
				strings.Contains(info, "cluster_state:ok\r\n") &&
				strings.Contains(info, "cluster_slots_ok:16384\r\n")
		})
	}
	return c
}

// Do runs one single-key command as a cluster client would: on Nodes[0],
// following a MOVED redirect to the node that owns the key's slot. The
// reply is rendered as in Server.Do.
func (c *Cluster) Do(t testing.TB, args ...string) string {
	t.Helper()
	reply := Do(t, c.Addrs[0], args...)
	// "(error) MOVED <slot> <host:port>"
	if f := strings.Fields(reply); len(f) == 4 && f[0] == "(error)" && f[1] == "MOVED" {
		reply = Do(t, f[3], args...)
	}
	return reply
}
