package registry_test

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vpcreach/vpcreach/internal/redistest"
	"github.com/vpcreach/vpcreach/registry"
)

// Lookup and registration costs against a real redis-server on loopback.
// Each benchmark also times a plain PING in the same run: the ratio to it
// is what to compare across (noisy, shared) machines.
//
//	go test -run '^$' -bench Redis -benchtime 20000x ./registry/

// latencies runs op n times and reports p50 and p99 in µs, and the p50 of
// a PING round trip measured alongside, and their ratio.
func latencies(b *testing.B, r *registry.Redis, op func(i int) error) (total time.Duration) {
	b.Helper()
	ping := make([]time.Duration, 0, b.N)
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		if err := op(i); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := r.Ping(b.Context()); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, t1.Sub(t0))
		total += t1.Sub(t0)
		ping = append(ping, time.Since(t1))
	}
	b.StopTimer()
	slices.Sort(lat)
	slices.Sort(ping)
	pct := func(d []time.Duration, p float64) float64 {
		return float64(d[int(float64(len(d)-1)*p)].Nanoseconds()) / 1e3
	}
	b.ReportMetric(pct(lat, 0.50), "p50-µs")
	b.ReportMetric(pct(lat, 0.99), "p99-µs")
	b.ReportMetric(pct(ping, 0.50), "ping-p50-µs")
	b.ReportMetric(pct(lat, 0.50)/pct(ping, 0.50), "p50/ping")
	return total
}

func benchRoutes(n int) []registry.Route {
	rs := make([]registry.Route, n)
	for i := range rs {
		rs[i] = redisRoute(netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), 80).String(),
			fmt.Sprintf("sess-%d", i), 1)
	}
	return rs
}

// BenchmarkRedisLookupUncached: a socks5d lookup that goes to Redis.
func BenchmarkRedisLookupUncached(b *testing.B) {
	srv := redistest.Start(b)
	r := openRedis(b, registry.RedisOptions{Addrs: []string{srv.Addr}})
	defer r.Close()
	rs := benchRoutes(1000)
	for _, rt := range rs {
		if err := r.Register(b.Context(), rt, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
	latencies(b, r, func(i int) error {
		_, err := r.Lookup(b.Context(), rs[i%len(rs)].Key)
		return err
	})
}

// BenchmarkRedisLookupCached: a socks5d lookup served by its cache.
func BenchmarkRedisLookupCached(b *testing.B) {
	srv := redistest.Start(b)
	r := openRedis(b, registry.RedisOptions{Addrs: []string{srv.Addr}})
	defer r.Close()
	rs := benchRoutes(1000)
	c := registry.NewCache(r, registry.CacheOptions{Fresh: time.Hour})
	for _, rt := range rs {
		if err := r.Register(b.Context(), rt, time.Hour); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Lookup(b.Context(), rt.Key); err != nil {
			b.Fatal(err)
		}
	}
	latencies(b, r, func(i int) error {
		_, err := c.Lookup(b.Context(), rs[i%len(rs)].Key)
		return err
	})
}

// BenchmarkRedisRegister: one proxy server's registrations (and renewals,
// the same script), one after another as its renewal loop does them.
func BenchmarkRedisRegister(b *testing.B) {
	srv := redistest.Start(b)
	r := openRedis(b, registry.RedisOptions{Addrs: []string{srv.Addr}})
	defer r.Close()
	rs := benchRoutes(1000)
	total := latencies(b, r, func(i int) error {
		return r.Register(b.Context(), rs[i%len(rs)], time.Minute)
	})
	b.ReportMetric(float64(b.N)/total.Seconds(), "reg/s")
}
