package demo

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"

	"github.com/drover-io/drover/cmd/drover/app"
	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/integration/amtest"
)

// recoveryLeaseTimeout is drover's --node-lease-timeout in the real world
// (scaled like the rest).
const recoveryLeaseTimeout = 40 * time.Second

// recoveryOf waits until the recovery of node satisfies cond and returns it.
func (r *run) recoveryOf(ctx context.Context, node string, limit time.Duration, cond func(consumers.Record) bool) (consumers.Record, error) {
	deadline := time.Now().Add(limit)
	for {
		kv, err := r.js.KeyValue(ctx, consumers.BucketOps)
		if err == nil {
			recs, err := consumers.NewOpStore(kv).List(ctx, consumers.RecoveryOperationFilter(node))
			if err == nil {
				for _, rec := range recs {
					if cond(rec) {
						return rec, nil
					}
				}
			}
		}
		if time.Now().After(deadline) {
			return consumers.Record{}, fmt.Errorf("recovery of %s: condition not reached within %s", node, limit)
		}
		select {
		case <-ctx.Done():
			return consumers.Record{}, ctx.Err()
		case <-time.After(25 * time.Millisecond):
		}
	}
}

func atGate(r consumers.Record) bool { return r.State == consumers.StateWaiting && r.Phase == "gate" }
func recovered(r consumers.Record) bool {
	return r.State == consumers.StateSucceeded && r.Phase == "recovered"
}

// nodeFailure: a node loses power; the node watcher sees it; the recovery
// waits at its fencing gate until a fencing agent reports; the VMs run
// elsewhere; the node comes back and drover takes its taints off.
func (r *run) nodeFailure(ctx context.Context, node string) error {
	r.scene(fmt.Sprintf("6. A node dies: %s loses power; the node watcher sees it, the fencing gate holds, a fencing agent opens it", node))
	on, err := r.vmisOn(ctx, node)
	if err != nil {
		return err
	}
	r.say("   VMs on %s: %s", node, strings.Join(on, ", "))
	start := time.Now()
	if err := r.s.SetFault(ctx, node, "down"); err != nil {
		return err
	}
	if _, err := r.recoveryOf(ctx, node, 2*time.Minute, atGate); err != nil {
		return err
	}
	r.timed(fmt.Sprintf("%s powered off -> Lease stale -> node.notready -> recovery waiting at the fencing gate (lease timeout %s, scaled)", node, r.scaled(recoveryLeaseTimeout)), time.Since(start))
	r.drover(ctx, "recovery", "status")
	r.say("   The gate holds (--fencing taint): KubeVirt cannot tell a dead node from a cut-off one, so drover")
	r.say("   deletes nothing until the node is proven dead. A fencing agent powers it off over IPMI and says so:")
	gate := time.Now()
	r.drover(ctx, "node", "fenced", node, "--method", "ipmi-power-off", "--by", "fence-agent")
	rec, err := r.recoveryOf(ctx, node, 2*time.Minute, recovered)
	if err != nil {
		return err
	}
	r.timed("node.fenced -> out-of-service taint, clean-up, every restartable VM Running elsewhere", time.Since(gate))
	r.timed(fmt.Sprintf("%s powered off -> every restartable VM Running elsewhere", node), time.Since(start))
	r.say("   %s", rec.Message)
	r.sum.Recoveries = append(r.sum.Recoveries, rec.Message)
	if err := r.printVMs(ctx); err != nil {
		return err
	}
	start = time.Now()
	if err := r.s.SetFault(ctx, node, ""); err != nil {
		return err
	}
	if err := r.waitNode(ctx, func(n *corev1.Node) bool {
		return !recovery.DroverTainted(n) && ready(n)
	}, node); err != nil {
		return err
	}
	r.timed(fmt.Sprintf("%s powered on -> Ready, node.ready -> drover's taints removed", node), time.Since(start))
	return nil
}

func ready(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// alertmanager: drover restarted without its node watcher and with an
// Alertmanager receiver; the real Alertmanager notifies it of a
// KubeNodeNotReady alert, which starts the recovery; a person fences the
// node with kubectl.
func (r *run) alertmanager(ctx context.Context, log zerolog.Logger, cleanups *[]func(), node string) error {
	r.scene(fmt.Sprintf("7. Alertmanager: a KubeNodeNotReady alert for %s starts its recovery", node))
	if _, err := amtest.Binary(); err != nil {
		return err
	}
	dir := filepath.Join(r.o.LogDir, "alertmanager")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	token := filepath.Join(dir, "token")
	if err := os.WriteFile(token, []byte("demo-token\n"), 0o600); err != nil {
		return err
	}
	r.say("   drover restarts with --nodewatch=false --alertmanager-token-file %s (Alertmanager is the only producer now;", token)
	r.say("   its state is in JetStream, so nothing is lost):")
	if r.stopDrover != nil {
		r.stopDrover()
	}
	stop, err := r.serveWith(ctx, log, cleanups, func(o *app.Options) {
		o.NodeWatch = false
		o.AlertmanagerTokenFile = token
	})
	if err != nil {
		return err
	}
	r.stopDrover = stop
	cfg := fmt.Sprintf(`route:
  receiver: drover
  group_by: [alertname, node]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1m
receivers:
- name: drover
  webhook_configs:
  - url: http://%s/alertmanager
    send_resolved: true
    http_config:
      authorization:
        type: Bearer
        credentials_file: %s
`, r.httpAddr, token)
	am, err := amtest.Start(ctx, dir, cfg)
	if err != nil {
		return err
	}
	*cleanups = append(*cleanups, am.Stop)
	r.say("   Alertmanager %s with a webhook receiver:", am.URL)
	for _, l := range strings.Split(strings.TrimSpace(cfg), "\n") {
		r.say("     | %s", l)
	}
	start := time.Now()
	if err := r.s.SetFault(ctx, node, "down"); err != nil {
		return err
	}
	if err := r.waitNode(ctx, func(n *corev1.Node) bool { return !ready(n) }, node); err != nil {
		return err
	}
	r.timed(fmt.Sprintf("%s powered off -> Ready=Unknown (Prometheus's KubeNodeNotReady would fire 15 minutes later)", node), time.Since(start))
	r.say("   Prometheus fires KubeNodeNotReady for %s (the demo posts it to Alertmanager's API):", node)
	alert := time.Now()
	if err := am.PostAlert(ctx, map[string]string{"alertname": "KubeNodeNotReady", "node": node, "severity": "warning"}); err != nil {
		return err
	}
	if _, err := r.recoveryOf(ctx, node, time.Minute, atGate); err != nil {
		return err
	}
	r.timed("alert -> Alertmanager's webhook -> node.notready -> recovery waiting at the fencing gate", time.Since(alert))
	r.say("   An operator makes sure %s is off, then says so with kubectl:", node)
	r.say("   $ kubectl taint node %s %s=nodeshutdown:NoExecute", node, recovery.TaintOutOfService)
	out, err := exec.CommandContext(ctx, r.o.Kubectl, "--kubeconfig", r.c.Kubeconfig, "taint", "node", node, recovery.TaintOutOfService+"=nodeshutdown:NoExecute").CombinedOutput()
	r.say("     %s", strings.TrimSpace(string(out)))
	if err != nil {
		return fmt.Errorf("kubectl taint: %w", err)
	}
	rec, err := r.recoveryOf(ctx, node, time.Minute, recovered)
	if err != nil {
		return err
	}
	r.timed(fmt.Sprintf("alert -> every restartable VM of %s Running elsewhere", node), time.Since(alert))
	r.say("   %s", rec.Message)
	r.sum.Recoveries = append(r.sum.Recoveries, rec.Message)
	r.say("   Alertmanager repeats its notification; JetStream drops the same event id, nothing runs twice:")
	r.drover(ctx, "recovery", "status")
	return nil
}
