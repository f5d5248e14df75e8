# Included by the root Makefile. DROVER_TEST_BIN (exported there) is where the control-plane
# binaries live; integration/cluster finds them through it.

## controlplane: build kube-apiserver and etcd for the integration tests into DROVER_TEST_BIN (default .cache/bin); skipped when up to date
controlplane:
	integration/tools/build.sh $(DROVER_TEST_BIN)

## alertmanager: build the real Alertmanager (v0.28.1, pinned in integration/tools/alertmanager) into DROVER_TEST_BIN; skipped when up to date
alertmanager:
	integration/tools/build.sh $(DROVER_TEST_BIN) alertmanager

## promtool: build Prometheus's promtool (v0.316.0 = Prometheus 3.x, pinned in integration/tools/promtool) into DROVER_TEST_BIN for the alert-rule tests; skipped when up to date
promtool:
	integration/tools/build.sh $(DROVER_TEST_BIN) promtool

.PHONY: controlplane alertmanager promtool
