package main

import (
	"fmt"
	"os"
	"strings"
)

// report prints each part of the markdown report to stdout as soon as it
// is ready, and keeps the -out file up to date with everything so far
// (an interrupted run keeps its finished sections).
type report struct {
	path string
	b    strings.Builder
}

func newReport(path string) *report { return &report{path: path} }

func (r *report) add(md string) {
	if !strings.HasSuffix(md, "\n") {
		md += "\n"
	}
	fmt.Print(md + "\n")
	r.b.WriteString(md + "\n")
	if r.path != "" {
		_ = os.WriteFile(r.path, []byte(r.b.String()), 0o644)
	}
}

func (r *report) flush() error {
	if r.path == "" {
		return nil
	}
	if err := os.WriteFile(r.path, []byte(r.b.String()), 0o644); err != nil {
		return fmt.Errorf("-out: %w", err)
	}
	logf("report written to %s", r.path)
	return nil
}
