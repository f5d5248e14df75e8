package e2e

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
)

// metricsScene: node-1 runs four live-migratable VMs; node-2 and node-3 have room.
const metricsScene = `
nodes:
- {name: node-1, cpu: "32", memory: 64Gi}
- {name: node-2, cpu: "32", memory: 64Gi}
- {name: node-3, cpu: "32", memory: 64Gi}
kubevirtPods: {virtAPI: [node-2, node-3], virtController: [node-2, node-3]}
vms:
- {name: m-1, memory: 4Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: m-2, memory: 4Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: m-3, memory: 4Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: m-4, memory: 4Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
`

// TestMetricsMoveWithMaintenance: /metrics follows a maintenance as it
// runs: migrations in flight rise above 0 while the VMs move and fall back
// to 0, the evacuation makespan is observed once, and the operation is
// counted finished and its message acknowledged.
func TestMetricsMoveWithMaintenance(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{Scenario: metricsScene})
	ctx := ctxT(t, 5*time.Minute)
	const (
		inFlight  = `drover_migrations_in_flight{platform="kubevirt"}`
		makespanN = `drover_maintenance_makespan_seconds_count{outcome="completed"}`
		makespanS = `drover_maintenance_makespan_seconds_sum{outcome="completed"}`
		finished  = `drover_operations_finished_total{state="succeeded",workflow="maintenance"}`
		acked     = `drover_messages_total{result="acked",workflow="maintenance"}`
	)
	for _, m := range []string{inFlight, makespanN, finished} {
		v, err := e.Metric(ctx, m)
		require.NoError(t, err)
		require.Zero(t, v, "%s before the maintenance", m)
	}

	// Scrape while the maintenance runs and keep the most migrations in flight seen.
	sctx, stop := context.WithCancel(ctx)
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		maxSeen float64
		scrapes int
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for sctx.Err() == nil {
			if v, err := e.Metric(sctx, inFlight); err == nil {
				mu.Lock()
				maxSeen, scrapes = max(maxSeen, v), scrapes+1
				mu.Unlock()
			}
			select {
			case <-sctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	code, out := e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "metrics", "--request-id", "met-1", "--wait")
	stop()
	wg.Wait()
	t.Logf("drover maintenance start --wait:\n%s", out)
	require.Equal(t, 0, code, out)
	rec, _ := e.Op(ctx, consumers.MaintenanceOperationKey("node-1", "met-1"))
	require.Equal(t, consumers.StateSucceeded, rec.State)
	require.Empty(t, e.VMIsOn(ctx, "node-1"))

	mu.Lock()
	t.Logf("most migrations in flight seen: %v (%d scrapes)", maxSeen, scrapes)
	require.GreaterOrEqual(t, maxSeen, 1.0, "drover_migrations_in_flight never rose while four VMs migrated")
	require.LessOrEqual(t, maxSeen, 4.0)
	mu.Unlock()
	eventually(t, e, 30*time.Second, "no migration in flight once the node is empty", func() (bool, string) {
		v, err := e.Metric(ctx, inFlight)
		return err == nil && v == 0, fmt.Sprint("in flight ", v)
	})

	n, err := e.Metric(ctx, makespanN)
	require.NoError(t, err)
	require.Equal(t, 1.0, n, "one evacuation observed")
	sum, err := e.Metric(ctx, makespanS)
	require.NoError(t, err)
	require.Greater(t, sum, 0.0)
	require.Less(t, sum, 5*60.0, "the makespan is the evacuation's, in seconds")
	// The success is counted when its record says so, just after --wait returns.
	eventually(t, e, 30*time.Second, "the operation counted finished", func() (bool, string) {
		v, err := e.Metric(ctx, finished)
		return err == nil && v == 1, fmt.Sprint("finished ", v)
	})
	a, err := e.Metric(ctx, acked)
	require.NoError(t, err)
	require.GreaterOrEqual(t, a, 1.0)
}
