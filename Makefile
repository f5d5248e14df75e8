# drover — see README.md. `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
CACHE := $(CURDIR)/.cache
BIN := $(CURDIR)/bin
export DROVER_TEST_BIN ?= $(CACHE)/bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/drover-io/drover/cmd/drover/app.Version=$(VERSION)

.DEFAULT_GOAL := help

## help: list the targets
help:
	@grep -hE '^## ' $(MAKEFILE_LIST) | sed 's/^## /  /'

## build: build the drover binary into bin/
build:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/drover ./cmd/drover

-include integration/integration.mk
