package statuspage

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"
)

func TestRecentKeepsWarningsAndPassesEverythingOn(t *testing.T) {
	var out bytes.Buffer
	rec := NewRecent(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelInfo}), 3)
	log := slog.New(rec)
	log.Debug("dropped by both")
	log.Info("passed on, not kept")
	log.With("agent", "a1").WithGroup("g").Warn("kept", "target", "10.1.0.5:6379", slog.Group("sub", "n", 2))
	log.Error("failed", "err", errors.New("boom"))

	got := rec.Records()
	if len(got) != 2 || rec.Total() != 2 || rec.Cap() != 3 {
		t.Fatalf("records %+v total %d cap %d", got, rec.Total(), rec.Cap())
	}
	if got[0].Message != "failed" || got[0].Level != "ERROR" || got[0].Attrs[0] != (Attr{"err", "boom"}) {
		t.Errorf("newest: %+v", got[0])
	}
	want := []Attr{{"agent", "a1"}, {"g.target", "10.1.0.5:6379"}, {"g.sub.n", "2"}}
	if got[1].Message != "kept" || got[1].Level != "WARN" || !slices.Equal(got[1].Attrs, want) {
		t.Errorf("older: %+v, want attrs %+v", got[1], want)
	}
	if got[1].Time.IsZero() {
		t.Error("no time")
	}
	text := out.String()
	for _, s := range []string{"passed on, not kept", "g.target=10.1.0.5:6379", "agent=a1", "failed"} {
		if !strings.Contains(text, s) {
			t.Errorf("wrapped handler output lacks %q:\n%s", s, text)
		}
	}
	if strings.Contains(text, "dropped by both") {
		t.Errorf("debug record passed on:\n%s", text)
	}
}

func TestRecentKeepsWarningsTheWrappedHandlerDrops(t *testing.T) {
	var out bytes.Buffer
	rec := NewRecent(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelError}), 0)
	slog.New(rec).Warn("quiet")
	if rec.Cap() != DefaultRecent || len(rec.Records()) != 1 || out.Len() != 0 {
		t.Fatalf("cap %d records %+v output %q", rec.Cap(), rec.Records(), out.String())
	}
	if !rec.Enabled(context.Background(), slog.LevelWarn) || rec.Enabled(context.Background(), slog.LevelInfo) {
		t.Error("Enabled: want warn yes, info no")
	}
	// nil next: keep only.
	only := NewRecent(nil, 1)
	slog.New(only).Error("x")
	if len(only.Records()) != 1 {
		t.Error("nil next: not kept")
	}
}

func TestRecentRingOrderAndBounds(t *testing.T) {
	rec := NewRecent(nil, 4)
	log := slog.New(rec)
	for i := range 10 {
		log.Warn("m" + strconv.Itoa(i))
	}
	var msgs []string
	for _, r := range rec.Records() {
		msgs = append(msgs, r.Message)
	}
	if got := strings.Join(msgs, ","); got != "m9,m8,m7,m6" || rec.Total() != 10 {
		t.Fatalf("records %s total %d", got, rec.Total())
	}

	args := []any{}
	for i := range 100 {
		args = append(args, "k"+strconv.Itoa(i), strings.Repeat("v", 2000))
	}
	log.Warn(strings.Repeat("é", 2000), args...)
	r := rec.Records()[0]
	if len(r.Attrs) != maxAttrs || len(r.Message) > maxMsg || len(r.Attrs[0].Value) > maxValue {
		t.Fatalf("not bounded: %d attrs, message %d bytes, value %d bytes", len(r.Attrs), len(r.Message), len(r.Attrs[0].Value))
	}
	if !strings.HasSuffix(r.Message, "…") || !utf8.ValidString(r.Message) {
		t.Errorf("clipped message %q", r.Message[len(r.Message)-10:])
	}
}

func TestRecentOf(t *testing.T) {
	rec := NewRecent(slog.DiscardHandler, 2)
	if RecentOf(slog.New(rec)) != rec || RecentOf(slog.New(slog.DiscardHandler)) != nil || RecentOf(nil) != nil {
		t.Fatal("RecentOf")
	}
	// A derived logger shares the records.
	derived := RecentOf(slog.New(rec).With("component", "proxyserver"))
	if derived == nil {
		t.Fatal("RecentOf(With) = nil")
	}
	slog.New(rec).With("component", "proxyserver").Warn("w")
	if len(derived.Records()) != 1 || len(rec.Records()) != 1 {
		t.Fatal("derived handler does not share records")
	}
}

func TestRecentConcurrent(t *testing.T) {
	rec := NewRecent(slog.DiscardHandler, 8)
	log := slog.New(rec)
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			l := log.With("g", g)
			for i := range 200 {
				l.Warn("w", "i", i)
				_ = rec.Records()
			}
		})
	}
	wg.Wait()
	if rec.Total() != 1600 || len(rec.Records()) != 8 {
		t.Fatalf("total %d kept %d", rec.Total(), len(rec.Records()))
	}
}
