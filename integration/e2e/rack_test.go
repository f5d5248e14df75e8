package e2e

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
)

const rackScene = `
nodes:
- {name: rack-a-1, memory: 16Gi, labels: {rack: a}}
- {name: rack-a-2, memory: 16Gi, labels: {rack: a}}
- {name: rack-a-3, memory: 16Gi, labels: {rack: a}}
- {name: spare-1, memory: 16Gi, labels: {rack: b}}
- {name: cp-1, memory: 16Gi, labels: {rack: b}}
kubevirtPods: {virtAPI: [cp-1, cp-1], virtController: [cp-1, cp-1]}
vms:
- {name: vm-1-1, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: rack-a-1}
- {name: vm-1-2, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: rack-a-1}
- {name: vm-2-1, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: rack-a-2}
- {name: vm-2-2, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: rack-a-2}
- {name: vm-3-1, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: rack-a-3}
- {name: vm-3-2, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: rack-a-3}
`

// TestRackMaintenance: two nodes of a rack at once share the cluster's
// migration limit; with return-home their VMs come back when the
// maintenances end; three at once would leave no room, so one of them is
// rejected, not started.
func TestRackMaintenance(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{Scenario: rackScene})
	ctx := ctxT(t, 6*time.Minute)
	// cp-1 keeps KubeVirt's pods and no VM.
	cordon(t, e, "cp-1", true)
	setMigrationConfig(t, e, func(m *kvv1.MigrationConfiguration) {
		m.ParallelMigrationsPerCluster = ptr.To(uint32(2))
		m.ParallelOutboundMigrationsPerNode = ptr.To(uint32(2))
	})
	s := startSampler(t, e, nil)
	startAll := func(id string, nodes ...string) map[string]int {
		var wg sync.WaitGroup
		var mu sync.Mutex
		codes := map[string]int{}
		for _, n := range nodes {
			wg.Add(1)
			go func() {
				defer wg.Done()
				code, out := e.Drover(ctx, "maintenance", "start", n, "--reason", "rack a firmware", "--request-id", id, "--return-home", "--wait")
				t.Logf("maintenance of %s:\n%s", n, out)
				mu.Lock()
				codes[n] = code
				mu.Unlock()
			}()
		}
		wg.Wait()
		return codes
	}
	codes := startAll("rack-a-fw", "rack-a-1", "rack-a-2")
	require.Equal(t, map[string]int{"rack-a-1": 0, "rack-a-2": 0}, codes)
	require.Empty(t, e.VMIsOn(ctx, "rack-a-1"))
	require.Empty(t, e.VMIsOn(ctx, "rack-a-2"))
	s.Stop()
	require.LessOrEqual(t, s.maxAll, 2, "the two maintenances share the cluster's limit of 2")

	for _, n := range []string{"rack-a-1", "rack-a-2"} {
		code, out := e.Drover(ctx, "maintenance", "end", n, "--wait")
		t.Logf("end of %s:\n%s", n, out)
		require.Equal(t, 0, code, out)
	}
	for _, name := range []string{"vm-1-1", "vm-1-2", "vm-2-1", "vm-2-2"} {
		home := "rack-a-" + strings.Split(name, "-")[1]
		v := e.VMI(ctx, "default", name)
		require.Equal(t, home, v.Status.NodeName, "%s came home", name)
		require.Equal(t, kvv1.Running, v.Status.Phase)
	}

	codes = startAll("rack-a-psu", "rack-a-1", "rack-a-2", "rack-a-3")
	rejected := 0
	for n, code := range codes {
		if code != 0 {
			rejected++
			rec, _ := e.Op(ctx, consumers.MaintenanceOperationKey(n, "rack-a-psu"))
			require.Contains(t, rec.Message, "not enough room", n)
			require.False(t, e.Node(ctx, n).Spec.Unschedulable, "the rejected %s was not cordoned", n)
			require.NotEmpty(t, e.VMIsOn(ctx, n))
		}
	}
	require.Equal(t, 1, rejected, "exactly one of three requests is refused: %v", codes)
	require.Empty(t, e.Sim.Violations(), fmt.Sprint(e.Sim.Violations()))
}
