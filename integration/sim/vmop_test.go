package sim

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/utils/ptr"
	virtv1 "kubevirt.io/api/core/v1"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"
)

const opNS = "ops"

// dvm creates a Deckhouse VM (with a shared disk unless o.Disk names one) and waits until it runs (VM phase Running, its VMI Running on a
// launcher pod); it returns the VMI.
func (e *evEnv) dvm(t *testing.T, name string, o VMOptions) *virtv1.VirtualMachineInstance {
	t.Helper()
	ctx := context.Background()
	require.NoError(t, e.sim.ensureNamespace(ctx, opNS))
	if o.Disk == "" {
		// A Deckhouse VM needs a block device; a shared (RWX) disk keeps it live-migratable.
		o.Disk = name + "-disk"
		_, err := e.kv.kube.CoreV1().PersistentVolumeClaims(opNS).Create(ctx, NewPVC(opNS, o.Disk, "10Gi", corev1.ReadWriteMany), metav1.CreateOptions{})
		require.NoError(t, err)
	}
	_, err := e.sim.Dynamic.Resource(DeckhouseVMGVR).Namespace(opNS).Create(ctx, NewDeckhouseVM(opNS, name, o), metav1.CreateOptions{})
	require.NoError(t, err)
	vmi := e.waitRunning(t, opNS, name, "", 60*time.Second)
	e.waitDVMPhase(t, name, "Running", 30*time.Second)
	return vmi
}

func (e *evEnv) waitDVMPhase(t *testing.T, name, phase string, timeout time.Duration) {
	t.Helper()
	evEventually(t, timeout, fmt.Sprintf("deckhouse VM %s phase %s", name, phase), func() (bool, string) {
		u, err := e.kv.dyn.Resource(DeckhouseVMGVR).Namespace(opNS).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		cur, _, _ := unstructured.NestedString(u.Object, "status", "phase")
		return cur == phase, cur
	})
}

// vmop creates a VirtualMachineOperation.
func (e *evEnv) vmop(t *testing.T, name, typ, vm string, nodeSelector map[string]string) {
	t.Helper()
	spec := map[string]any{"type": typ, "virtualMachineName": vm}
	if nodeSelector != nil {
		sel := map[string]any{}
		for k, v := range nodeSelector {
			sel[k] = v
		}
		spec["migrate"] = map[string]any{"nodeSelector": sel}
	}
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": vmopGVR.GroupVersion().String(), "kind": "VirtualMachineOperation",
		"metadata": map[string]any{"name": name, "namespace": opNS},
		"spec":     spec,
	}}
	_, err := e.kv.dyn.Resource(vmopGVR).Namespace(opNS).Create(context.Background(), u, metav1.CreateOptions{})
	require.NoError(t, err)
}

// opState is what a test reads of a vmop.
type opState struct {
	exists     bool
	phase      string
	progress   *int32
	completed  *metav1.Condition
	finalizers []string
}

func (o opState) String() string {
	if !o.exists {
		return "gone"
	}
	s := fmt.Sprintf("phase=%s progress=%v", o.phase, ptr.Deref(o.progress, -1))
	if o.completed != nil {
		s += fmt.Sprintf(" Completed=%s/%s %q", o.completed.Status, o.completed.Reason, o.completed.Message)
	}
	return s
}

func (e *evEnv) op(t *testing.T, name string) opState {
	t.Helper()
	u, err := e.kv.dyn.Resource(vmopGVR).Namespace(opNS).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		if !apierrors.IsNotFound(err) {
			t.Logf("get vmop %s: %v", name, err)
		}
		return opState{}
	}
	var st vmopStatus
	if err := fromUnstructuredField(u, "status", &st); err != nil {
		t.Logf("decode vmop %s status: %v", name, err)
		return opState{}
	}
	return opState{
		exists: true, phase: st.Phase, progress: st.Progress, finalizers: u.GetFinalizers(),
		completed: meta.FindStatusCondition(st.Conditions, VMOPConditionCompleted),
	}
}

// waitOp polls vmop name until cond holds.
func (e *evEnv) waitOp(t *testing.T, name string, timeout time.Duration, what string, cond func(opState) bool) opState {
	t.Helper()
	var last opState
	evEventually(t, timeout, fmt.Sprintf("vmop %s: %s", name, what), func() (bool, string) {
		last = e.op(t, name)
		return cond(last), last.String()
	})
	return last
}

func (e *evEnv) migration(t *testing.T, name string) *virtv1.VirtualMachineInstanceMigration {
	t.Helper()
	m := &virtv1.VirtualMachineInstanceMigration{}
	err := e.kv.c.Get(context.Background(), ctrlclient.ObjectKey{Namespace: opNS, Name: name}, m)
	if err != nil {
		return nil
	}
	return m
}

// TestVMOPEvict: an Evict operation live-migrates the VM away and completes; operations that
// cannot run fail with Deckhouse's reasons; deleting a finished operation leaves the VM alone.
func TestVMOPEvict(t *testing.T) {
	e := evStartSim(t)
	e.nodes(t, []string{"node-1", "node-2", "node-3"})
	before := e.dvm(t, "web", VMOptions{Memory: "1Gi"})

	e.vmop(t, "evict-web", VMOPTypeEvict, "web", nil)
	done := e.waitOp(t, "evict-web", 60*time.Second, "Completed", func(o opState) bool { return o.phase == VMOPPhaseCompleted })
	require.Equal(t, int32(100), ptr.Deref(done.progress, -1))
	require.NotNil(t, done.completed)
	require.Equal(t, metav1.ConditionTrue, done.completed.Status)
	require.Equal(t, VMOPReasonMigrationCompleted, done.completed.Reason)
	require.Contains(t, done.finalizers, vmopFinalizerCleanup)

	mig := e.migration(t, "vmop-evict-web")
	require.NotNil(t, mig, "the operation's migration")
	require.Equal(t, virtv1.MigrationSucceeded, mig.Status.Phase)
	require.Equal(t, "web", mig.Spec.VMIName)
	ref := metav1.GetControllerOf(mig)
	require.NotNil(t, ref)
	require.Equal(t, "VirtualMachineOperation", ref.Kind)
	require.Equal(t, "evict-web", ref.Name)

	after := e.waitRunning(t, opNS, "web", "", 10*time.Second)
	require.Equal(t, before.UID, after.UID, "live-migrated, not restarted")
	require.NotEqual(t, before.Status.NodeName, after.Status.NodeName)
	require.Equal(t, []string{after.Status.NodeName}, e.guestNodes(opNS, "web"))
	e.waitDVMPhase(t, "web", "Running", 10*time.Second)

	// Deleting a finished operation releases it and leaves the VM where it is.
	require.NoError(t, e.kv.dyn.Resource(vmopGVR).Namespace(opNS).Delete(context.Background(), "evict-web", metav1.DeleteOptions{}))
	e.waitOp(t, "evict-web", 20*time.Second, "deleted", func(o opState) bool { return !o.exists })
	require.Equal(t, after.Status.NodeName, e.waitRunning(t, opNS, "web", "", 5*time.Second).Status.NodeName)

	// A VM that does not exist, and one that cannot live-migrate (RWO disk).
	e.vmop(t, "evict-ghost", VMOPTypeEvict, "ghost", nil)
	ghost := e.waitOp(t, "evict-ghost", 20*time.Second, "Failed", func(o opState) bool { return o.phase == VMOPPhaseFailed })
	require.Equal(t, VMOPReasonVirtualMachineNotFound, ghost.completed.Reason)

	_, err := e.kv.kube.CoreV1().PersistentVolumeClaims(opNS).Create(context.Background(), NewPVC(opNS, "db-disk", "10Gi", corev1.ReadWriteOnce), metav1.CreateOptions{})
	require.NoError(t, err)
	db := e.dvm(t, "db", VMOptions{Memory: "1Gi", Disk: "db-disk"})
	require.False(t, db.IsMigratable())
	e.vmop(t, "evict-db", VMOPTypeEvict, "db", nil)
	stuck := e.waitOp(t, "evict-db", 20*time.Second, "Failed", func(o opState) bool { return o.phase == VMOPPhaseFailed })
	require.Equal(t, VMOPReasonOperationFailed, stuck.completed.Reason)
	require.Contains(t, stuck.completed.Message, "not migratable")
	require.Nil(t, e.migration(t, "vmop-evict-db"))

	require.Empty(t, e.sim.Violations())
}

// TestVMOPDeleteAbortsMigration: deleting an operation while its migration runs deletes the
// migration, which aborts it; the VM keeps running on its source node.
func TestVMOPDeleteAbortsMigration(t *testing.T) {
	e := evStartSim(t)
	e.nodes(t, []string{"node-1", "node-2"})
	// 1 GiB at 16 MiB/s: a 64 s transfer (13 s of wall time), long enough to delete mid-way.
	e.setMigrationConfig(t, func(m *virtv1.MigrationConfiguration) {
		m.BandwidthPerMigration = ptr.To(resource.MustParse("16Mi"))
	})
	before := e.dvm(t, "slow", VMOptions{Memory: "1Gi"})
	source := before.Status.NodeName

	e.vmop(t, "move-slow", VMOPTypeMigrate, "slow", nil)
	running := e.waitOp(t, "move-slow", 30*time.Second, "InProgress, syncing", func(o opState) bool {
		return o.phase == VMOPPhaseInProgress && o.completed != nil && o.completed.Reason == VMOPReasonSyncing
	})
	require.GreaterOrEqual(t, ptr.Deref(running.progress, -1), int32(vmopProgressSyncFrom))
	require.Less(t, ptr.Deref(running.progress, 101), int32(vmopProgressCompleted))
	evEventually(t, 10*time.Second, "migration Running", func() (bool, string) {
		mig := e.migration(t, "vmop-move-slow")
		if mig == nil {
			return false, "no migration"
		}
		return mig.Status.Phase == virtv1.MigrationRunning, string(mig.Status.Phase)
	})
	// Progress moves while the memory is copied.
	first := ptr.Deref(e.op(t, "move-slow").progress, -1)
	e.waitOp(t, "move-slow", 10*time.Second, "progress moving", func(o opState) bool {
		return o.phase == VMOPPhaseInProgress && ptr.Deref(o.progress, -1) > first && ptr.Deref(o.progress, 101) < vmopProgressSyncTo
	})

	require.NoError(t, e.kv.dyn.Resource(vmopGVR).Namespace(opNS).Delete(context.Background(), "move-slow", metav1.DeleteOptions{}))
	e.waitOp(t, "move-slow", 30*time.Second, "deleted", func(o opState) bool { return !o.exists })
	require.Eventually(t, func() bool { return e.migration(t, "vmop-move-slow") == nil }, 10*time.Second, 50*time.Millisecond, "migration deleted")

	var vmi *virtv1.VirtualMachineInstance
	evEventually(t, 10*time.Second, "migration aborted", func() (bool, string) {
		vmi = e.vmi(t, opNS, "slow")
		if vmi == nil || vmi.Status.MigrationState == nil {
			return false, evDescribe(vmi)
		}
		ms := vmi.Status.MigrationState
		return ms.AbortStatus == virtv1.MigrationAbortSucceeded, fmt.Sprintf("%s abortRequested=%t abortStatus=%s", evDescribe(vmi), ms.AbortRequested, ms.AbortStatus)
	})
	require.Equal(t, before.UID, vmi.UID)
	require.Equal(t, source, vmi.Status.NodeName, "the VM stays on its source node")
	require.Equal(t, virtv1.Running, vmi.Status.Phase)
	require.Equal(t, []string{source}, e.guestNodes(opNS, "slow"))
	e.waitDVMPhase(t, "slow", "Running", 10*time.Second)
	require.Empty(t, e.sim.Violations())
}

// TestVMOPMigrateUnschedulable: a Migrate operation whose nodeSelector no node matches fails,
// once KubeVirt gives up on the unschedulable target, with reason TargetUnschedulable.
func TestVMOPMigrateUnschedulable(t *testing.T) {
	e := evStartSim(t, func(o *Options) { o.MigrationUnschedulableTimeout = 30 * time.Second })
	e.nodes(t, []string{"node-1", "node-2"})
	before := e.dvm(t, "pinned", VMOptions{Memory: "1Gi"})

	e.vmop(t, "move-pinned", VMOPTypeMigrate, "pinned", map[string]string{"topology.kubernetes.io/zone": "nowhere"})
	pending := e.waitOp(t, "move-pinned", 30*time.Second, "InProgress, target unschedulable", func(o opState) bool {
		return o.phase == VMOPPhaseInProgress && o.completed != nil && o.completed.Reason == VMOPReasonTargetUnschedulable
	})
	require.Contains(t, pending.completed.Message, "unschedulable")
	mig := e.migration(t, "vmop-move-pinned")
	require.NotNil(t, mig)
	require.Equal(t, map[string]string{"topology.kubernetes.io/zone": "nowhere"}, mig.Spec.AddedNodeSelector)

	failed := e.waitOp(t, "move-pinned", 60*time.Second, "Failed", func(o opState) bool { return o.phase == VMOPPhaseFailed })
	require.Equal(t, metav1.ConditionFalse, failed.completed.Status)
	require.Equal(t, VMOPReasonTargetUnschedulable, failed.completed.Reason)
	require.Contains(t, failed.completed.Message, "unschedulable")

	after := e.waitRunning(t, opNS, "pinned", before.Status.NodeName, 10*time.Second)
	require.Equal(t, before.UID, after.UID)
	require.Equal(t, []string{before.Status.NodeName}, e.guestNodes(opNS, "pinned"))
	require.Empty(t, e.sim.Violations())
}

// TestVMOPPowerOperations: Stop, Start and Restart go through the VM's run policy and complete
// when the VM reaches the phase they ask for; operations that do not apply fail with
// Deckhouse's reasons.
func TestVMOPPowerOperations(t *testing.T) {
	e := evStartSim(t)
	e.nodes(t, []string{"node-1", "node-2"})
	first := e.dvm(t, "app", VMOptions{Memory: "1Gi"})
	e.dvm(t, "always", VMOptions{Memory: "1Gi", RunPolicy: RunPolicyAlwaysOn})
	completed := func(o opState) bool { return o.phase == VMOPPhaseCompleted || o.phase == VMOPPhaseFailed }

	e.vmop(t, "stop-app", VMOPTypeStop, "app", nil)
	op := e.waitOp(t, "stop-app", 60*time.Second, "finished", completed)
	require.Equal(t, VMOPPhaseCompleted, op.phase, op.String())
	require.Equal(t, VMOPReasonOperationCompleted, op.completed.Reason)
	e.waitDVMPhase(t, "app", "Stopped", 10*time.Second)
	require.Empty(t, e.guestNodes(opNS, "app"), "no guest runs after Stop")

	// A stopped VM stays stopped: its run policy AlwaysOnUnlessStoppedManually honours the stop.
	e.vmop(t, "restart-stopped", VMOPTypeRestart, "app", nil)
	op = e.waitOp(t, "restart-stopped", 20*time.Second, "finished", completed)
	require.Equal(t, VMOPPhaseFailed, op.phase)
	require.Equal(t, VMOPReasonNotApplicableForVMPhase, op.completed.Reason)
	require.Nil(t, e.vmi(t, opNS, "app"))

	e.vmop(t, "start-app", VMOPTypeStart, "app", nil)
	op = e.waitOp(t, "start-app", 60*time.Second, "finished", completed)
	require.Equal(t, VMOPPhaseCompleted, op.phase, op.String())
	started := e.waitRunning(t, opNS, "app", "", 10*time.Second)
	require.NotEqual(t, first.UID, started.UID)

	e.vmop(t, "restart-app", VMOPTypeRestart, "app", nil)
	op = e.waitOp(t, "restart-app", 60*time.Second, "finished", completed)
	require.Equal(t, VMOPPhaseCompleted, op.phase, op.String())
	restarted := e.waitRunning(t, opNS, "app", "", 10*time.Second)
	require.NotEqual(t, started.UID, restarted.UID, "Restart runs a new VMI")
	require.Len(t, e.guestNodes(opNS, "app"), 1)

	e.vmop(t, "start-running", VMOPTypeStart, "app", nil)
	op = e.waitOp(t, "start-running", 20*time.Second, "finished", completed)
	require.Equal(t, VMOPPhaseFailed, op.phase)
	require.Equal(t, VMOPReasonNotApplicableForVMPhase, op.completed.Reason)

	e.vmop(t, "stop-always", VMOPTypeStop, "always", nil)
	op = e.waitOp(t, "stop-always", 20*time.Second, "finished", completed)
	require.Equal(t, VMOPPhaseFailed, op.phase)
	require.Equal(t, VMOPReasonNotApplicableForRunPolicy, op.completed.Reason)
	e.waitDVMPhase(t, "always", "Running", 5*time.Second)

	require.Empty(t, e.sim.Violations())
}

// TestVMOPEvictionsQueueWithinLimits: with Deckhouse's limits (one outbound migration per node,
// here one in the cluster) three Evict operations on one node run one after the other; the
// queued ones stay Pending with reason MigrationPending.
func TestVMOPEvictionsQueueWithinLimits(t *testing.T) {
	e := evStartSim(t)
	e.nodes(t, []string{"node-1", "node-2", "node-3"}, "node-2", "node-3")
	e.setMigrationLimits(t, 1, 1)
	names := []string{"q-1", "q-2", "q-3"}
	for _, n := range names {
		e.dvm(t, n, VMOptions{Memory: "2Gi"})
	}
	e.cordon(t, "node-2", false)
	e.cordon(t, "node-3", false)
	for _, n := range names {
		e.vmop(t, "evict-"+n, VMOPTypeEvict, n, nil)
	}
	maxInProgress, sawQueued := 0, false
	evEventually(t, 90*time.Second, "all evictions Completed", func() (bool, string) {
		inProgress, completed, desc := 0, 0, ""
		for _, n := range names {
			o := e.op(t, "evict-"+n)
			desc += n + ": " + o.String() + "; "
			switch o.phase {
			case VMOPPhaseInProgress:
				// The status mirrors the migration one pass behind: an operation whose
				// migration has just finished no longer holds a slot.
				if m := e.migration(t, "vmop-evict-"+n); m != nil && !m.IsFinal() {
					inProgress++
				}
			case VMOPPhaseCompleted:
				completed++
			case VMOPPhasePending:
				if o.completed != nil && o.completed.Reason == VMOPReasonMigrationPending {
					sawQueued = true
				}
			}
		}
		maxInProgress = max(maxInProgress, inProgress)
		return completed == len(names), desc
	})
	require.Equal(t, 1, maxInProgress, "operations in progress (with an unfinished migration) at once")
	require.True(t, sawQueued, "a queued operation shows Pending/MigrationPending")
	for _, n := range names {
		vmi := e.waitRunning(t, opNS, n, "", 10*time.Second)
		require.NotEqual(t, "node-1", vmi.Status.NodeName)
	}
	require.Empty(t, e.sim.Violations())
}
