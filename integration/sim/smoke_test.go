package sim

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

// TestSeedRunsVMs: a seeded cluster brings every VM its run strategy starts
// to Running, and the ground truth agrees with the API.
func TestSeedRunsVMs(t *testing.T) {
	s := startSim(t, Options{})
	res, err := s.Seed(ctxT(t), SeedOptions{Nodes: 3, VMs: 6})
	require.NoError(t, err)
	require.Len(t, res.VMs, 6)
	for i, name := range res.VMs {
		mix := seedMix(i)
		if mix.strategy == kvv1.RunStrategyHalted {
			continue
		}
		vmi := vmiRunning(t, s, name, 30*time.Second)
		eventually(t, 10*time.Second, "vm status of "+name, func() (bool, string) {
			vm := s.getVM(testNS + "/" + name)
			return vm != nil && vm.Status.PrintableStatus == kvv1.VirtualMachineStatusRunning && vm.Status.Ready, string(vm.Status.PrintableStatus)
		})
		require.Equal(t, []string{vmi.Status.NodeName}, s.Truth().GuestNodes(testNS+"/"+name), name)
	}
	require.Empty(t, s.Violations())

	ctx := ctxT(t)
	t.Run("KubeVirt's own pods run", func(t *testing.T) {
		eventually(t, 30*time.Second, "virt-handler on every node, two virt-api and two virt-controller", func() (bool, string) {
			running := map[string]int{}
			handlerNodes := map[string]bool{}
			for _, comp := range []string{"virt-handler", "virt-api", "virt-controller"} {
				for _, p := range s.podsOf(s.opts.KubeVirtNamespace, comp) {
					if p.Status.Phase == corev1.PodRunning {
						running[comp]++
						if comp == "virt-handler" {
							handlerNodes[p.Spec.NodeName] = true
						}
					}
				}
			}
			return len(handlerNodes) == 3 && running["virt-handler"] == 3 && running["virt-api"] == 2 && running["virt-controller"] == 2, fmt.Sprint(running)
		})
	})
	t.Run("a Manual VM stops on request and stays stopped", func(t *testing.T) {
		name := res.VMs[3] // Manual, started by Seed's start request
		vmiRunning(t, s, name, 10*time.Second)
		require.NoError(t, s.StopKubeVirtVM(ctx, testNS, name))
		waitVMStopped(t, s, name)
	})
	t.Run("switching to Halted stops an Always VM", func(t *testing.T) {
		name := res.VMs[0]
		_, err := s.mutateVM(ctx, testNS, name, false, func(vm *kvv1.VirtualMachine) bool {
			vm.Spec.RunStrategy = ptr.To(kvv1.RunStrategyHalted)
			return true
		})
		require.NoError(t, err)
		waitVMStopped(t, s, name)
	})
	t.Run("deleting a VM removes its VMI and pod", func(t *testing.T) {
		name := res.VMs[2]
		vmiRunning(t, s, name, 10*time.Second)
		require.NoError(t, s.KubeVirt.VirtualMachines(testNS).Delete(ctx, name, metav1.DeleteOptions{}))
		eventually(t, 20*time.Second, "vm, vmi and pod gone", func() (bool, string) {
			return s.getVM(testNS+"/"+name) == nil && s.getVMI(testNS+"/"+name) == nil && len(vmiPods(s, name)) == 0, ""
		})
		require.Empty(t, s.Truth().GuestNodes(testNS+"/"+name))
	})
}

// TestStartFailureBackOff: a VMI that fails before it ever runs counts as
// a start failure; the VM shows CrashLoopBackOff and starts again only
// after the back-off.
func TestStartFailureBackOff(t *testing.T) {
	s := startSim(t, Options{})
	ctx := ctxT(t)
	mustNode(t, s, "n", NodeOptions{})
	mustVM(t, s, "crashy", VMOptions{NodeSelector: map[string]string{"nowhere": "true"}})
	var first *kvv1.VirtualMachineInstance
	eventually(t, 30*time.Second, "launcher pod pending", func() (bool, string) {
		first = s.getVMI(testNS + "/crashy")
		return first != nil && len(vmiPods(s, "crashy")) == 1, ""
	})
	for _, p := range vmiPods(s, "crashy") {
		require.NoError(t, s.Kube.CoreV1().Pods(testNS).Delete(ctx, p.Name, metav1.DeleteOptions{}))
	}
	var vm *kvv1.VirtualMachine
	eventually(t, 30*time.Second, "start failure recorded", func() (bool, string) {
		vm = s.getVM(testNS + "/crashy")
		return vm.Status.StartFailure != nil && vm.Status.StartFailure.LastFailedVMIUID == first.UID, ""
	})
	require.Equal(t, 1, vm.Status.StartFailure.ConsecutiveFailCount)
	retryAfter := vm.Status.StartFailure.RetryAfterTimestamp.Time
	require.True(t, retryAfter.After(time.Now().Add(-time.Second)), "a back-off lies ahead")
	eventually(t, 30*time.Second, "a new VMI after the back-off", func() (bool, string) {
		vmi := s.getVMI(testNS + "/crashy")
		return vmi != nil && vmi.UID != first.UID, ""
	})
	// one whole second of slack: API timestamps have whole seconds
	require.False(t, time.Now().Add(time.Second).Before(retryAfter), "not before the back-off ended")
}

// waitVMStopped waits until VM name has no VMI, no pod, no guest and shows Stopped.
func waitVMStopped(t *testing.T, s *Simulator, name string) {
	t.Helper()
	eventually(t, 20*time.Second, "vm "+name+" stopped", func() (bool, string) {
		vm := s.getVM(testNS + "/" + name)
		return s.getVMI(testNS+"/"+name) == nil && len(vmiPods(s, name)) == 0 && vm.Status.PrintableStatus == kvv1.VirtualMachineStatusStopped,
			string(vm.Status.PrintableStatus)
	})
	require.Empty(t, s.Truth().GuestNodes(testNS+"/"+name))
}
