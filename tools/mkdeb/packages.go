package main

// The two packages, and what each installs. Paths in the systemd units
// (ExecStart=/usr/bin/<binary>, -config /etc/vpcreach/<name>.yaml) must
// match binDir and confDir, and their DynamicUser gets the group sysUser
// (SupplementaryGroups=vpcreach) that postinst creates, to read secrets
// kept root:vpcreach 0640; test/pkg checks both.

const (
	binDir  = "/usr/bin"
	unitDir = "/lib/systemd/system"
	confDir = "/etc/vpcreach"
	docDir  = "/usr/share/doc"
	sysUser = "vpcreach" // system user and group created by postinst
)

// pkgDef is one .deb: binaries from the build dir, units from
// configs/systemd, example configs from configs/ as conffiles.
type pkgDef struct {
	Name        string
	Description string // first line: synopsis; the rest: long description
	Binaries    []string
	Units       []string
	Configs     []string
}

var packages = []pkgDef{
	{
		Name: "vpcreach-agent",
		Description: `vpcreach agent: reverse tunnel from a VPC to the proxy cluster
The agent runs inside an isolated network (a VPC), dials out to the
vpcreach proxy-server cluster through its VIP and keeps a multiplexed
reverse tunnel open, so that the centre can reach the targets it
exposes (ip:port) through the cluster, without any inbound rule.`,
		Binaries: []string{"agent"},
		Units:    []string{"vpcreach-agent.service"},
		Configs:  []string{"agent.yaml"},
	},
	{
		Name: "vpcreach-proxyserver",
		Description: `vpcreach proxy server and SOCKS5 front end
proxyserver is one member of the vpcreach proxy cluster: it accepts
agent tunnels, opens a proxy port for every exposed target and records
the routes in its registry (in memory, or Redis for a cluster).
socks5d is the SOCKS5 front end: it looks a target up and connects
through the member that owns the route.`,
		Binaries: []string{"proxyserver", "socks5d"},
		Units:    []string{"vpcreach-proxyserver.service", "vpcreach-socks5d.service"},
		Configs:  []string{"proxyserver.yaml", "socks5d.yaml"},
	},
}
