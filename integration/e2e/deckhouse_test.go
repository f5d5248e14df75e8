package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/integration/sim"
)

// TestDeckhouseMaintenance: on Deckhouse virtualization the same
// evacuation goes through VirtualMachineOperations of type Evict, within
// Deckhouse's one outbound migration per node.
func TestDeckhouseMaintenance(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{Scenario: `
nodes:
- {name: node-1}
- {name: node-2}
- {name: node-3}
kubevirtPods: {virtAPI: [node-2, node-3], virtController: [node-2, node-3]}
vms:
- {name: d-1, platform: deckhouse, memory: 2Gi, runPolicy: AlwaysOnUnlessStoppedManually, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: d-2, platform: deckhouse, memory: 4Gi, runPolicy: AlwaysOn, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: d-3, platform: deckhouse, memory: 1Gi, runPolicy: Manual, disk: {accessMode: ReadWriteMany}, node: node-1}
`})
	ctx := ctxT(t, 5*time.Minute)
	uids := map[string]string{}
	for _, n := range []string{"d-1", "d-2", "d-3"} {
		uids[n] = string(e.VMI(ctx, "default", n).UID)
	}
	s := startSampler(t, e, nil)
	code, out := e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "kernel", "--request-id", "dh-1", "--wait")
	t.Logf("%s", out)
	require.Equal(t, 0, code, out)
	s.Stop()
	require.LessOrEqual(t, s.maxOut["node-1"], 1, "Deckhouse allows one outbound migration per node")
	require.Empty(t, s.created, "drover created no VirtualMachineInstanceMigration itself: %v", s.created)
	ops, err := e.Sim.Dynamic.Resource(sim.DeckhouseVMOPGVR).Namespace("default").List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	evicts := 0
	for _, op := range ops.Items {
		typ, _, _ := unstructured.NestedString(op.Object, "spec", "type")
		phase, _, _ := unstructured.NestedString(op.Object, "status", "phase")
		if strings.HasPrefix(op.GetName(), "drover-") {
			require.Equal(t, "Evict", typ, op.GetName())
			require.Equal(t, "Completed", phase, op.GetName())
			evicts++
		}
	}
	require.Equal(t, 3, evicts, "one Evict operation per VM")
	for n, uid := range uids {
		v := e.VMI(ctx, "default", n)
		require.NotEqual(t, "node-1", v.Status.NodeName)
		require.Equal(t, kvv1.Running, v.Status.Phase)
		require.Equal(t, uid, string(v.UID), "%s was live-migrated", n)
	}
	code, out = e.Drover(ctx, "maintenance", "end", "node-1", "--wait")
	require.Equal(t, 0, code, out)
	require.False(t, e.Node(ctx, "node-1").Spec.Unschedulable)
	require.Empty(t, e.Sim.Violations())
}
