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
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

// TestKubeVirtControlPlaneDiesWithNode: with both virt-api and both virt-controller replicas on
// one node that dies, every webhook call fails (first on the dead endpoints, then for want of
// any Ready one), and nothing restarts, until runbook steps 4-5 force-delete those pods: their
// ReplicaSets recreate them on a live node, and KubeVirt works again.
func TestKubeVirtControlPlaneDiesWithNode(t *testing.T) {
	// Time scale 10: all of it happens well within the 300 s after which the taint manager
	// evicts the pods of an unreachable node (DefaultTolerationSeconds) and their ReplicaSets
	// replace them by themselves.
	s := startSim(t, Options{TimeScale: 10, KubeVirtPods: controlPlaneOn("cp")})
	ctx := ctxT(t)
	mustControlPlaneNodes(t, s, "cp")
	mustNode(t, s, "n1", NodeOptions{})
	mustVM(t, s, "vm", VMOptions{})
	before := vmiRunning(t, s, "vm", 30*time.Second)
	require.Equal(t, "n1", before.Status.NodeName, "cp is cordoned")
	mustNode(t, s, "n2", NodeOptions{})
	launcher := activePod(before, vmiPods(s, "vm"))
	require.NotNil(t, launcher)

	require.NoError(t, s.SetFault(ctx, "cp", FaultDown))
	webhookFails := func(want string) {
		t.Helper()
		eventually(t, 30*time.Second, "webhook calls fail: "+want, func() (bool, string) {
			_, err := s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Create(ctx, newMigration("m-"+fmt.Sprint(time.Now().UnixNano()), "vm"), metav1.CreateOptions{})
			if err == nil {
				t.Fatal("a migration was admitted while virt-api is down")
			}
			return containsAll(err.Error(), "failed calling webhook", want), err.Error()
		})
	}
	// Its virt-api pods still look Ready: the API server's calls time out on them...
	webhookFails("i/o timeout")
	err := s.Kube.CoreV1().Pods(testNS).EvictV1(ctx, &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Namespace: testNS, Name: launcher.Name}})
	require.Error(t, err)
	require.False(t, apierrors.IsTooManyRequests(err), "failurePolicy Fail: not a 429 to retry but a failure: %v", err)
	require.Contains(t, err.Error(), "failed calling webhook")
	require.Contains(t, err.Error(), evictionWebhookName)
	// ...until the node lifecycle controller marks them not Ready: no endpoint is left.
	waitNodeReady(t, s, "cp", corev1.ConditionUnknown, 30*time.Second)
	webhookFails("no endpoints available for service")

	// The VM's node dies too and its pod is force-deleted: with no virt-controller, the VMI
	// stays as it was and the VM does not restart.
	require.NoError(t, s.SetFault(ctx, "n1", FaultDown))
	require.Equal(t, 1, forceDeletePods(t, s, "n1"))
	require.Never(t, func() bool {
		vmi := s.getVMI(testNS + "/vm")
		return vmi == nil || vmi.UID != before.UID || vmi.Status.Phase != kvv1.Running
	}, s.scaled(60*time.Second), 10*time.Millisecond, "no virt-controller: the VMI is left as it was for a simulated minute")
	require.Empty(t, s.Truth().GuestNodes(testNS+"/vm"))

	// Runbook steps 4-5: force-delete KubeVirt's pods stuck on the dead node.
	stuck := 0
	for _, p := range s.podsBy(byNode, "cp") {
		if c := p.Labels[kvv1.AppLabel]; c == "virt-api" || c == "virt-controller" {
			require.NoError(t, s.Kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0))}))
			stuck++
		}
	}
	require.Equal(t, 4, stuck, "two virt-api and two virt-controller pods were on cp")
	waitControlPlane(t, s, 30*time.Second)
	for _, comp := range []string{"virt-api", "virt-controller"} {
		for _, p := range s.podsOf(s.opts.KubeVirtNamespace, comp) {
			require.Equal(t, "n2", p.Spec.NodeName, "%s recreated on the only live node", p.Name)
		}
	}
	eventually(t, 30*time.Second, "the VM restarted on n2", func() (bool, string) {
		vmi := s.getVMI(testNS + "/vm")
		return vmi != nil && vmi.UID != before.UID && vmi.Status.Phase == kvv1.Running && vmi.Status.NodeName == "n2", fmt.Sprint(vmi)
	})
	require.Equal(t, []string{"n2"}, s.Truth().GuestNodes(testNS+"/vm"))
	_, err = s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Create(ctx, newMigration("ghost", "ghost"), metav1.CreateOptions{})
	require.Error(t, err)
	require.Contains(t, err.Error(), `the VMI "default/ghost" does not exist`, "virt-api answers again")
	require.Empty(t, s.Violations())
}

// TestVirtControllerLeaderTakeover: when the node of the virt-controller replica holding the
// lease dies, the other replica takes over once the lease has expired (15 s, renewed every
// 2 s): in between nothing is reconciled.
func TestVirtControllerLeaderTakeover(t *testing.T) {
	s := startSim(t, Options{KubeVirtPods: KubeVirtPods{VirtAPI: []string{"api", "api"}, VirtController: []string{"cp1", "cp2"}}})
	ctx := ctxT(t)
	mustControlPlaneNodes(t, s, "api", "cp1", "cp2")
	for _, n := range []string{"w1", "w2"} {
		mustNode(t, s, n, NodeOptions{})
	}
	mustVM(t, s, "vm", VMOptions{})
	vmiRunning(t, s, "vm", 30*time.Second)

	s.leader.mu.Lock()
	holder := s.getPod(s.leader.holder)
	s.leader.mu.Unlock()
	require.NotNil(t, holder)
	leaderNode := holder.Spec.NodeName
	require.Contains(t, []string{"cp1", "cp2"}, leaderNode)

	require.NoError(t, s.SetFault(ctx, leaderNode, FaultDown))
	down := time.Now()
	createMigration(t, s, newMigration("during-takeover", "vm"))
	eventually(t, 30*time.Second, "the migration controller looked at the migration", func() (bool, string) {
		m := s.getVMIM(testNS + "/during-takeover")
		return m != nil && m.Status.Phase != kvv1.MigrationPhaseUnset, ""
	})
	took := time.Since(down)
	t.Logf("a migration created when the leader's node died was first handled after %s (%s simulated)", took.Round(time.Millisecond),
		time.Duration(float64(took)*s.opts.TimeScale).Round(time.Second))
	// The lease was renewed one retry period before the node died, or a little more on a
	// loaded machine.
	require.GreaterOrEqual(t, took, s.scaled(virtControllerLeaseDuration-2*virtControllerRetryPeriod), "not before the lease expired")
	s.leader.mu.Lock()
	newHolder := s.getPod(s.leader.holder)
	s.leader.mu.Unlock()
	require.NotNil(t, newHolder)
	require.NotEqual(t, leaderNode, newHolder.Spec.NodeName, "the replica on the live node leads")
	waitMigrationPhase(t, s, "during-takeover", kvv1.MigrationSucceeded, 30*time.Second)
	require.Empty(t, s.Violations())
}

func containsAll(s string, parts ...string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}
