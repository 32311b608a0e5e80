// Package vpc tests vpcreach across real network namespaces, the way it
// is deployed: an agent VPC (vpc-a) with a private HTTP service and a
// private Redis, a controller VPC (vpc-b) with ordinary clients (curl,
// proxychains4 + redis-cli), and a centre holding the cluster: three
// proxyserver members (each in a namespace of its own, so that one
// member's host can be lost), haproxy as the VIP, the registry Redis and
// socks5d. vpc-a and vpc-b reach the centre but not each other: the
// centre does not forward.
//
// Topology (every address lives only inside namespaces the test made;
// the host's namespace gets nothing):
//
//	vpc-a  eth0 10.213.1.2/24 (default via 10.213.1.1)
//	       agent; httptarget 10.213.1.2:8080; redis-server 10.213.1.2:6379
//	vpc-b  eth0 10.213.2.2/24 (default via 10.213.2.1)
//	       the controller: curl, proxychains4 + redis-cli
//	centre br0 10.213.0.1/24 + VIP 10.213.0.100/32; vpca 10.213.1.1/24;
//	       vpcb 10.213.2.1/24; ip_forward 0 and an nftables forward drop
//	       registry redis-server 10.213.0.1:6379; socks5d 10.213.0.1:1080;
//	       haproxy VIP 10.213.0.100:7000 (source 10.213.0.1 to members)
//	m1..m3 eth0 10.213.0.11-13/24, bridged into the centre's br0
//	       proxyserver: control :7000, relay :7001, API :7070,
//	       proxy ports 21000-21099, all on the member's own address
//
// The tests need root, iproute2, nftables, haproxy, redis-server,
// redis-tools, proxychains4 and curl; without them they skip, or fail
// when VPCREACH_REQUIRE_ALL is set (CI). The daemons are built once,
// without -race, so the timing bounds hold under `go test -race`.
package vpc

import (
	"os"
	"testing"

	"github.com/vpcreach/vpcreach/internal/proctest"
)

// binDir holds the daemons, built once by TestMain (without -race).
var binDir string

func TestMain(m *testing.M) { os.Exit(proctest.RunWithBinaries(m, &binDir)) }
