package recovery_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/integration/sim"
)

// TestStormPauseExclude: three of four nodes fail at once: that looks like
// a partition or a control-plane fault, and the storm guard does nothing,
// saying why, even with fencing none. A pause holds new recoveries until
// resumed; a node labelled exclude-from-recovery is left alone.
func TestStormPauseExclude(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.controlPlane()
	workers := []string{"n1", "n2", "n3", "n4"}
	for _, n := range workers {
		e.node(n, sim.NodeOptions{}, false)
	}
	for i, n := range workers {
		e.vmOn(fmt.Sprintf("vm%d", i+1), n, sim.VMOptions{})
	}
	o := e.droverOptions()
	o.Fencing = recovery.FencingNone // the guards hold before any gate
	info := e.serve(o)
	dels := map[string]*deletions{}
	for _, n := range workers {
		dels[n] = e.watchDeletions(n)
	}

	t.Run("storm", func(t *testing.T) {
		for _, n := range workers[:3] {
			e.fault(n, sim.FaultDown)
		}
		for _, n := range workers[:3] {
			rec := e.recoveryOf(n, 30*time.Second, "held by the storm guard", func(r consumers.Record) bool {
				return r.Phase == "storm" && strings.Contains(r.WaitReason, "3 of 5 nodes unhealthy at once (limit 30%)")
			})
			require.Contains(t, rec.WaitReason, "no clean-up until it passes")
		}
		require.Equal(t, "1", metric(t, info.HTTPAddr, "drover_recovery_storm_active"))
		require.Equal(t, "3", metric(t, info.HTTPAddr, "drover_recovery_unhealthy_nodes"))
		e.hasEvents("Node", "", "n1", "RecoveryStormGuard")
		for _, n := range workers[:3] {
			first, names := dels[n].First()
			require.True(t, first.IsZero(), "%s: %v", n, names)
		}
		status := e.cli("recovery", "status")
		require.Contains(t, status, "recoveries: active")
		require.Contains(t, status, "storm guard")
		// The partition heals: every held recovery finds its node Ready.
		for _, n := range workers[:3] {
			e.fault(n, "")
		}
		for _, n := range workers[:3] {
			rec := e.recoveryOf(n, 60*time.Second, "finished", func(r consumers.Record) bool { return r.State.Terminal() })
			require.Equal(t, consumers.StateCancelled, rec.State, "node.ready cancels a recovery the storm guard held")
			require.Contains(t, rec.Message, "nothing was done to "+n)
		}
	})

	t.Run("pause and resume", func(t *testing.T) {
		out := e.cli("recovery", "pause", "--reason", "switch upgrade", "--by", "ops")
		require.Contains(t, out, "recoveries paused cluster-wide by ops")
		e.fault("n4", sim.FaultDown)
		rec := e.recoveryOf("n4", 30*time.Second, "paused", func(r consumers.Record) bool {
			return r.State == consumers.StateWaiting && r.Phase == "paused"
		})
		require.Contains(t, rec.WaitReason, "recoveries paused cluster-wide by ops")
		require.Contains(t, rec.WaitReason, "switch upgrade")
		require.Contains(t, e.cli("recovery", "status"), "recoveries: PAUSED by ops")
		require.Equal(t, "1", metric(t, info.HTTPAddr, "drover_recovery_paused"))
		first, names := dels["n4"].First()
		require.True(t, first.IsZero(), "%v", names)
		require.Contains(t, e.cli("recovery", "resume", "--by", "ops"), "resumed")
		rec = e.recoveryOf("n4", 30*time.Second, "recovered", succeeded)
		require.Contains(t, rec.Message, "recovered n4")
		e.runningElsewhere("vm4", "n4", 30*time.Second)
	})

	t.Run("excluded", func(t *testing.T) {
		node := "n2"
		e.updateNode(node, func(n *corev1.Node) { n.Labels[recovery.LabelExclude] = "true" })
		d := e.watchDeletions(node)
		e.fault(node, sim.FaultDown)
		e.eventually(30*time.Second, "the recovery of "+node+" finished as excluded", func() (bool, string) {
			for _, r := range e.ops(consumers.RecoveryOperationFilter(node)) {
				if r.Phase == "excluded" && r.State == consumers.StateSucceeded {
					return true, ""
				}
			}
			return false, ""
		})
		first, names := d.First()
		require.True(t, first.IsZero(), "%v", names)
	})
	e.noViolations()
}

// TestNoRoomPriorities: the other nodes cannot hold every VM of the failed
// node: the higher drover.io/restart-priority VMs run again, the others
// are reported by name and the recovery keeps waiting for room.
func TestNoRoomPriorities(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.controlPlane()
	e.node("n1", sim.NodeOptions{}, false)
	prio := map[string]int{"gold": 10, "silver": 5, "bronze-a": 0, "bronze-b": 0}
	for name, p := range prio {
		e.vm(name, sim.VMOptions{Memory: "4Gi"})
		_, err := e.s.KubeVirt.VirtualMachines(ns).Patch(e.ctx, name, types.MergePatchType,
			[]byte(fmt.Sprintf(`{"metadata":{"labels":{%q:"%d"}}}`, recovery.LabelRestartPriority, p)), metav1.PatchOptions{})
		require.NoError(t, err)
		require.Equal(t, "n1", e.running(name, 30*time.Second).Status.NodeName)
	}
	launcher := e.launcherRequests("gold")
	// Room for two of them on n2, besides KubeVirt's own pods there.
	room := launcher.Memory().Value()*2 + launcher.Memory().Value()/2
	e.node("n2", sim.NodeOptions{Memory: resource.NewQuantity(room, resource.BinarySI).String()}, false)
	o := e.droverOptions()
	o.Fencing = recovery.FencingNone
	e.serve(o)
	e.fault("n1", sim.FaultDown)

	rec := e.recoveryOf("n1", 60*time.Second, "waiting for room", func(r consumers.Record) bool {
		return r.State == consumers.StateWaiting && strings.Contains(r.WaitReason, "no room on the other nodes for")
	})
	require.Contains(t, rec.WaitReason, "default/bronze-a")
	require.Contains(t, rec.WaitReason, "default/bronze-b")
	for _, name := range []string{"gold", "silver"} {
		require.Equal(t, "n2", e.runningElsewhere(name, "n1", 10*time.Second).Status.NodeName)
	}
	prog := e.progress(rec.Key)
	require.Equal(t, "NoRoom", prog["default/bronze-a"].Phase)
	require.Equal(t, "NoRoom", prog["default/bronze-b"].Phase)
	require.Equal(t, "Running", prog["default/gold"].Phase)
	for _, name := range []string{"bronze-a", "bronze-b"} {
		require.Empty(t, e.s.Truth().GuestNodes(ns+"/"+name))
	}
	e.noViolations()
}

// launcherRequests is what VM name's launcher pod requests.
func (e *env) launcherRequests(name string) corev1.ResourceList {
	e.t.Helper()
	pods, err := e.s.Kube.CoreV1().Pods(ns).List(e.ctx, metav1.ListOptions{LabelSelector: "kubevirt.io=virt-launcher,kubevirt.io/vm=" + name})
	require.NoError(e.t, err)
	require.NotEmpty(e.t, pods.Items)
	out := corev1.ResourceList{}
	for _, c := range pods.Items[0].Spec.Containers {
		for k, v := range c.Resources.Requests {
			q := out[k]
			q.Add(v)
			out[k] = q
		}
	}
	return out
}
