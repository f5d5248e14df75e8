package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// TestNodeFailsDuringMaintenance: node-1 loses power in the middle of its
// maintenance. The node's recovery pre-empts the maintenance; once a fencing
// agent reports the node off, the recovery brings the VMs that were still on
// it back on the other nodes, and the maintenance resumes after it; once the
// node is back, ending the maintenance gives the node back and leaves nothing
// half-done, and no VM ever ran twice.
func TestNodeFailsDuringMaintenance(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{Scenario: `
nodes:
- {name: node-1}
- {name: node-2}
- {name: node-3}
kubevirtPods: {virtAPI: [node-3, node-3], virtController: [node-3, node-3]}
vms:
- {name: vm-1, memory: 2Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-2, memory: 2Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-3, memory: 2Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-4, memory: 2Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
`})
	ctx := ctxT(t, 5*time.Minute)
	setMigrationConfig(t, e, func(m *kvv1.MigrationConfiguration) {
		m.ParallelOutboundMigrationsPerNode = ptr.To(uint32(1))
		m.BandwidthPerMigration = ptr.To(resource.MustParse("64Mi"))
	})
	key := consumers.MaintenanceOperationKey("node-1", "r1")
	code, out := e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "psu", "--request-id", "r1")
	require.Equal(t, 0, code, out)
	waitMidEvacuation(t, e, "node-1", "vm-1", "vm-2", "vm-3", "vm-4")

	require.NoError(t, e.Sim.SetFault(ctx, "node-1", "down"))
	var since time.Time
	eventually(t, e, 2*time.Minute, "node-1 not Ready", func() (bool, string) {
		for _, c := range e.Node(ctx, "node-1").Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status != corev1.ConditionTrue {
				since = c.LastTransitionTime.Time
				return true, ""
			}
		}
		return false, "Ready"
	})
	// What the node watcher publishes (Alertmanager's or a person's event of
	// the same spell is the same operation).
	ev, err := schemas.New("drover/test", schemas.DeterministicID("node-1", since.String()),
		&schemas.NodeNotReady{Node: "node-1", Since: since.UTC(), Reason: "NodeStatusUnknown"})
	require.NoError(t, err)
	_, err = (&producers.Publisher{JS: e.JS}).Publish(ctx, ev)
	require.NoError(t, err)
	recoveries := func() ([]consumers.Record, error) {
		kv, err := e.JS.KeyValue(ctx, consumers.BucketOps)
		if err != nil {
			return nil, err
		}
		return consumers.NewOpStore(kv).List(ctx, consumers.RecoveryOperationFilter("node-1"))
	}
	eventually(t, e, time.Minute, "the recovery of node-1 waits at its fencing gate", func() (bool, string) {
		recs, err := recoveries()
		if err != nil || len(recs) == 0 {
			return false, fmt.Sprint(err)
		}
		return recs[0].State == consumers.StateWaiting, string(recs[0].State)
	})
	// The fencing agent powered the node off and says so.
	code, out = e.Drover(ctx, "node", "fenced", "node-1", "--method", "ipmi-power-off")
	require.Equal(t, 0, code, out)
	eventually(t, e, 2*time.Minute, "the recovery of node-1 brought its VMs back elsewhere", func() (bool, string) {
		kv, err := e.JS.KeyValue(ctx, consumers.BucketOps)
		if err != nil {
			return false, err.Error()
		}
		recs, err := consumers.NewOpStore(kv).List(ctx, consumers.RecoveryOperationFilter("node-1"))
		if err != nil || len(recs) == 0 {
			return false, fmt.Sprint(err)
		}
		return recs[0].State == consumers.StateSucceeded, string(recs[0].State)
	})
	for i := 2; i <= 4; i++ {
		v := e.VMI(ctx, "default", fmt.Sprintf("vm-%d", i))
		require.NotNil(t, v)
		require.NotEqual(t, "node-1", v.Status.NodeName, "vm-%d restarted on another node", i)
	}
	eventually(t, e, time.Minute, "the maintenance resumed after the recovery pre-empted it", func() (bool, string) {
		rec, _ := e.Op(ctx, key)
		return rec.Attempts >= 2 && (rec.State == consumers.StateRunning || rec.State == consumers.StateSucceeded),
			fmt.Sprintf("%s attempt %d", rec.State, rec.Attempts)
	})

	require.NoError(t, e.Sim.SetFault(ctx, "node-1", ""))
	code, out = e.Drover(ctx, "maintenance", "end", "node-1", "--wait")
	t.Logf("end:\n%s", out)
	require.Equal(t, 0, code, out)
	rec, _ := e.Op(ctx, key)
	require.True(t, rec.State.Terminal(), "the maintenance ended: %s", rec.State)
	require.False(t, e.Node(ctx, "node-1").Spec.Unschedulable)
	migs, err := e.KubeVirt.VirtualMachineInstanceMigrations("").List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	for _, m := range migs.Items {
		require.True(t, m.Status.Phase == kvv1.MigrationSucceeded || m.Status.Phase == kvv1.MigrationFailed, "%s is %s", m.Name, m.Status.Phase)
	}
	eventually(t, e, 2*time.Minute, "every VM running again (run strategy Always)", func() (bool, string) {
		for i := 1; i <= 4; i++ {
			v := e.VMI(ctx, "default", fmt.Sprintf("vm-%d", i))
			if v == nil || v.Status.Phase != kvv1.Running {
				return false, fmt.Sprintf("vm-%d", i)
			}
		}
		return true, ""
	})
	require.Empty(t, e.Sim.Violations())
}
