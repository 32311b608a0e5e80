# vpcreach developer targets. `make test` is what CI runs (.ci/run).
GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -X github.com/vpcreach/vpcreach/internal/cli.Version=$(VERSION)
FUZZTIME  ?= 10s
# packages with fuzz targets: protocol decoders, the PROXY header, configs, the front end
FUZZPKGS  ?= ./tunnel ./internal/proxyproto ./internal/server ./internal/agent ./internal/socks
BENCHFLAGS ?=
# package: output directory, target architecture (GOARCH), reproducible file times
DIST      ?= dist
PKG_GOARCH ?= $(shell $(GO) env GOARCH)
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null)
PKG_BUILD := $(DIST)/build/linux_$(PKG_GOARCH)

.PHONY: all build demo test bench fuzz package clean

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

## fuzz: run each Fuzz target in FUZZPKGS for FUZZTIME (default 10s; CI: 3s)
fuzz:
	@set -e; \
	for pkg in $(FUZZPKGS); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
			echo "==> $$pkg $$f for $(FUZZTIME)"; \
			$(GO) test -run='^$$' -fuzz="^$$f$$" -fuzztime=$(FUZZTIME) $$pkg; \
		done; \
	done

## package: .deb packages vpcreach-agent and vpcreach-proxyserver into $(DIST)/
## (static binaries stamped with VERSION; tools/mkdeb turns VERSION into a
## Debian version; PKG_GOARCH=arm64 make package cross-builds)
package:
	rm -rf $(PKG_BUILD)
	rm -f $(DIST)/vpcreach-agent_*_*.deb $(DIST)/vpcreach-proxyserver_*_*.deb
	CGO_ENABLED=0 GOOS=linux GOARCH=$(PKG_GOARCH) $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(PKG_BUILD)/ ./cmd/...
	GOOS= GOARCH= SOURCE_DATE_EPOCH="$(SOURCE_DATE_EPOCH)" $(GO) run ./tools/mkdeb \
		-version "$(VERSION)" -arch $(PKG_GOARCH) -bin $(PKG_BUILD) -out $(DIST)

clean:
	rm -rf bin/ dist/
