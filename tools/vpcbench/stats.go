package main

import (
	"fmt"
	"math"
	"sort"
	"strings"
)

// samples collects the repetitions of one measurement.
type samples []float64

func (s samples) sorted() []float64 {
	c := append([]float64(nil), s...)
	sort.Float64s(c)
	return c
}

func (s samples) median() float64 {
	c := s.sorted()
	if len(c) == 0 {
		return math.NaN()
	}
	if len(c)%2 == 1 {
		return c[len(c)/2]
	}
	return (c[len(c)/2-1] + c[len(c)/2]) / 2
}

func (s samples) min() float64 {
	if len(s) == 0 {
		return math.NaN()
	}
	return s.sorted()[0]
}

func (s samples) max() float64 {
	if len(s) == 0 {
		return math.NaN()
	}
	return s.sorted()[len(s)-1]
}

// cell formats "median (min–max)" with prec decimals; "–" if empty.
func (s samples) cell(prec int) string {
	if len(s) == 0 {
		return "–"
	}
	m := fmtNum(s.median(), prec)
	if len(s) == 1 {
		return m
	}
	return fmt.Sprintf("%s (%s–%s)", m, fmtNum(s.min(), prec), fmtNum(s.max(), prec))
}

func fmtNum(v float64, prec int) string {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return "n/a"
	}
	return fmt.Sprintf("%.*f", prec, v)
}

// results is a keyed set of samples.
type results map[string]*samples

func (r results) add(v float64, key ...string) {
	k := strings.Join(key, "|")
	s := r[k]
	if s == nil {
		s = &samples{}
		r[k] = s
	}
	*s = append(*s, v)
}

func (r results) get(key ...string) samples {
	if s := r[strings.Join(key, "|")]; s != nil {
		return *s
	}
	return nil
}

// repValues holds one value per repetition, path and key, for ratios
// taken within a repetition (the two runs as close in time as the
// alternation allows).
type repValues map[string]float64

func repKey(rep int, path string, key []string) string {
	return fmt.Sprint(rep, "|", path, "|", strings.Join(key, "|"))
}

func (m repValues) set(v float64, rep int, path string, key ...string) { m[repKey(rep, path, key)] = v }

// ratio is path's value over base's in repetition rep; false if either
// is missing or base is not positive.
func (m repValues) ratio(rep int, path, base string, key ...string) (float64, bool) {
	v, ok1 := m[repKey(rep, path, key)]
	d, ok2 := m[repKey(rep, base, key)]
	if !ok1 || !ok2 || d <= 0 {
		return 0, false
	}
	return v / d, true
}

// plainKey is the results key of the TLS/plain ratio of key.
func plainKey(key []string) []string {
	k := append([]string(nil), key...)
	k[len(k)-1] += "/plain"
	return k
}

// addPlainRatios adds to res, for every TLS path among names and every
// repetition, the ratio of its value to that of the same path without
// TLS, for each key, under plainKey(key).
func addPlainRatios(res results, vals repValues, names []string, reps int, keys ...[]string) {
	for rep := 0; rep < reps; rep++ {
		for _, name := range names {
			kind, withTLS := splitPath(name)
			if !withTLS {
				continue
			}
			for _, k := range keys {
				if r, ok := vals.ratio(rep, name, kind, k...); ok {
					res.add(r, append([]string{name}, plainKey(k)...)...)
				}
			}
		}
	}
}

// table builds a markdown table.
type table struct {
	head []string
	rows [][]string
}

func (t *table) row(cells ...string) { t.rows = append(t.rows, cells) }

func (t *table) String() string {
	var b strings.Builder
	b.WriteString("| " + strings.Join(t.head, " | ") + " |\n|")
	for range t.head {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, r := range t.rows {
		b.WriteString("| " + strings.Join(r, " | ") + " |\n")
	}
	return b.String()
}

// sizeName prints a byte count as KiB or MiB.
func sizeName(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	default:
		return fmt.Sprintf("%d B", n)
	}
}

// parseSize reads "256K", "4M", "262144", "1MiB".
func parseSize(s string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "IB"), "B")
	mult := int64(1)
	switch {
	case strings.HasSuffix(t, "K"):
		mult, t = 1<<10, strings.TrimSuffix(t, "K")
	case strings.HasSuffix(t, "M"):
		mult, t = 1<<20, strings.TrimSuffix(t, "M")
	case strings.HasSuffix(t, "G"):
		mult, t = 1<<30, strings.TrimSuffix(t, "G")
	}
	var v int64
	if _, err := fmt.Sscanf(t, "%d", &v); err != nil || v <= 0 {
		return 0, fmt.Errorf("bad size %q (want e.g. 256K, 4M)", s)
	}
	return v * mult, nil
}
