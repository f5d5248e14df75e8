package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/maintenance"
)

func cordon(t *testing.T, e *Env, node string, on bool) {
	t.Helper()
	_, err := e.Kube.CoreV1().Nodes().Patch(context.Background(), node, types.MergePatchType,
		[]byte(fmt.Sprintf(`{"spec":{"unschedulable":%t}}`, on)), metav1.PatchOptions{})
	require.NoError(t, err)
}

func migrationCount(t *testing.T, e *Env) int {
	t.Helper()
	l, err := e.KubeVirt.VirtualMachineInstanceMigrations("").List(context.Background(), metav1.ListOptions{})
	require.NoError(t, err)
	return len(l.Items)
}

// setMigrationConfig edits the KubeVirt CR's migration configuration.
func setMigrationConfig(t *testing.T, e *Env, edit func(*kvv1.MigrationConfiguration)) {
	t.Helper()
	ctx := context.Background()
	eventually(t, e, 20*time.Second, "update the KubeVirt CR", func() (bool, string) {
		l, err := e.KubeVirt.KubeVirts("").List(ctx, metav1.ListOptions{})
		if err != nil || len(l.Items) == 0 {
			return false, fmt.Sprint(err)
		}
		cr := &l.Items[0]
		if cr.Spec.Configuration.MigrationConfiguration == nil {
			cr.Spec.Configuration.MigrationConfiguration = &kvv1.MigrationConfiguration{}
		}
		edit(cr.Spec.Configuration.MigrationConfiguration)
		_, err = e.KubeVirt.KubeVirts(cr.Namespace).Update(ctx, cr, metav1.UpdateOptions{})
		return err == nil, fmt.Sprint(err)
	})
}

const blockedScene = `
nodes:
- {name: node-1}
- {name: node-2}
kubevirtPods: {virtAPI: [node-2, node-2], virtController: [node-2, node-2]}
vms:
- {name: web, memory: 2Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: legacy, memory: 2Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteOnce}, node: node-1}
- {name: legacy-m, memory: 1Gi, runStrategy: Manual, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteOnce}, node: node-1}
`

// TestMaintenanceBlockedVMs: a VM that cannot move (RWO disk, LiveMigrate)
// makes the request rejected with its name and reason and nothing changes;
// a dry run prints the plan and changes nothing; --force restarts the
// Always VM elsewhere and shuts the Manual one down, reported. The node was
// cordoned by a person first: it stays cordoned after the end.
func TestMaintenanceBlockedVMs(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{Scenario: blockedScene})
	ctx := ctxT(t, 5*time.Minute)
	cordon(t, e, "node-1", true)
	legacyUID := e.VMI(ctx, "default", "legacy").UID

	code, out := e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "disk swap", "--dry-run")
	t.Logf("dry run:\n%s", out)
	require.Equal(t, 0, code, "a dry run completes: the plan is its result")
	for _, want := range []string{"plan for node-1", "default/web", "Migrate", "default/legacy", "Blocked", "not live-migratable", "rejected:"} {
		require.Contains(t, out, want)
	}
	require.Zero(t, migrationCount(t, e), "a dry run creates nothing")
	for _, tt := range e.Node(ctx, "node-1").Spec.Taints {
		require.NotEqual(t, maintenance.TaintKey, tt.Key, "a dry run does not taint")
	}

	code, out = e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "disk swap", "--request-id", "r1", "--wait")
	t.Logf("rejected:\n%s", out)
	require.Equal(t, 1, code, "a rejected request exits 1")
	require.Contains(t, out, "rejected")
	require.Contains(t, out, "default/legacy")
	require.Contains(t, out, "default/legacy-m")
	require.Contains(t, out, "ReadWriteMany")
	require.Zero(t, migrationCount(t, e), "a rejected request moves nothing")
	for _, tt := range e.Node(ctx, "node-1").Spec.Taints {
		require.NotEqual(t, maintenance.TaintKey, tt.Key, "a rejected request does not taint")
	}
	require.Equal(t, legacyUID, e.VMI(ctx, "default", "legacy").UID)

	code, out = e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "disk swap", "--request-id", "r2", "--force", "--wait")
	t.Logf("forced:\n%s", out)
	require.Equal(t, 0, code, out)
	require.Contains(t, out, "default/legacy-m Stopped")
	legacy := e.VMI(ctx, "default", "legacy")
	require.NotNil(t, legacy)
	require.NotEqual(t, legacyUID, legacy.UID, "legacy was restarted by its run strategy")
	require.Equal(t, "node-2", legacy.Status.NodeName)
	require.Equal(t, kvv1.Running, legacy.Status.Phase)
	require.Nil(t, e.VMI(ctx, "default", "legacy-m"), "the Manual VM is shut down")
	require.Equal(t, "node-2", e.VMI(ctx, "default", "web").Status.NodeName)

	code, out = e.Drover(ctx, "maintenance", "end", "node-1", "--request-id", "r2", "--wait")
	require.Equal(t, 0, code, out)
	n := e.Node(ctx, "node-1")
	require.True(t, n.Spec.Unschedulable, "a node a person cordoned stays cordoned")
	for _, tt := range n.Spec.Taints {
		require.NotEqual(t, maintenance.TaintKey, tt.Key, "drover's taint is gone")
	}
	require.Empty(t, e.Sim.Violations())
}

// TestMaintenanceInsufficientCapacity: VMs that fit nowhere else make the
// request rejected, naming them; the node is not cordoned.
func TestMaintenanceInsufficientCapacity(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{Scenario: `
nodes:
- {name: node-1, memory: 64Gi}
- {name: node-2, memory: 16Gi}
kubevirtPods: {virtAPI: [node-2, node-2], virtController: [node-2, node-2]}
vms:
- {name: big-1, memory: 12Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: big-2, memory: 12Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: small, memory: 1Gi, runStrategy: Always, evictionStrategy: LiveMigrate, disk: {accessMode: ReadWriteMany}, node: node-1}
`})
	ctx := ctxT(t, 3*time.Minute)
	code, out := e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "psu", "--request-id", "r1", "--wait")
	t.Logf("%s", out)
	require.Equal(t, 1, code)
	require.Contains(t, out, "not enough room")
	require.Contains(t, out, "default/big-")
	require.Contains(t, out, "Insufficient memory", "the reason is the scheduler's")
	require.False(t, e.Node(ctx, "node-1").Spec.Unschedulable, "a rejected request does not cordon")
	require.Zero(t, migrationCount(t, e))
	rec, _ := e.Op(ctx, consumers.MaintenanceOperationKey("node-1", "r1"))
	require.Equal(t, consumers.StateFailed, rec.State)
}

// TestMaintenanceCancelledMidEvacuation: ending a maintenance while it
// migrates deletes the pending migrations, leaves no VM half-moved and
// uncordons the node drover cordoned.
func TestMaintenanceCancelledMidEvacuation(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{Scenario: `
nodes:
- {name: node-1}
- {name: node-2}
kubevirtPods: {virtAPI: [node-2, node-2], virtController: [node-2, node-2]}
vms:
- {name: vm-1, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-2, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-3, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-4, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-5, memory: 4Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
`})
	ctx := ctxT(t, 5*time.Minute)
	// One at a time, each 4Gi guest about 64 s at 64Mi/s (6.4 s at time x10).
	setMigrationConfig(t, e, func(m *kvv1.MigrationConfiguration) {
		m.ParallelOutboundMigrationsPerNode = ptr.To(uint32(1))
		m.BandwidthPerMigration = ptr.To(resource.MustParse("64Mi"))
	})
	uids := map[string]types.UID{}
	for i := 1; i <= 5; i++ {
		name := fmt.Sprintf("vm-%d", i)
		uids[name] = e.VMI(ctx, "default", name).UID
	}
	code, out := e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "ram", "--request-id", "r1")
	require.Equal(t, 0, code, out)
	waitMidEvacuation(t, e, "node-1", "vm-1", "vm-2", "vm-3", "vm-4", "vm-5")
	code, out = e.Drover(ctx, "maintenance", "end", "node-1", "--wait")
	t.Logf("end:\n%s", out)
	require.Equal(t, 0, code, out)
	rec := waitOp(t, e, consumers.MaintenanceOperationKey("node-1", "r1"), 30*time.Second, consumers.StateCancelled)
	require.Contains(t, rec.Message, "cancelled")

	n := e.Node(ctx, "node-1")
	require.False(t, n.Spec.Unschedulable, "drover cordoned node-1: the end uncordons it")
	for _, tt := range n.Spec.Taints {
		require.NotEqual(t, maintenance.TaintKey, tt.Key)
	}
	migs, err := e.KubeVirt.VirtualMachineInstanceMigrations("").List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	for _, m := range migs.Items {
		require.True(t, m.Status.Phase == kvv1.MigrationSucceeded || m.Status.Phase == kvv1.MigrationFailed,
			"migration %s left %s", m.Name, m.Status.Phase)
	}
	stayed := 0
	for name, uid := range uids {
		v := e.VMI(ctx, "default", name)
		require.Equal(t, uid, v.UID, "%s was not restarted", name)
		require.Equal(t, kvv1.Running, v.Status.Phase, name)
		if st := v.Status.MigrationState; st != nil {
			require.True(t, st.Completed, "%s is not half-moved", name)
		}
		if v.Status.NodeName == "node-1" {
			stayed++
		}
	}
	require.GreaterOrEqual(t, stayed, 2, "the VMs not yet started stayed")
	require.Empty(t, e.Sim.Violations())
}

// TestMaintenanceWaitsForDisruptionBudget: an ordinary pod protected by an
// exhausted PodDisruptionBudget is not evicted (the operation waits); once
// the budget allows it, the eviction proceeds and the maintenance completes.
func TestMaintenanceWaitsForDisruptionBudget(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{Scenario: `
nodes:
- {name: node-1, labels: {role: web}}
- {name: node-2, labels: {role: web}}
kubevirtPods: {virtAPI: [node-2, node-2], virtController: [node-2, node-2]}
vms:
- {name: vm-1, memory: 1Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
`})
	ctx := ctxT(t, 5*time.Minute)
	cordon(t, e, "node-2", true)
	labels := map[string]string{"app": "web"}
	rs := &appsv1.ReplicaSet{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec: appsv1.ReplicaSetSpec{
			Replicas: ptr.To(int32(2)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: corev1.PodSpec{
				NodeSelector: map[string]string{"role": "web"},
				Containers: []corev1.Container{{Name: "nginx", Image: "nginx", Resources: corev1.ResourceRequirements{
					Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("64Mi")}}}},
			}},
		},
	}
	_, err := e.Kube.AppsV1().ReplicaSets("default").Create(ctx, rs, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = e.Kube.PolicyV1().PodDisruptionBudgets("default").Create(ctx, &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "default"},
		Spec:       policyv1.PodDisruptionBudgetSpec{MinAvailable: ptr.To(intstr.FromInt32(2)), Selector: &metav1.LabelSelector{MatchLabels: labels}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	webOn := func(node string) int {
		pods, err := e.Kube.CoreV1().Pods("default").List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		require.NoError(t, err)
		n := 0
		for _, p := range pods.Items {
			if p.Spec.NodeName == node && p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
				n++
			}
		}
		return n
	}
	eventually(t, e, time.Minute, "two web pods running on node-1", func() (bool, string) { return webOn("node-1") == 2, fmt.Sprint(webOn("node-1")) })
	cordon(t, e, "node-2", false)

	code, out := e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "nic", "--request-id", "r1")
	require.Equal(t, 0, code, out)
	key := consumers.MaintenanceOperationKey("node-1", "r1")
	rec := waitOp(t, e, key, 2*time.Minute, consumers.StateWaiting)
	require.Contains(t, rec.WaitReason, "disruption budget")
	require.Equal(t, 2, webOn("node-1"), "no pod evicted while the budget is exhausted")
	require.Equal(t, "node-2", e.VMI(ctx, "default", "vm-1").Status.NodeName, "the VM moved first")

	pdb, err := e.Kube.PolicyV1().PodDisruptionBudgets("default").Get(ctx, "web", metav1.GetOptions{})
	require.NoError(t, err)
	pdb.Spec.MinAvailable = ptr.To(intstr.FromInt32(1))
	_, err = e.Kube.PolicyV1().PodDisruptionBudgets("default").Update(ctx, pdb, metav1.UpdateOptions{})
	require.NoError(t, err)
	rec = waitOp(t, e, key, 3*time.Minute, consumers.StateSucceeded)
	require.Zero(t, webOn("node-1"))
	require.True(t, strings.HasPrefix(rec.Message, "completed"), rec.Message)
	require.Empty(t, e.Sim.Violations())
}
