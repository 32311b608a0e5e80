package ctl

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/netip"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vpcreach/vpcreach/registry"
)

// routeJSON is a route in -o json output: stable lowercase keys, every
// key always present.
type routeJSON struct {
	Key        string    `json:"key"` // [network/]ip:port, as lookup takes it
	Network    string    `json:"network"`
	Target     string    `json:"target"`
	Proxy      string    `json:"proxy"`
	Relay      string    `json:"relay"`
	Agent      string    `json:"agent"`
	Identity   string    `json:"identity"`
	Server     string    `json:"server"`
	Session    string    `json:"session"`
	Generation uint64    `json:"generation"`
	Registered time.Time `json:"registered"`
	AgeSeconds float64   `json:"age_seconds"`
}

func routeOut(r registry.Route, now time.Time) routeJSON {
	return routeJSON{Key: r.Key.String(), Network: r.Network, Target: r.Addr.String(),
		Proxy: addrString(r.Proxy), Relay: addrString(r.Relay), Agent: r.Agent, Identity: r.Identity,
		Server: r.Server, Session: r.Session, Generation: r.Generation, Registered: r.Registered.UTC(),
		AgeSeconds: math.Round(now.Sub(r.Registered).Seconds()*1000) / 1000}
}

func addrString(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// sortRoutes orders routes by network, then target.
func sortRoutes(rs []registry.Route) {
	sort.Slice(rs, func(i, j int) bool {
		if rs[i].Network != rs[j].Network {
			return rs[i].Network < rs[j].Network
		}
		return rs[i].Addr.Compare(rs[j].Addr) < 0
	})
}

func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0) }

func writeRouteTable(w io.Writer, rs []registry.Route, now time.Time) {
	tw := newTable(w)
	fmt.Fprintln(tw, "TARGET\t\tPROXY\tRELAY\tAGENT\tSERVER\tSESSION\tGENERATION\tAGE")
	for _, r := range rs {
		fmt.Fprintf(tw, "%s\t->\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", r.Key, orDash(addrString(r.Proxy)),
			orDash(addrString(r.Relay)), orDash(r.Agent), orDash(r.Server), shortSession(r.Session),
			r.Generation, age(now, r.Registered))
	}
	_ = tw.Flush()
}

// writeRouteDetail prints one route, one field a line.
func writeRouteDetail(w io.Writer, r registry.Route, now time.Time) {
	tw := newTable(w)
	network := r.Network
	if network == "" {
		network = `"" (default)`
	}
	fmt.Fprintf(tw, "target:\t%s\n", r.Addr)
	fmt.Fprintf(tw, "network:\t%s\n", network)
	fmt.Fprintf(tw, "proxy:\t%s\t(connect here to reach the target)\n", orDash(addrString(r.Proxy)))
	fmt.Fprintf(tw, "relay:\t%s\t(the member's relay port, for socks5d)\n", orDash(addrString(r.Relay)))
	fmt.Fprintf(tw, "agent:\t%s\n", orDash(r.Agent))
	fmt.Fprintf(tw, "identity:\t%s\n", orDash(r.Identity))
	fmt.Fprintf(tw, "server:\t%s\n", orDash(r.Server))
	fmt.Fprintf(tw, "session:\t%s\n", orDash(r.Session))
	fmt.Fprintf(tw, "generation:\t%d\n", r.Generation)
	fmt.Fprintf(tw, "registered:\t%s\t(%s ago)\n", r.Registered.UTC().Format(time.RFC3339), age(now, r.Registered))
	_ = tw.Flush()
}

// shortSession keeps the first 8 characters of a session id: enough to
// tell sessions apart in a table.
func shortSession(s string) string {
	if s == "" {
		return "-"
	}
	if len(s) > 8 {
		return s[:8]
	}
	return s
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// age formats now - t compactly: 42s, 3m05s, 2h07m, 4d03h.
func age(now, t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	d := now.Sub(t)
	if d < 0 {
		d = 0 // clock skew between hosts
	}
	s := int64(d / time.Second)
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return fmt.Sprintf("%dm%02ds", s/60, s%60)
	case s < 86400:
		return fmt.Sprintf("%dh%02dm", s/3600, s%3600/60)
	default:
		return fmt.Sprintf("%dd%02dh", s/86400, s%86400/3600)
	}
}

// millis formats a duration in milliseconds with one decimal.
func millis(d time.Duration) string {
	return strings.TrimSuffix(fmt.Sprintf("%.1f", float64(d)/float64(time.Millisecond)), ".0") + " ms"
}

func (c *command) writeJSON(v any) int {
	enc := json.NewEncoder(c.stdout)
	enc.SetIndent("", "  ")
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return c.fail("write: %v", err)
	}
	return exitOK
}
