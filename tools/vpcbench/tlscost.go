package main

import (
	"fmt"
	"strings"
)

// tlsSummary is the TLS section of the report: what the tunnel
// negotiated and, with -tls both, the core figures of each vpcreach path
// without and with TLS side by side, with their ratio taken within each
// repetition.
func tlsSummary(e *env) string {
	var b strings.Builder
	b.WriteString("## TLS cost: the tunnel without and with TLS 1.3\n\n")
	if e.tlsInfo != "" {
		fmt.Fprintf(&b, "Negotiated on the tunnel: %s; mutual TLS, ECDSA P-256 certificates.\n\n", e.tlsInfo)
	}
	if e.o.tls != tlsBoth {
		b.WriteString("Every vpcreach path of this run has TLS on its tunnel (-tls on); -tls both compares.\n")
		return b.String()
	}
	type row struct {
		label, section string
		key            []string
		prec           int
	}
	var rows []row
	for _, d := range directions {
		rows = append(rows,
			row{"bulk " + d.name + ", Gbit/s", "bulk", []string{d.name, "gbps"}, 2},
			row{"bulk " + d.name + ", × direct", "bulk", []string{d.name, "ratio"}, 2},
			row{"bulk " + d.name + ", CPU-s/GB", "bulk", []string{d.name, "cpu"}, 2})
	}
	rows = append(rows,
		row{"GET -c 50, req/s", "rr", []string{"50", "GET", "rps"}, 0},
		row{"GET -c 50, × direct", "rr", []string{"50", "GET", "ratio"}, 2},
		row{"CPU-µs per request, -c 50", "rr", []string{"50", "cpu"}, 1},
		row{"GET -c 1, p50 ms", "rr", []string{"1", "GET", "p50"}, 3},
		row{"RSS per idle connection, both ends, KiB", "mem", []string{"both", "per"}, 1})
	var kinds []string
	for _, k := range []string{pProxy, pSocks} {
		if (e.o.only["bulk"] || e.o.only["rr"]) && contains(e.o.paths, k) || k == pProxy && e.o.only["mem"] {
			kinds = append(kinds, k)
		}
	}
	tb := &table{head: []string{"metric"}}
	for _, k := range kinds {
		tb.head = append(tb.head, k, k+tlsSuffix, "TLS / plain")
	}
	for _, r := range rows {
		res := e.res[r.section]
		if res == nil {
			continue
		}
		cells := []string{r.label}
		for _, k := range kinds {
			tk := k + tlsSuffix
			cells = append(cells, res.get(append([]string{k}, r.key...)...).cell(r.prec),
				res.get(append([]string{tk}, r.key...)...).cell(r.prec),
				res.get(append([]string{tk}, plainKey(r.key)...)...).cell(2))
		}
		tb.row(cells...)
	}
	b.WriteString(tb.String())
	b.WriteString("\nThe figures are those of the tables above (which also have SET, p99 and the floors). TLS / plain is the TLS path's figure over the plain path's in the same repetition, where the two ran close together in alternating order, then summarised: below 1 is a loss for Gbit/s, × direct and req/s; above 1 is a cost for CPU, latency and memory. Only the tunnel between agent and proxyserver is encrypted; on the socks5d path the relay hop stays plain. The socks5d path is not in the memory test (–).\n")
	return b.String()
}
