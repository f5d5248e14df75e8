// Package alertmanager pins the real Alertmanager the integration tests run
// (v0.28.1: later versions do not build from their module, their UI assets
// are not in it). It is a module of its own so that Alertmanager's
// dependencies never meet drover's or Kubernetes'; build.sh builds
// github.com/prometheus/alertmanager/cmd/alertmanager from it.
package alertmanager
