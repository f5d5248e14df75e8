package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/maintenance"
)

// mixedScene: node-1 runs 8 VMs of every kind; node-2 and node-3 have room
// and run KubeVirt's own pods.
const mixedScene = `
nodes:
- {name: node-1, cpu: "32", memory: 64Gi}
- {name: node-2, cpu: "32", memory: 64Gi}
- {name: node-3, cpu: "32", memory: 64Gi}
kubevirtPods: {virtAPI: [node-2, node-3], virtController: [node-2, node-3]}
vms:
- {name: web-1, memory: 2Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: web-2, memory: 4Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: db-1, memory: 8Gi, runStrategy: RerunOnFailure, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: ext-1, memory: 1Gi, runStrategy: Always, evictionStrategy: External, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: app-1, memory: 2Gi, runStrategy: RerunOnFailure, evictionStrategy: LiveMigrateIfPossible, disk: {accessMode: ReadWriteOnce}, node: node-1}
- {name: batch-1, memory: 1Gi, runStrategy: Always, evictionStrategy: None, node: node-1}
- {name: batch-2, memory: 1Gi, runStrategy: Manual, evictionStrategy: None, node: node-1}
- {name: tools-1, memory: 1Gi, runStrategy: Always, evictionStrategy: LiveMigrate, labels: {drover.io/maintenance-strategy: ShutdownAndRestartAfter}, node: node-1}
`

// TestMaintenanceEndToEnd: a maintenance requested with the CLI (--wait)
// empties a node of 8 mixed VMs within the migration limits, each VM as its
// strategies say; the request is acknowledged only once every VM is where it
// must be; ending it gives the node back and starts the VM kept down.
func TestMaintenanceEndToEnd(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{Scenario: mixedScene})
	ctx := ctxT(t, 5*time.Minute)
	uids := map[string]string{}
	for _, name := range []string{"web-1", "web-2", "db-1", "ext-1", "app-1", "batch-1", "batch-2", "tools-1"} {
		uids[name] = string(e.VMI(ctx, "default", name).UID)
	}
	reqSubject := "drover.req.maintenance-requested.>"
	s := startSampler(t, e, func(ctx context.Context) string {
		// Acknowledged after, not before: while a VM that must keep running
		// is still on node-1, the request is still in the stream.
		on := 0
		for _, name := range []string{"web-1", "web-2", "db-1", "ext-1", "app-1", "batch-1"} {
			if v := e.VMI(ctx, "default", name); v == nil || v.Status.NodeName == "node-1" || v.Status.Phase != kvv1.Running {
				on++
			}
		}
		if published, _ := e.Op(ctx, consumers.MaintenanceOperationKey("node-1", "chg-1")); on > 0 && published.Key != "" && requestsInStream(ctx, e, reqSubject) == 0 {
			return fmt.Sprintf("request acknowledged while %d VMs were not yet running elsewhere", on)
		}
		return ""
	})

	code, out := e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "BIOS update", "--request-id", "chg-1", "--wait")
	t.Logf("drover maintenance start --wait:\n%s", out)
	require.Equal(t, 0, code, out)
	s.Stop()
	require.Contains(t, out, "default/web-2 Migrated")
	require.Contains(t, out, "default/batch-1 Restarted")
	require.Contains(t, out, "succeeded: completed:")
	require.Empty(t, s.broken)

	// The node is cordoned and tainted; nothing of ours runs there.
	n := e.Node(ctx, "node-1")
	require.True(t, n.Spec.Unschedulable)
	require.Contains(t, n.Spec.Taints, corev1.Taint{Key: maintenance.TaintKey, Value: "chg-1", Effect: corev1.TaintEffectNoSchedule})
	require.Empty(t, e.VMIsOn(ctx, "node-1"))
	for _, name := range []string{"web-1", "web-2", "db-1", "ext-1"} {
		v := e.VMI(ctx, "default", name)
		require.Equal(t, kvv1.Running, v.Status.Phase, name)
		require.NotEqual(t, "node-1", v.Status.NodeName, name)
		require.Equal(t, uids[name], string(v.UID), "%s was live-migrated, not restarted", name)
	}
	for _, name := range []string{"app-1", "batch-1"} {
		v := e.VMI(ctx, "default", name)
		require.Equal(t, kvv1.Running, v.Status.Phase, name)
		require.NotEqual(t, "node-1", v.Status.NodeName, name)
		require.NotEqual(t, uids[name], string(v.UID), "%s was restarted by its run strategy", name)
	}
	for _, name := range []string{"batch-2", "tools-1"} {
		require.Nil(t, e.VMI(ctx, "default", name), "%s is shut down", name)
		vm, err := e.KubeVirt.VirtualMachines("default").Get(ctx, name, metav1GetOptions)
		require.NoError(t, err, "the VM %s still exists: drover never deletes a VM", name)
		require.Nil(t, vm.DeletionTimestamp)
	}
	rec, _ := e.Op(ctx, consumers.MaintenanceOperationKey("node-1", "chg-1"))
	require.Equal(t, consumers.StateSucceeded, rec.State)
	require.Contains(t, rec.Message, "makespan")
	require.Contains(t, rec.Message, "lower bound")

	// Limits (defaults 5 per cluster, 2 per node) held; one migration object
	// per migrated VM; none refused by admission.
	s.mu.Lock()
	require.LessOrEqual(t, s.maxAll, 5)
	require.LessOrEqual(t, s.maxOut["node-1"], 2)
	for _, name := range []string{"web-1", "web-2", "db-1", "ext-1"} {
		require.Len(t, s.created["default/"+name], 1, "migration objects of %s: %v", name, s.created["default/"+name])
	}
	require.Len(t, s.created, 4, "only the VMs to migrate got migration objects: %v", s.created)
	s.mu.Unlock()
	refused, err := e.Metric(ctx, "drover_migrations_refused_total")
	require.NoError(t, err)
	require.Zero(t, refused)
	created, err := e.Metric(ctx, "drover_migrations_created_total")
	require.NoError(t, err)
	require.Equal(t, 4.0, created)

	// Ending it gives the node back and starts the VM kept down until then.
	code, out = e.Drover(ctx, "maintenance", "end", "node-1", "--wait")
	t.Logf("drover maintenance end --wait:\n%s", out)
	require.Equal(t, 0, code, out)
	n = e.Node(ctx, "node-1")
	require.False(t, n.Spec.Unschedulable)
	for _, taint := range n.Spec.Taints {
		require.NotEqual(t, maintenance.TaintKey, taint.Key)
	}
	eventually(t, e, time.Minute, "tools-1 running again", func() (bool, string) {
		v := e.VMI(ctx, "default", "tools-1")
		return v != nil && v.Status.Phase == kvv1.Running, fmt.Sprint(v != nil)
	})
	require.Nil(t, e.VMI(ctx, "default", "batch-2"), "a Shutdown VM stays down")
	require.Empty(t, e.Sim.Violations())
	events, err := e.Kube.CoreV1().Events("").List(ctx, metav1ListOptions)
	require.NoError(t, err)
	reasons := map[string]bool{}
	for _, ev := range events.Items {
		if ev.Source.Component == "drover" {
			reasons[ev.InvolvedObject.Kind+"/"+ev.Reason] = true
		}
	}
	for _, r := range []string{"Node/MaintenanceStarted", "Node/MaintenanceCompleted", "Node/Uncordoned", "VirtualMachine/Migrated", "VirtualMachine/Restarted"} {
		require.True(t, reasons[r], "event %s recorded (have %v)", r, reasons)
	}
}
