package sim

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	kvv1 "kubevirt.io/api/core/v1"
)

// TestSchedulingHonoursCordonTaintsAndSelectors: VMs land only on nodes
// that are schedulable, whose taints they tolerate and whose labels match;
// one that fits nowhere stays Pending, Unschedulable.
func TestSchedulingHonoursCordonTaintsAndSelectors(t *testing.T) {
	s := startSim(t, Options{})
	mustNode(t, s, "cordoned", NodeOptions{})
	mustNode(t, s, "tainted", NodeOptions{Taints: []corev1.Taint{{Key: "dedicated", Value: "db", Effect: corev1.TaintEffectNoSchedule}}})
	mustNode(t, s, "ssd", NodeOptions{Labels: map[string]string{"disk": "ssd"}})
	mustNode(t, s, "plain", NodeOptions{})
	updateNode(t, s, "cordoned", func(n *corev1.Node) { n.Spec.Unschedulable = true })
	eventually(t, 10*time.Second, "cordon in cache", func() (bool, string) {
		n := s.getNode("cordoned")
		return n != nil && n.Spec.Unschedulable, ""
	})

	tolerate := []corev1.Toleration{{Key: "dedicated", Operator: corev1.TolerationOpEqual, Value: "db", Effect: corev1.TaintEffectNoSchedule}}
	tests := []struct {
		name    string
		opts    VMOptions
		allowed []string // nodes where it may land; empty: nowhere
	}{
		{name: "plain-1", allowed: []string{"ssd", "plain"}},
		{name: "plain-2", allowed: []string{"ssd", "plain"}},
		{name: "plain-3", allowed: []string{"ssd", "plain"}},
		{name: "plain-4", allowed: []string{"ssd", "plain"}},
		{name: "tolerates", opts: VMOptions{Tolerations: tolerate, NodeSelector: map[string]string{labelHostname: "tainted"}}, allowed: []string{"tainted"}},
		{name: "wants-ssd", opts: VMOptions{NodeSelector: map[string]string{"disk": "ssd"}}, allowed: []string{"ssd"}},
		{name: "wants-cordoned", opts: VMOptions{NodeSelector: map[string]string{labelHostname: "cordoned"}}},
		{name: "wants-tainted", opts: VMOptions{NodeSelector: map[string]string{labelHostname: "tainted"}}},
		{name: "wants-gpu", opts: VMOptions{NodeSelector: map[string]string{"gpu": "true"}}},
	}
	for _, tc := range tests {
		mustVM(t, s, tc.name, tc.opts)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if len(tc.allowed) > 0 {
				vmi := vmiRunning(t, s, tc.name, 30*time.Second)
				require.Contains(t, tc.allowed, vmi.Status.NodeName)
				return
			}
			eventually(t, 30*time.Second, "pod unschedulable", func() (bool, string) {
				pods := vmiPods(s, tc.name)
				if len(pods) != 1 {
					return false, fmt.Sprintf("%d pods", len(pods))
				}
				p := pods[0]
				for _, c := range p.Status.Conditions {
					if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
						return p.Spec.NodeName == "" && p.Status.Phase == corev1.PodPending, c.Message
					}
				}
				return false, fmt.Sprintf("conditions %+v", p.Status.Conditions)
			})
			eventually(t, 10*time.Second, "vm ErrorUnschedulable", func() (bool, string) {
				vm := s.getVM(testNS + "/" + tc.name)
				return vm.Status.PrintableStatus == kvv1.VirtualMachineStatusUnschedulable, string(vm.Status.PrintableStatus)
			})
		})
	}
	// every launcher pod bound so far respects the rules, not just the ones
	// we waited for (virt-handler, a DaemonSet pod, tolerates the cordon)
	for _, obj := range s.podInformer.GetStore().List() {
		p := obj.(*corev1.Pod)
		if !isLauncher(p) {
			require.True(t, toleratesTaint(p, corev1.Taint{Key: taintUnschedulable, Effect: corev1.TaintEffectNoSchedule}) || p.Spec.NodeName != "cordoned", p.Name)
			continue
		}
		require.NotEqual(t, "cordoned", p.Spec.NodeName, p.Name)
		if p.Spec.NodeName == "tainted" {
			require.True(t, toleratesTaint(p, corev1.Taint{Key: "dedicated", Value: "db", Effect: corev1.TaintEffectNoSchedule}), p.Name)
		}
	}

	t.Run("uncordon schedules the waiting pod", func(t *testing.T) {
		updateNode(t, s, "cordoned", func(n *corev1.Node) { n.Spec.Unschedulable = false })
		vmi := vmiRunning(t, s, "wants-cordoned", 30*time.Second)
		require.Equal(t, "cordoned", vmi.Status.NodeName)
	})
}

// TestCapacityNeverExceeded: the scheduler never binds more requests to a
// node than it has allocatable; what does not fit waits.
func TestCapacityNeverExceeded(t *testing.T) {
	s := startSim(t, Options{})
	mustNode(t, s, "small-1", NodeOptions{CPU: "4", Memory: "8Gi"})
	mustNode(t, s, "small-2", NodeOptions{CPU: "4", Memory: "8Gi"})
	// 10 VMs of 3Gi: two fit per node (6Gi of 8Gi), so 4 run and 6 wait
	for i := 0; i < 10; i++ {
		mustVM(t, s, fmt.Sprintf("big-%d", i), VMOptions{Memory: "3Gi", CPU: 1})
	}
	eventually(t, 60*time.Second, "4 running, 6 unschedulable", func() (bool, string) {
		running, unsched := 0, 0
		for i := 0; i < 10; i++ {
			vmi := s.getVMI(fmt.Sprintf("%s/big-%d", testNS, i))
			if vmi != nil && vmi.Status.Phase == kvv1.Running {
				running++
			}
			if vmi != nil {
				if c := vmiCondition(vmi, kvv1.VirtualMachineInstanceConditionType(corev1.PodScheduled)); c != nil && c.Reason == corev1.PodReasonUnschedulable {
					unsched++
				}
			}
		}
		return running == 4 && unsched == 6, fmt.Sprintf("running %d unschedulable %d", running, unsched)
	})
	used := s.nodeUsage()
	for _, name := range []string{"small-1", "small-2"} {
		alloc := nodeAllocatable(s.getNode(name))
		require.LessOrEqual(t, used[name].mem, alloc.mem, name)
		require.LessOrEqual(t, used[name].cpu, alloc.cpu, name)
		launchers := 0
		for _, p := range s.podsBy(byNode, name) {
			if isLauncher(p) {
				launchers++
			}
		}
		require.Equal(t, 2, launchers, name)
	}
	require.Empty(t, s.Violations())
}
