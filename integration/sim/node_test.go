package sim

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

func nodeReadyStatus(s *Simulator, name string) corev1.ConditionStatus {
	n := s.getNode(name)
	if n == nil {
		return ""
	}
	if c := nodeCondition(n, corev1.NodeReady); c != nil {
		return c.Status
	}
	return ""
}

func waitNodeReady(t *testing.T, s *Simulator, name string, want corev1.ConditionStatus, timeout time.Duration) {
	t.Helper()
	eventually(t, timeout, fmt.Sprintf("node %s Ready=%s", name, want), func() (bool, string) {
		got := nodeReadyStatus(s, name)
		if want == corev1.ConditionUnknown && !hasTaint(s.getNode(name), taintUnreachable, corev1.TaintEffectNoSchedule) {
			return false, "not tainted unreachable yet"
		}
		return got == want, string(got)
	})
}

// forceDeletePods force-deletes (grace 0) the launcher pods on node, as an
// admin does once sure the node is dead.
func forceDeletePods(t *testing.T, s *Simulator, node string) int {
	t.Helper()
	n := 0
	for _, p := range s.podsBy(byNode, node) {
		if !isLauncher(p) {
			continue
		}
		err := s.Kube.CoreV1().Pods(p.Namespace).Delete(ctxT(t), p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0))})
		require.NoError(t, err)
		n++
	}
	return n
}

// TestNodeLifecycle: leases keep a node Ready; a node that stops
// heartbeating goes Ready=Unknown with the unreachable taints after the
// grace period while its pods still look Running; it comes back Ready
// without them; a reboot fails its pods and clears the fault.
func TestNodeLifecycle(t *testing.T) {
	s := startSim(t, Options{KubeVirtPods: controlPlaneOn("cp")})
	ctx := ctxT(t)
	mustControlPlaneNodes(t, s, "cp")
	mustNode(t, s, "n1", NodeOptions{})
	waitNodeReady(t, s, "n1", corev1.ConditionTrue, 10*time.Second)
	mustVM(t, s, "vm", VMOptions{})
	vmiRunning(t, s, "vm", 30*time.Second)
	var lease *coordinationv1.Lease
	eventually(t, 10*time.Second, "lease", func() (bool, string) {
		lease = s.getLease("n1")
		return lease != nil, ""
	})
	eventually(t, 10*time.Second, "lease renewed", func() (bool, string) {
		l := s.getLease("n1")
		return l != nil && l.Spec.RenewTime.After(lease.Spec.RenewTime.Time), ""
	})

	t.Run("down", func(t *testing.T) {
		require.NoError(t, s.SetFault(ctx, "n1", FaultDown))
		waitNodeReady(t, s, "n1", corev1.ConditionUnknown, 30*time.Second)
		eventually(t, 10*time.Second, "unreachable taints", func() (bool, string) {
			n := s.getNode("n1")
			return hasTaint(n, taintUnreachable, corev1.TaintEffectNoSchedule) && hasTaint(n, taintUnreachable, corev1.TaintEffectNoExecute), fmt.Sprint(n.Spec.Taints)
		})
		require.Empty(t, s.Truth().GuestNodes(testNS+"/vm"), "guests on a down node are dead")
		pods := vmiPods(s, "vm")
		require.Len(t, pods, 1)
		require.Equal(t, corev1.PodRunning, pods[0].Status.Phase, "the API still shows the pod running")
		vmi := s.getVMI(testNS + "/vm")
		require.Equal(t, kvv1.Running, vmi.Status.Phase, "KubeVirt cannot tell: the VMI stays Running")
		require.Equal(t, NodeDown, s.NodeState("n1"))
		eventually(t, 30*time.Second, "virt-controller marks the node unschedulable for VMIs", func() (bool, string) {
			n := s.getNode("n1")
			return n.Labels[kvv1.NodeSchedulable] == "false", fmt.Sprint(n.Labels, n.Annotations)
		})
	})
	t.Run("heals after boot, the dead pod fails and the VM restarts", func(t *testing.T) {
		require.NoError(t, s.SetFault(ctx, "n1", ""))
		waitNodeReady(t, s, "n1", corev1.ConditionTrue, 30*time.Second)
		eventually(t, 10*time.Second, "taints removed", func() (bool, string) {
			n := s.getNode("n1")
			return !hasTaint(n, taintUnreachable, "") && !hasTaint(n, taintNotReady, ""), fmt.Sprint(n.Spec.Taints)
		})
		eventually(t, 30*time.Second, "virt-handler marks the node schedulable again", func() (bool, string) {
			return s.getNode("n1").Labels[kvv1.NodeSchedulable] == "true", ""
		})
		eventually(t, 30*time.Second, "the VM runs again", func() (bool, string) {
			vmi := s.getVMI(testNS + "/vm")
			if vmi == nil || vmi.Status.Phase != kvv1.Running {
				return false, "no running vmi"
			}
			guests := s.Truth().GuestNodes(testNS + "/vm")
			return len(guests) == 1 && guests[0] == vmi.Status.NodeName, fmt.Sprint(guests)
		})
	})
	t.Run("reboot", func(t *testing.T) {
		before := vmiRunning(t, s, "vm", 10*time.Second)
		require.NoError(t, s.SetFault(ctx, "n1", FaultReboot))
		eventually(t, 30*time.Second, "a new VMI after the reboot", func() (bool, string) {
			vmi := s.getVMI(testNS + "/vm")
			return vmi != nil && vmi.UID != before.UID && vmi.Status.Phase == kvv1.Running, ""
		})
		eventually(t, 10*time.Second, "fault annotation cleared", func() (bool, string) {
			_, ok := s.getNode("n1").Annotations[AnnotationFault]
			return !ok, ""
		})
		waitNodeReady(t, s, "n1", corev1.ConditionTrue, 10*time.Second)
		require.Empty(t, s.Violations())
	})
	t.Run("out-of-service taint force-deletes pods and detaches volumes", func(t *testing.T) {
		mustNode(t, s, "n2", NodeOptions{})
		mustPVC(t, s, "oos-disk", corev1.ReadWriteOnce)
		mustVM(t, s, "oos", VMOptions{Disk: "oos-disk", NodeSelector: map[string]string{labelHostname: "n2"}})
		oos := vmiRunning(t, s, "oos", 30*time.Second)
		require.NotEmpty(t, s.vasFor(byVANode, "n2"))
		require.NoError(t, s.SetFault(ctx, "n2", FaultDown))
		waitNodeReady(t, s, "n2", corev1.ConditionUnknown, 30*time.Second)
		updateNode(t, s, "n2", func(n *corev1.Node) {
			n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: taintOutOfService, Value: "nodeshutdown", Effect: corev1.TaintEffectNoExecute})
		})
		eventually(t, 30*time.Second, "pods and attachments gone from n2", func() (bool, string) {
			return len(s.podsBy(byNode, "n2")) == 0 && len(s.vasFor(byVANode, "n2")) == 0,
				fmt.Sprintf("%d pods, %d attachments", len(s.podsBy(byNode, "n2")), len(s.vasFor(byVANode, "n2")))
		})
		// lifecycle.go: a VMI whose pod is gone fails without a reason (NodeUnresponsive is the
		// node controller's, 5 minutes after virt-handler's last heartbeat).
		eventually(t, 10*time.Second, "vmi failed (or already replaced by its VM)", func() (bool, string) {
			vmi := s.getVMI(testNS + "/oos")
			return vmi == nil || vmi.UID != oos.UID || (vmi.Status.Phase == kvv1.Failed && vmi.Status.Reason == ""),
				fmt.Sprintf("%v", vmi)
		})
	})
}

// TestRunStrategiesAfterNodeFailure: when a dead node's launcher pods are
// force-deleted, the VMIs fail (without a reason) and only Always and
// RerunOnFailure VMs start again elsewhere; until then they stay as they
// were; a VM switched to Halted while its node is dead does not come back.
func TestRunStrategiesAfterNodeFailure(t *testing.T) {
	s := startSim(t, Options{KubeVirtPods: controlPlaneOn("cp")})
	ctx := ctxT(t)
	mustControlPlaneNodes(t, s, "cp")
	mustNode(t, s, "a", NodeOptions{})
	tests := []struct {
		strategy kvv1.VirtualMachineRunStrategy
		restarts bool
	}{
		{kvv1.RunStrategyAlways, true},
		{kvv1.RunStrategyRerunOnFailure, true},
		{kvv1.RunStrategyManual, false},
		{kvv1.RunStrategyOnce, false},
	}
	name := func(st kvv1.VirtualMachineRunStrategy) string { return "vm-" + strings.ToLower(string(st)) }
	for _, tc := range tests {
		mustVM(t, s, name(tc.strategy), VMOptions{RunStrategy: tc.strategy})
		if tc.strategy == kvv1.RunStrategyManual {
			require.NoError(t, s.StartKubeVirtVM(ctx, testNS, name(tc.strategy)))
		}
	}
	// vm-halted runs (as Always) on the node that dies and is switched to
	// Halted just before its pod is force-deleted: its VMI must not come back.
	mustVM(t, s, "vm-halted", VMOptions{RunStrategy: kvv1.RunStrategyAlways})
	for _, tc := range tests {
		require.Equal(t, "a", vmiRunning(t, s, name(tc.strategy), 30*time.Second).Status.NodeName)
	}
	halted := vmiRunning(t, s, "vm-halted", 30*time.Second)
	require.Equal(t, "a", halted.Status.NodeName)
	mustNode(t, s, "b", NodeOptions{})
	require.NoError(t, s.SetFault(ctx, "a", FaultDown))
	waitNodeReady(t, s, "a", corev1.ConditionUnknown, 30*time.Second)
	for _, tc := range tests {
		vmi := s.getVMI(testNS + "/" + name(tc.strategy))
		require.Equal(t, kvv1.Running, vmi.Status.Phase, "%s: unchanged while its pod exists", tc.strategy)
	}
	_, err := s.KubeVirt.VirtualMachines(testNS).Patch(ctx, "vm-halted", types.MergePatchType,
		[]byte(`{"spec":{"runStrategy":"Halted"}}`), metav1.PatchOptions{})
	require.NoError(t, err)
	// the VM controller has acted on Halted (it reports the strategy it ran
	// with), so the VMI's failure below cannot be handled as Always
	eventually(t, 10*time.Second, "vm-halted synced as Halted", func() (bool, string) {
		vm := s.getVM(testNS + "/vm-halted")
		return vm.Status.RunStrategy == kvv1.RunStrategyHalted, string(vm.Status.RunStrategy)
	})
	require.Equal(t, 5, forceDeletePods(t, s, "a"))
	for _, tc := range tests {
		t.Run(string(tc.strategy), func(t *testing.T) {
			vmName := name(tc.strategy)
			if tc.restarts {
				vmi := vmiRunning(t, s, vmName, 30*time.Second)
				require.Equal(t, "b", vmi.Status.NodeName)
				require.Equal(t, []string{"b"}, s.Truth().GuestNodes(testNS+"/"+vmName))
				return
			}
			// lifecycle.go: Failed without a reason, the pod being gone
			eventually(t, 20*time.Second, "vmi Failed and VM stopped", func() (bool, string) {
				vmi := s.getVMI(testNS + "/" + vmName)
				vm := s.getVM(testNS + "/" + vmName)
				if vmi == nil {
					return false, "vmi gone"
				}
				return vmi.Status.Phase == kvv1.Failed && vmi.Status.Reason == "" && vm.Status.PrintableStatus == kvv1.VirtualMachineStatusStopped,
					fmt.Sprintf("vmi %s/%s vm %s", vmi.Status.Phase, vmi.Status.Reason, vm.Status.PrintableStatus)
			})
		})
	}
	// the ones that must not restart did not (their VMIs are the failed ones)
	for _, tc := range tests {
		if !tc.restarts {
			vmi := s.getVMI(testNS + "/" + name(tc.strategy))
			require.Equal(t, kvv1.Failed, vmi.Status.Phase, tc.strategy)
			require.Empty(t, s.Truth().GuestNodes(testNS+"/"+name(tc.strategy)))
		}
	}
	// The Always VM has restarted (above), so a VM controller treating the
	// Halted VM as Always would have recreated its VMI by now: only the old
	// one may be seen, on its way out.
	eventually(t, 20*time.Second, "vm-halted's VMI gone, not replaced", func() (bool, string) {
		vmi := s.getVMI(testNS + "/vm-halted")
		if vmi == nil {
			return true, ""
		}
		if vmi.UID != halted.UID {
			t.Fatalf("vm-halted got a new VMI %s (phase %s) after its node died", vmi.UID, vmi.Status.Phase)
		}
		return false, fmt.Sprintf("old vmi phase %s deleting %v", vmi.Status.Phase, vmi.DeletionTimestamp != nil)
	})
	require.Empty(t, s.Truth().GuestNodes(testNS+"/vm-halted"))
	eventually(t, 10*time.Second, "vm-halted Stopped", func() (bool, string) {
		vm := s.getVM(testNS + "/vm-halted")
		return vm.Status.PrintableStatus == kvv1.VirtualMachineStatusStopped, string(vm.Status.PrintableStatus)
	})
	require.Nil(t, s.getVMI(testNS+"/vm-halted"), "no new VMI for the Halted VM")
	require.Empty(t, s.Violations())
}

// TestVMIFailureReasons: a VMI whose launcher pod is gone fails at once and without a reason
// (vmi/lifecycle.go); NodeUnresponsive comes only from virt-controller's node controller, once
// virt-handler's heartbeat is five minutes old, for a VMI with no live pod on that node
// (node/node.go): here a pod the kubelet reported Failed just before its node died, which no
// virt-handler is left to report on.
func TestVMIFailureReasons(t *testing.T) {
	s := startSim(t, Options{KubeVirtPods: controlPlaneOn("cp")})
	require.Equal(t, 50*time.Second, s.Options().NodeMonitorGracePeriod, "the kube-controller-manager default since Kubernetes 1.32")
	ctx := ctxT(t)
	mustControlPlaneNodes(t, s, "cp")
	for _, n := range []string{"u1", "u2"} {
		mustNode(t, s, n, NodeOptions{})
	}
	// Manual: a failed VMI stays, to be looked at.
	mustVM(t, s, "gone", VMOptions{RunStrategy: kvv1.RunStrategyManual, NodeSelector: map[string]string{labelHostname: "u1"}})
	mustVM(t, s, "crashed", VMOptions{RunStrategy: kvv1.RunStrategyManual, NodeSelector: map[string]string{labelHostname: "u2"}})
	for _, vm := range []string{"gone", "crashed"} {
		require.NoError(t, s.StartKubeVirtVM(ctx, testNS, vm))
		vmiRunning(t, s, vm, 30*time.Second)
	}
	crashedPod := activePod(s.getVMI(testNS+"/crashed"), vmiPods(s, "crashed"))
	require.NotNil(t, crashedPod)
	// The kubelet on u2 reports the pod Failed, then u2 dies before virt-handler reports the VMI.
	// Unlike a reboot, the kubelet does not come back to fail it again.
	require.NoError(t, s.SetFault(ctx, "u1", FaultDown))
	require.NoError(t, s.SetFault(ctx, "u2", FaultDown))
	down := time.Now()
	eventually(t, 10*time.Second, "u2 down", func() (bool, string) { return s.NodeState("u2") == NodeDown, "" })
	p, err := s.Kube.CoreV1().Pods(testNS).Get(ctx, crashedPod.Name, metav1.GetOptions{})
	require.NoError(t, err)
	p.Status = podFailedStatus(p, s.now())
	_, err = s.Kube.CoreV1().Pods(testNS).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	require.NoError(t, err)

	waitNodeReady(t, s, "u1", corev1.ConditionUnknown, 30*time.Second)
	require.Equal(t, 1, forceDeletePods(t, s, "u1"))
	eventually(t, 10*time.Second, "gone's VMI Failed", func() (bool, string) {
		vmi := s.getVMI(testNS + "/gone")
		return vmi.Status.Phase == kvv1.Failed, string(vmi.Status.Phase)
	})
	require.Empty(t, s.getVMI(testNS+"/gone").Status.Reason, "a VMI whose pod is gone fails without a reason")
	require.Less(t, time.Since(down), s.scaled(4*time.Minute), "long before virt-handler's heartbeat is stale")
	require.Equal(t, kvv1.Running, s.getVMI(testNS+"/crashed").Status.Phase, "its pod still exists: nobody reports it yet")

	eventually(t, 30*time.Second, "crashed's VMI Failed NodeUnresponsive", func() (bool, string) {
		vmi := s.getVMI(testNS + "/crashed")
		return vmi.Status.Phase == kvv1.Failed, string(vmi.Status.Phase)
	})
	require.Equal(t, nodeUnresponsiveReason, s.getVMI(testNS+"/crashed").Status.Reason)
	// virt-handler beats every minute: its last heartbeat was at most a minute before u2 died
	// (and its annotation has whole seconds of real time).
	require.GreaterOrEqual(t, time.Since(down), s.scaled(4*time.Minute)-time.Second, "not before the heartbeat is five minutes old")
	eventually(t, 10*time.Second, "u2 unschedulable for VMIs", func() (bool, string) {
		return s.getNode("u2").Labels[kvv1.NodeSchedulable] == "false", ""
	})
	require.Empty(t, s.Violations())
}
