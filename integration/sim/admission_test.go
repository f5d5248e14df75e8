package sim

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

// TestMigrationAdmission: virt-api validates and mutates a VirtualMachineInstanceMigration
// when it is created (migration-create-admitter.go, migration-create-mutator.go), so the
// client that creates it learns at once what KubeVirt will not do.
func TestMigrationAdmission(t *testing.T) {
	s := startSim(t, Options{})
	ctx := ctxT(t)
	for _, n := range []string{"a1", "a2"} {
		mustNode(t, s, n, NodeOptions{})
	}
	// A slow migration stays unfinished for the whole test: 4Gi at 16Mi/s is 256 s simulated.
	setMigrations(t, s, kvv1.MigrationConfiguration{BandwidthPerMigration: ptr.To(resource.MustParse("16Mi"))})
	mustVM(t, s, "busy", VMOptions{Memory: "4Gi"})
	mustVM(t, s, "idle", VMOptions{Memory: "1Gi"})
	mustPVC(t, s, "private", corev1.ReadWriteOnce)
	mustVM(t, s, "rwo", VMOptions{Disk: "private"})
	mustVM(t, s, "once", VMOptions{RunStrategy: kvv1.RunStrategyOnce})
	for _, n := range []string{"busy", "idle", "rwo"} {
		vmiRunning(t, s, n, 30*time.Second)
	}
	// A final VMI: the Once VM's pod is deleted, its VMI ends and is not restarted.
	once := vmiRunning(t, s, "once", 30*time.Second)
	require.NoError(t, s.Kube.CoreV1().Pods(testNS).Delete(ctx, activePod(once, vmiPods(s, "once")).Name, metav1.DeleteOptions{}))
	eventually(t, 20*time.Second, "VMI once final", func() (bool, string) {
		vmi := s.getVMI(testNS + "/once")
		return vmi != nil && vmiFinal(vmi), fmt.Sprint(vmi.Status.Phase)
	})

	created := createMigration(t, s, newMigration("busy-1", "busy"))
	t.Run("selector label and finalizer are there at create", func(t *testing.T) {
		require.Equal(t, "busy", created.Labels[kvv1.MigrationSelectorLabel])
		require.Contains(t, created.Finalizers, kvv1.VirtualMachineInstanceMigrationFinalizer)
	})
	waitMigrationPhase(t, s, "busy-1", kvv1.MigrationRunning, 30*time.Second)

	priority := newMigration("prio", "idle")
	priority.Spec.Priority = ptr.To(kvv1.PriorityUserTriggered)
	tests := []struct {
		name string
		mig  *kvv1.VirtualMachineInstanceMigration
		want string
	}{
		{name: "VMI does not exist", mig: newMigration("ghost-1", "ghost"), want: `the VMI "default/ghost" does not exist`},
		{name: "VMI is final", mig: newMigration("once-1", "once"), want: "Cannot migrate VMI in finalized state."},
		{name: "VMI is not live-migratable", mig: newMigration("rwo-1", "rwo"), want: "Cannot migrate VMI, Reason: DisksNotLiveMigratable"},
		{name: "VMI already migrating", mig: newMigration("busy-2", "busy"),
			want: fmt.Sprintf("in-flight migration detected. Active migration job (%s) is currently already in progress for VMI busy.", created.UID)},
		{name: "priority without the feature gate", mig: priority, want: "MigrationPriorityQueue feature gate is not enabled in kubevirt resource"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Create(ctx, tt.mig, metav1.CreateOptions{})
			require.Error(t, err)
			require.Contains(t, err.Error(), `admission webhook "`+migrationCreateWebhookName+`" denied the request`)
			require.Contains(t, err.Error(), tt.want)
			require.Nil(t, s.getVMIM(testNS+"/"+tt.mig.Name))
		})
	}

	t.Run("only virt-controller sets a priority, with the feature gate", func(t *testing.T) {
		kv, err := s.KubeVirt.KubeVirts(s.opts.KubeVirtNamespace).Get(ctx, kubevirtCRName, metav1.GetOptions{})
		require.NoError(t, err)
		kv.Spec.Configuration.DeveloperConfiguration = &kvv1.DeveloperConfiguration{FeatureGates: []string{featureGateMigPrQ}}
		_, err = s.KubeVirt.KubeVirts(kv.Namespace).Update(ctx, kv, metav1.UpdateOptions{})
		require.NoError(t, err)
		_, err = s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Create(ctx, priority.DeepCopy(), metav1.CreateOptions{})
		require.Error(t, err)
		require.Contains(t, err.Error(), "Migration priority queue, only virt-controller is allowed to set priority field")
		// As virt-controller's service account it is admitted.
		m, err := s.kv.VirtualMachineInstanceMigrations(testNS).Create(ctx, priority.DeepCopy(), metav1.CreateOptions{})
		require.NoError(t, err)
		require.Equal(t, kvv1.PriorityUserTriggered, *m.Spec.Priority)
	})

	t.Run("a migration target pod is not evicted", func(t *testing.T) {
		var target *corev1.Pod
		for _, p := range vmiPods(s, "busy") {
			if p.Labels[kvv1.MigrationJobLabel] == string(created.UID) {
				target = p
			}
		}
		require.NotNil(t, target, "target pod of busy-1")
		err := s.Kube.CoreV1().Pods(testNS).EvictV1(ctx, &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Namespace: testNS, Name: target.Name}})
		require.True(t, apierrors.IsTooManyRequests(err), "eviction of the migration target pod: %v", err)
		require.Contains(t, err.Error(), "Eviction request for target Pod")
		require.Equal(t, kvv1.MigrationRunning, s.getVMIM(testNS+"/busy-1").Status.Phase, "the migration goes on")
	})
}

// TestVMIAdmission: virt-api refuses the VMI changes KubeVirt reserves for itself
// (vmi-create-admitter.go, vmi-update-admitter.go): a user may change a VMI's status (there is
// no status subresource) and its own labels, not its spec nor KubeVirt's labels.
func TestVMIAdmission(t *testing.T) {
	s := startSim(t, Options{})
	ctx := ctxT(t)
	mustNode(t, s, "v1", NodeOptions{})
	mustVM(t, s, "vm", VMOptions{})
	vmiRunning(t, s, "vm", 30*time.Second)
	vmis := s.KubeVirt.VirtualMachineInstances(testNS)

	tests := []struct {
		name  string
		patch string
		want  string // "" when allowed
	}{
		{name: "spec", patch: `{"spec":{"evictionStrategy":"None"}}`, want: "update of VMI object is restricted"},
		{name: "reserved label", patch: `{"metadata":{"labels":{"kubevirt.io/nodeName":"elsewhere"}}}`,
			want: "modification of the following reserved kubevirt.io/ labels on a VMI object is prohibited"},
		{name: "own label", patch: `{"metadata":{"labels":{"team":"db"}}}`},
		{name: "status", patch: `{"status":{"evacuationNodeName":"v1"}}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := vmis.Patch(ctx, "vm", types.MergePatchType, []byte(tt.patch), metav1.PatchOptions{})
			if tt.want == "" {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			require.Contains(t, err.Error(), `admission webhook "`+vmiUpdateWebhookName+`" denied the request`)
			require.Contains(t, err.Error(), tt.want)
		})
	}
	t.Run("status subresource", func(t *testing.T) {
		_, err := vmis.Patch(ctx, "vm", types.MergePatchType, []byte(`{"status":{"phase":"Failed"}}`), metav1.PatchOptions{}, "status")
		require.True(t, apierrors.IsNotFound(err), "VMIs have no status subresource: %v", err)
	})
	t.Run("reserved label at create", func(t *testing.T) {
		vmi := &kvv1.VirtualMachineInstance{
			ObjectMeta: metav1.ObjectMeta{Name: "bare", Namespace: testNS, Labels: map[string]string{kvv1.NodeNameLabel: "v1"}},
			Spec:       NewKubeVirtVM(testNS, "bare", VMOptions{}).Spec.Template.Spec,
		}
		_, err := vmis.Create(ctx, vmi, metav1.CreateOptions{})
		require.Error(t, err)
		require.Contains(t, err.Error(), "creation of the following reserved kubevirt.io/ labels on a VMI object is prohibited")
		delete(vmi.Labels, kvv1.NodeNameLabel)
		_, err = vmis.Create(ctx, vmi, metav1.CreateOptions{})
		require.NoError(t, err, "a bare VMI without reserved labels")
		vmiRunning(t, s, "bare", 30*time.Second)
	})
	require.Equal(t, "v1", s.getVMI(testNS + "/vm").Labels[kvv1.NodeNameLabel], "the refused label change left the VMI as it was")
	require.Equal(t, kvv1.EvictionStrategyLiveMigrate, *s.getVMI(testNS + "/vm").Spec.EvictionStrategy)
}
