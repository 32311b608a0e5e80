# vpcreach developer targets. `make test` is what CI runs (.ci/run).
GO        ?= go
VERSION   ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X github.com/vpcreach/vpcreach/internal/cli.Version=$(VERSION)
FUZZTIME  ?= 10s
BENCHFLAGS ?=

.PHONY: all build demo test bench fuzz clean

all: build

## build: agent, proxyserver and socks5d into ./bin, stamped with VERSION
build:
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/ ./cmd/...

## demo: run the local loopback demo end to end (scripts/demo.sh)
demo:
	VERSION="$(VERSION)" bash scripts/demo.sh

## test: vet, then every test with the race detector
test:
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 15m ./...

## bench: the vpcbench load tool; pass its flags in BENCHFLAGS
bench:
	$(GO) run ./tools/vpcbench $(BENCHFLAGS)

## fuzz: run each Fuzz target in ./tunnel for FUZZTIME (default 10s)
fuzz:
	@set -e; \
	list=$$($(GO) test -list '^Fuzz' ./tunnel); \
	targets=$$(printf '%s\n' "$$list" | grep '^Fuzz' || true); \
	if [ -z "$$targets" ]; then echo "no Fuzz targets in ./tunnel"; exit 0; fi; \
	for f in $$targets; do \
		echo "==> $$f for $(FUZZTIME)"; \
		$(GO) test -run='^$$' -fuzz="^$$f$$" -fuzztime=$(FUZZTIME) ./tunnel; \
	done

clean:
	rm -rf bin/
