package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
)

// TestVMMigrateAndCancel: one VM migrated to the nodes a selector names
// (--wait exits 0), a migration cancelled before hand-off (its target cannot
// be scheduled) and one cancelled after hand-off: the abort wins and the VM
// stays, and `vm cancel --wait` says so.
func TestVMMigrateAndCancel(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{Scenario: `
nodes:
- {name: node-1}
- {name: node-2}
- {name: node-3, labels: {zone: b}}
kubevirtPods: {virtAPI: [node-2, node-2], virtController: [node-2, node-2]}
vms:
- {name: vm-a, memory: 2Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-b, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-c, memory: 1Gi, disk: {accessMode: ReadWriteOnce}, node: node-1}
`})
	ctx := ctxT(t, 5*time.Minute)

	uid := e.VMI(ctx, "default", "vm-a").UID
	code, out := e.Drover(ctx, "vm", "migrate", "default/vm-a", "--node-selector", "zone=b", "--wait")
	t.Logf("migrate:\n%s", out)
	require.Equal(t, 0, code, out)
	v := e.VMI(ctx, "default", "vm-a")
	require.Equal(t, "node-3", v.Status.NodeName)
	require.Equal(t, uid, v.UID)

	code, out = e.Drover(ctx, "vm", "migrate", "default/vm-c", "--wait")
	t.Logf("not migratable:\n%s", out)
	require.Equal(t, 1, code)
	require.Contains(t, out, "not live-migratable")

	t.Run("cancel before hand-off", func(t *testing.T) {
		done := make(chan string, 1)
		go func() {
			code, out := e.Drover(ctx, "vm", "migrate", "default/vm-b", "--node-selector", "zone=nowhere", "--request-id", "m1", "--wait")
			done <- fmt.Sprintf("exit %d\n%s", code, out)
		}()
		eventually(t, e, time.Minute, "a migration of vm-b waiting for its target", func() (bool, string) {
			l, err := e.KubeVirt.VirtualMachineInstanceMigrations("default").List(ctx, metav1.ListOptions{})
			if err != nil {
				return false, err.Error()
			}
			for _, m := range l.Items {
				if m.Spec.VMIName == "vm-b" && m.Status.Phase == kvv1.MigrationScheduling {
					return true, ""
				}
			}
			return false, fmt.Sprint(len(l.Items))
		})
		code, out := e.Drover(ctx, "vm", "cancel", "default/vm-b", "--wait")
		t.Logf("cancel:\n%s", out)
		require.Equal(t, 0, code, out)
		require.Contains(t, out, "the abort won")
		migrate := <-done
		t.Logf("migrate:\n%s", migrate)
		require.Contains(t, migrate, "exit 1", "a cancelled migration exits 1")
		require.Equal(t, "node-1", e.VMI(ctx, "default", "vm-b").Status.NodeName)
		rec, _ := e.Op(ctx, consumers.MigrationOperationKey("default", "vm-b", "m1"))
		require.Equal(t, consumers.StateCancelled, rec.State)
		noOpenMigrations(t, e)
	})

	t.Run("cancel after hand-off", func(t *testing.T) {
		// A 4Gi guest at 64Mi/s transfers for 64 s (6.4 s at time x10).
		setMigrationConfig(t, e, func(m *kvv1.MigrationConfiguration) {
			m.BandwidthPerMigration = ptr.To(resource.MustParse("64Mi"))
		})
		uid := e.VMI(ctx, "default", "vm-b").UID
		done := make(chan int, 1)
		go func() {
			code, _ := e.Drover(ctx, "vm", "migrate", "default/vm-b", "--request-id", "m2", "--wait")
			done <- code
		}()
		eventually(t, e, time.Minute, "vm-b's migration handed off (Running)", func() (bool, string) {
			l, err := e.KubeVirt.VirtualMachineInstanceMigrations("default").List(ctx, metav1.ListOptions{})
			if err != nil {
				return false, err.Error()
			}
			for _, m := range l.Items {
				if m.Spec.VMIName == "vm-b" && m.Status.Phase == kvv1.MigrationRunning {
					return true, ""
				}
			}
			return false, ""
		})
		code, out := e.Drover(ctx, "vm", "cancel", "default/vm-b", "--wait")
		t.Logf("cancel:\n%s", out)
		require.Equal(t, 0, code, out)
		require.Contains(t, out, "the abort won")
		require.Equal(t, 1, <-done)
		v := e.VMI(ctx, "default", "vm-b")
		require.Equal(t, "node-1", v.Status.NodeName)
		require.Equal(t, uid, v.UID)
		require.Equal(t, kvv1.MigrationAbortSucceeded, v.Status.MigrationState.AbortStatus)
		noOpenMigrations(t, e)
	})
	require.Empty(t, e.Sim.Violations())
}

func noOpenMigrations(t *testing.T, e *Env) {
	t.Helper()
	l, err := e.KubeVirt.VirtualMachineInstanceMigrations("").List(context.Background(), metav1.ListOptions{})
	require.NoError(t, err)
	for _, m := range l.Items {
		require.True(t, m.Status.Phase == kvv1.MigrationSucceeded || m.Status.Phase == kvv1.MigrationFailed, "%s is %s", m.Name, m.Status.Phase)
	}
}
