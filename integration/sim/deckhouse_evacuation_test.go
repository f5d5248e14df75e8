package sim

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestDeckhouseEvacuation: on a Deckhouse cluster an eviction of a VM's launcher pod is answered
// as Deckhouse does it, not by KubeVirt's evacuation controller: the VM gets EvictionRequired, an
// Evict operation evacuation-* (annotation, finalizer) creates the migration, and once the VM
// runs elsewhere the condition and the finalizer go. An evacuation that fails is not retried
// while the failed operation exists (Deckhouse's back-off as written); once it is gone, a new
// one starts.
func TestDeckhouseEvacuation(t *testing.T) {
	s := startSim(t, Options{})
	ctx := ctxT(t)
	sc, err := ParseScenario([]byte(`
nodes: [{name: node-1}, {name: node-2}]
vms:
- {name: dh-a, platform: deckhouse, memory: 1Gi, runPolicy: AlwaysOn, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: dh-slow, platform: deckhouse, memory: 1Gi, runPolicy: AlwaysOn, disk: {accessMode: ReadWriteMany}, dirtyRate: 1Gi, node: node-1}
`))
	require.NoError(t, err)
	_, err = s.SeedScenario(ctx, sc)
	require.NoError(t, err)
	for _, vm := range sc.VMs {
		require.Equal(t, "node-1", vmiRunning(t, s, vm.Name, 60*time.Second).Status.NodeName)
	}
	kv, err := s.KubeVirt.KubeVirts(s.opts.KubeVirtNamespace).Get(ctx, kubevirtCRName, metav1.GetOptions{})
	require.NoError(t, err)
	m := kv.Spec.Configuration.MigrationConfiguration
	require.Equal(t, "640Mi", m.BandwidthPerMigration.String())
	require.Equal(t, int64(800), *m.CompletionTimeoutPerGiB)
	require.Equal(t, PlatformDeckhouse, kv.Annotations[AnnotationPlatform])

	updateNode(t, s, "node-1", func(n *corev1.Node) { n.Spec.Unschedulable = true })
	evictLauncher := func(vm string) {
		t.Helper()
		vmi := s.getVMI(testNS + "/" + vm)
		pod := activePod(vmi, vmiPods(s, vm))
		require.NotNil(t, pod, vm)
		err := s.Kube.PolicyV1().Evictions(testNS).Evict(ctx, &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: testNS}})
		require.True(t, apierrors.IsTooManyRequests(err), "eviction of %s's launcher: want 429, got %v", vm, err)
	}
	evacuations := func(vm string) []unstructured.Unstructured {
		list, err := s.Dynamic.Resource(DeckhouseVMOPGVR).Namespace(testNS).List(ctx, metav1.ListOptions{})
		require.NoError(t, err)
		var out []unstructured.Unstructured
		for _, op := range list.Items {
			name, _, _ := unstructured.NestedString(op.Object, "spec", "virtualMachineName")
			if name == vm && strings.HasPrefix(op.GetName(), vmopEvacuationPrefix) {
				out = append(out, op)
			}
		}
		return out
	}
	dvm := func(name string) *unstructured.Unstructured {
		u, err := s.Dynamic.Resource(DeckhouseVMGVR).Namespace(testNS).Get(ctx, name, metav1.GetOptions{})
		require.NoError(t, err)
		return u
	}
	phaseOf := func(op unstructured.Unstructured) string {
		p, _, _ := unstructured.NestedString(op.Object, "status", "phase")
		return p
	}

	evictLauncher("dh-a")
	eventually(t, 30*time.Second, "dh-a EvictionRequired", func() (bool, string) {
		return deckhouseConditionTrue(dvm("dh-a"), DeckhouseConditionEvictionRequired), fmt.Sprint(dvm("dh-a").Object["status"])
	})
	var op unstructured.Unstructured
	eventually(t, 30*time.Second, "an evacuation operation for dh-a", func() (bool, string) {
		ops := evacuations("dh-a")
		if len(ops) != 1 {
			return false, fmt.Sprintf("%d operations", len(ops))
		}
		op = ops[0]
		return true, ""
	})
	typ, _, _ := unstructured.NestedString(op.Object, "spec", "type")
	require.Equal(t, VMOPTypeEvict, typ)
	require.Equal(t, "true", op.GetAnnotations()[AnnotationVMOPEvacuation])
	eventually(t, 60*time.Second, "dh-a evacuated to node-2", func() (bool, string) {
		vmi := s.getVMI(testNS + "/dh-a")
		cur, err := s.Dynamic.Resource(DeckhouseVMOPGVR).Namespace(testNS).Get(ctx, op.GetName(), metav1.GetOptions{})
		require.NoError(t, err)
		done := vmi.Status.NodeName == "node-2" && vmi.Status.EvacuationNodeName == "" && phaseOf(*cur) == VMOPPhaseCompleted &&
			!hasString(cur.GetFinalizers(), finalizerVMOPEvacuation) && !deckhouseConditionTrue(dvm("dh-a"), DeckhouseConditionEvictionRequired)
		return done, fmt.Sprintf("node %s mark %q vmop %s finalizers %v", vmi.Status.NodeName, vmi.Status.EvacuationNodeName, phaseOf(*cur), cur.GetFinalizers())
	})
	migs, err := s.KubeVirt.VirtualMachineInstanceMigrations(testNS).List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	var names []string
	for _, m := range migs.Items {
		names = append(names, m.Name)
	}
	require.Equal(t, []string{vmopMigrationPrefix + op.GetName()}, names, "one migration, the operation's; none from KubeVirt's evacuation controller")

	t.Run("a failed evacuation is not retried while it exists", func(t *testing.T) {
		evictLauncher("dh-slow") // dirties 1Gi/s against 640Mi/s: never converges
		var failed unstructured.Unstructured
		eventually(t, 60*time.Second, "dh-slow's evacuation Failed", func() (bool, string) {
			ops := evacuations("dh-slow")
			if len(ops) != 1 || phaseOf(ops[0]) != VMOPPhaseFailed {
				return false, fmt.Sprintf("%d operations", len(ops))
			}
			failed = ops[0]
			return true, ""
		})
		cond := findCondition(dvm("dh-slow"), DeckhouseConditionEvictionRequired)
		require.NotNil(t, cond)
		// Well past the 2 s back-off: still one operation, the VM still waiting on node-1.
		deadline := time.Now().Add(s.scaled(60 * time.Second))
		for time.Now().Before(deadline) {
			require.Len(t, evacuations("dh-slow"), 1)
			require.True(t, deckhouseConditionTrue(dvm("dh-slow"), DeckhouseConditionEvictionRequired))
			require.Equal(t, "node-1", s.getVMI(testNS+"/dh-slow").Status.NodeName)
			time.Sleep(50 * time.Millisecond)
		}
		// Deckhouse's vmop garbage collector deletes finished operations (after 24 h).
		require.NoError(t, s.Dynamic.Resource(DeckhouseVMOPGVR).Namespace(testNS).Delete(ctx, failed.GetName(), metav1.DeleteOptions{}))
		eventually(t, 30*time.Second, "a new evacuation of dh-slow", func() (bool, string) {
			ops := evacuations("dh-slow")
			return len(ops) == 1 && ops[0].GetName() != failed.GetName(), fmt.Sprintf("%d operations", len(ops))
		})
	})
	require.Empty(t, s.Violations())
}

// findCondition returns the Deckhouse object's condition typ, nil when it has none.
func findCondition(u *unstructured.Unstructured, typ string) map[string]any {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		if m, ok := c.(map[string]any); ok && m["type"] == typ {
			return m
		}
	}
	return nil
}
