// Package promtool pins Prometheus's promtool, which `make test` uses to
// check and unit-test the alert rules in deploy/monitoring. It is a module of
// its own so that Prometheus's dependencies stay out of drover's go.mod; the
// root Makefile's promtool target builds it into .cache/bin
// (integration/tools/build.sh promtool).
package promtool
