package cluster

import (
	"slices"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/testutil"
	"github.com/vpcreach/vpcreach/registry"
)

// BenchmarkFailover measures, over 20 kills, the time from kill -9 of the
// member holding the tunnel to the first good request through socks5d
// (client requests every 20 ms), and reports p50 and max. Goal: p50 <= 1 s,
// max <= 2 s. Each killed member is restarted before the next kill.
//
//	go test -run '^$' -bench Failover -benchtime 1x ./test/cluster/
func BenchmarkFailover(b *testing.B) {
	const kills = 20
	c := newCluster(b)
	c.startAgent("vpc-a")
	c.waitRoute(10*time.Second, "route registered", func(registry.Route) bool { return true })
	l := c.startLoop()
	l.waitOKs(b, 5, 10*time.Second)
	var took []time.Duration
	b.ResetTimer()
	for range kills {
		r := c.waitRoute(10*time.Second, "route", func(registry.Route) bool { return true })
		m := c.member(r.Server)
		killed := time.Now()
		m.proc.Kill(b)
		var first time.Time
		var found bool
		testutil.Eventually(b, 10*time.Second, "a good request after the kill", func() bool {
			first, found = l.firstOKAfter(killed)
			return found
		})
		took = append(took, first.Sub(killed))
		c.startMember(m)
		// haproxy sees it up again after rise 2 x inter 500 ms.
		testutil.Eventually(b, 5*time.Second, "health checks reach the restarted member", func() bool {
			return m.proc.Log.Contains("balancer health check")
		})
		l.waitOKs(b, 5, 10*time.Second)
	}
	b.StopTimer()
	slices.Sort(took)
	b.ReportMetric(float64(took[len(took)/2].Milliseconds()), "p50-ms")
	b.ReportMetric(float64(took[len(took)-1].Milliseconds()), "max-ms")
	b.ReportMetric(float64(took[0].Milliseconds()), "min-ms")
	b.Logf("kill -9 -> first good request over %d kills: %v", kills, took)
}
