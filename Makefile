# drover — see README.md. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
GO ?= go
CACHE := $(CURDIR)/.cache
BIN := $(CURDIR)/bin
TOOLS := $(CACHE)/tools
export DROVER_TEST_BIN ?= $(CACHE)/bin
# nats-server built from the module go.mod pins, for tests that run it as a separate process.
NATS_SERVER := $(CACHE)/bin/nats-server
export DROVER_NATS_SERVER ?= $(NATS_SERVER)
# The workflow tests write which of deploy/base's permissions drover used, and which none did, here.
export DROVER_RBAC_REPORT ?= $(CACHE)/rbac-report
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/drover-io/drover/cmd/drover/app.Version=$(VERSION)
STATICCHECK_VERSION := v0.6.1
# Packages that need no control plane: run with the race detector.
UNIT_PKGS := ./schemas/... ./natsauth/... ./consumers/... ./producers/... ./handlers/... ./cmd/... ./integration/natstest/... ./deploy/...
GOTESTFLAGS ?=

.DEFAULT_GOAL := help

## help: list the targets
help:
	@grep -hE '^## ' $(MAKEFILE_LIST) | sed 's/^## /  /'

## build: build the drover binary into bin/ (static: CGO off, as in the image)
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/drover ./cmd/drover

## image: build the OCI image without a Docker daemon into bin/drover-image.tar (docker/podman load, crane push)
image:
	CGO_ENABLED=0 GOOS=linux GOARCH=amd64 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/drover-linux-amd64 ./cmd/drover
	$(GO) run ./cmd/drover-image --binary $(BIN)/drover-linux-amd64 --tag drover:$(VERSION) --version $(VERSION) --out $(BIN)/drover-image.tar

## test: every test: unit tests with -race, then the integration tests against a real kube-apiserver, etcd and nats-server
test: test-unit test-integration

## test-unit: tests that need no control plane (race detector on); deploy/monitoring's run promtool on the alert rules
test-unit: nats-server promtool
	$(GO) test -race -count=1 $(GOTESTFLAGS) $(UNIT_PKGS)

# The end-to-end tests (integration/e2e, integration/recovery) run drover beside the simulator, several
# clusters at once: they run after the other packages, one package at a time, so that they do not starve
# the simulator's timing-sensitive tests or each other.
## test-integration: the control plane, the simulator and the end-to-end tests (builds kube-apiserver and etcd first when missing)
test-integration: controlplane alertmanager nats-server
	$(GO) test -count=1 -timeout 40m $(GOTESTFLAGS) $$($(GO) list ./integration/... | grep -v -e '/integration/e2e$$' -e '/integration/recovery$$')
	$(GO) test -p 1 -count=1 -timeout 40m $(GOTESTFLAGS) ./integration/e2e/ ./integration/recovery/

## deploy-check: render deploy/base and each overlay with kubectl kustomize, load their drover.yaml, kubectl apply --dry-run=server them against a test API server, check the base RBAC (part of make test)
deploy-check: controlplane
	$(GO) test -count=1 $(GOTESTFLAGS) ./integration/deploy/

## nats-server: build nats-server from the version go.mod pins into .cache/bin (tests run it as a separate process)
nats-server: $(NATS_SERVER)

$(NATS_SERVER): go.mod go.sum
	$(GO) build -trimpath -o $@ github.com/nats-io/nats-server/v2

## chromium: install Debian's chromium for the web page test when it is missing (needs root and apt)
chromium:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the web page test" >&2; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

## dashboard: regenerate the Grafana dashboard (deploy/monitoring/dashboard.json and its ConfigMap) from deploy/monitoring/dashboard.go
dashboard:
	$(GO) run ./deploy/monitoring/gen -dir deploy/monitoring

## bench: benchmarks that print figures (runtime vs raw JetStream, event encoding); asserts nothing about time
bench:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 2000x ./consumers/
	$(GO) test -run '^$$' -bench . -benchmem ./schemas/

## bench-sim: seed the 100-node, 1,000-VM scenario at time scale 10; print the seeding time and the simulator's steady CPU (cores); asserts nothing
bench-sim: controlplane
	$(GO) test -run '^$$' -bench BenchmarkScale100x1000 -benchtime 1x -timeout 30m ./integration/sim/

## bench-recovery: a node with 10, then 50 VMs dies, in watchdog mode and with a fencing agent: phases and drover's overhead (asserts nothing about time; real-world timings, DROVER_BENCH_TIME_SCALE=10 runs the simulated world faster)
bench-recovery: controlplane
	$(GO) test -run '^$$' -bench BenchmarkRecovery -benchtime 1x -timeout 60m ./integration/recovery/

## bench-evacuation: drover's evacuation of the busy node (20 mixed VMs) next to the plan's estimate and lower bound and plain kubectl drain, under KubeVirt's and Deckhouse's limits; asserts nothing
bench-evacuation: controlplane
	$(GO) run ./integration/cmd/bench-evacuation

## demo: the main job on the embedded default: a local cluster, the simulator and drover, narrated: maintenance from a chat command and from Git, the evacuation benchmark line, a node failure recovered behind its fencing gate and an Alertmanager alert (a few minutes once built)
demo: controlplane alertmanager
	$(GO) run ./integration/cmd/drover-demo

## lint: go vet and staticcheck
lint: $(TOOLS)/staticcheck
	$(GO) vet ./...
	$(TOOLS)/staticcheck ./...

$(TOOLS)/staticcheck:
	GOBIN=$(TOOLS) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

## docs: regenerate docs/configuration.md from the options of drover serve (cmd/drover/app/options.go)
docs:
	$(GO) run ./cmd/drover docs config --out docs/configuration.md

## verify: formatting, go.mod tidiness, lint, the generated docs and dashboard; fails when a generated or tidied file would change
verify: lint docs
	git diff --exit-code -- docs/configuration.md || { echo "docs/configuration.md is out of date: run make docs and commit it"; exit 1; }
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) mod tidy && (cd integration/tools && $(GO) mod tidy) && (cd integration/tools/alertmanager && $(GO) mod tidy) && (cd integration/tools/promtool && $(GO) mod tidy)
	git diff --exit-code -- go.mod go.sum integration/tools/go.mod integration/tools/go.sum integration/tools/alertmanager/go.mod integration/tools/alertmanager/go.sum integration/tools/promtool/go.mod integration/tools/promtool/go.sum
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && $(GO) run ./deploy/monitoring/gen -dir "$$tmp" && \
		diff -u deploy/monitoring/dashboard.json "$$tmp/dashboard.json" && diff -u deploy/monitoring/dashboard-configmap.yaml "$$tmp/dashboard-configmap.yaml" || \
		{ echo "deploy/monitoring's dashboard differs from a fresh generation: run make dashboard"; exit 1; }

## clean: remove build outputs (keeps the control-plane cache)
clean:
	rm -rf $(BIN)

.PHONY: help build image docs test test-unit test-integration deploy-check nats-server chromium dashboard bench bench-sim bench-recovery bench-evacuation demo lint verify clean

-include integration/integration.mk
