package recovery_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/sim"
	"github.com/drover-io/drover/schemas"
)

// TestControlPlaneOnTheDeadNode: both virt-controller replicas ran on the
// node that died. The classic runbook's first steps (force-delete the
// node's virt-launcher pods, delete its volume attachments) bring nothing
// back: with no virt-controller nothing restarts. drover's clean-up starts
// with KubeVirt's own pods stuck there, and the VMs come back.
func TestControlPlaneOnTheDeadNode(t *testing.T) {
	e := newEnv(t, envOptions{KubeVirtPods: &sim.KubeVirtPods{VirtAPI: []string{"cp", "cp"}, VirtController: []string{"n1", "n1"}}})
	e.node("cp", sim.NodeOptions{}, true)
	e.node("n1", sim.NodeOptions{}, false)
	e.waitKubeVirt()
	for _, name := range []string{"a", "b"} {
		e.vm(name, sim.VMOptions{})
		require.Equal(t, "n1", e.running(name, 30*time.Second).Status.NodeName)
	}
	e.node("n2", sim.NodeOptions{}, false)
	e.serve(e.droverOptions())
	e.fault("n1", sim.FaultDown)
	e.recoveryOf("n1", 30*time.Second, "waiting at the gate", waitingAtGate)

	// The runbook without its control-plane step, by hand.
	pods, err := e.s.Kube.CoreV1().Pods(metav1.NamespaceAll).List(e.ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.nodeName", "n1").String()})
	require.NoError(t, err)
	launchers := 0
	for _, p := range pods.Items {
		if p.Labels[kvv1.AppLabel] == "virt-launcher" {
			require.NoError(t, e.s.Kube.CoreV1().Pods(p.Namespace).Delete(e.ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0))}))
			launchers++
		}
	}
	require.Equal(t, 2, launchers)
	vas, err := e.s.Kube.StorageV1().VolumeAttachments().List(e.ctx, metav1.ListOptions{})
	require.NoError(t, err)
	for _, va := range vas.Items {
		if va.Spec.NodeName == "n1" {
			require.NoError(t, e.s.Kube.StorageV1().VolumeAttachments().Delete(e.ctx, va.Name, metav1.DeleteOptions{}))
		}
	}
	require.Never(t, func() bool {
		for _, name := range []string{"a", "b"} {
			vmi, err := e.s.KubeVirt.VirtualMachineInstances(ns).Get(e.ctx, name, metav1.GetOptions{})
			if err == nil && vmi.Status.NodeName != "n1" && vmi.Status.Phase == kvv1.Running {
				return true
			}
		}
		return false
	}, e.scaled(90*time.Second), 20*time.Millisecond, "with both virt-controllers on the dead node, nothing restarts for a simulated minute and a half")

	e.cli("node", "fenced", "n1", "--method", "ipmi-power-off")
	rec := e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
	require.Contains(t, incidentOf(t, rec)["cleanup"], "force-deleted KubeVirt control-plane pods kubevirt/virt-controller-")
	for _, name := range []string{"a", "b"} {
		require.Equal(t, "n2", e.runningElsewhere(name, "n1", 30*time.Second).Status.NodeName)
	}
	e.noViolations()
}

// TestMigrationFromTheDeadNode: a migration was running from the node when
// it died; it would hang and hold its slot. The recovery deletes it, the
// slot is free again and the VM restarts elsewhere.
func TestMigrationFromTheDeadNode(t *testing.T) {
	e := newEnv(t, envOptions{Sim: func(o *sim.Options) { o.MigrationBandwidth = 16 << 20 }})
	e.controlPlane()
	e.node("n1", sim.NodeOptions{}, false)
	e.vm("big", sim.VMOptions{Memory: "8Gi"})
	e.vm("small", sim.VMOptions{})
	for _, name := range []string{"big", "small"} {
		require.Equal(t, "n1", e.running(name, 30*time.Second).Status.NodeName)
	}
	e.node("n2", sim.NodeOptions{}, false)
	_, err := e.s.KubeVirt.VirtualMachineInstanceMigrations(ns).Create(e.ctx, &kvv1.VirtualMachineInstanceMigration{
		ObjectMeta: metav1.ObjectMeta{Name: "move-big"}, Spec: kvv1.VirtualMachineInstanceMigrationSpec{VMIName: "big"}}, metav1.CreateOptions{})
	require.NoError(t, err)
	e.eventually(30*time.Second, "the migration running", func() (bool, string) {
		m, err := e.s.KubeVirt.VirtualMachineInstanceMigrations(ns).Get(e.ctx, "move-big", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return m.Status.Phase == kvv1.MigrationRunning, string(m.Status.Phase)
	})
	e.serve(e.droverOptions())
	e.fault("n1", sim.FaultDown)
	e.recoveryOf("n1", 30*time.Second, "waiting at the gate", waitingAtGate)
	total, perNode := e.s.InFlightMigrations()
	require.Equal(t, 1, total, "the migration hangs, holding its slot")
	require.Equal(t, 1, perNode["n1"])

	e.cli("node", "fenced", "n1", "--method", "ipmi-power-off")
	rec := e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
	require.Contains(t, incidentOf(t, rec)["cleanup"], "deleted migrations default/move-big")
	e.eventually(30*time.Second, "the migration gone and its slot free", func() (bool, string) {
		_, err := e.s.KubeVirt.VirtualMachineInstanceMigrations(ns).Get(e.ctx, "move-big", metav1.GetOptions{})
		total, _ := e.s.InFlightMigrations()
		return apierrors.IsNotFound(err) && total == 0, fmt.Sprintf("get: %v, in flight %d", err, total)
	})
	for _, name := range []string{"big", "small"} {
		require.Equal(t, "n2", e.runningElsewhere(name, "n1", 30*time.Second).Status.NodeName)
	}
	e.noViolations()
}

// TestStaleAndCancelled: an event about a node that is Ready does nothing;
// a node.ready the live cluster contradicts (a resolved alert while the
// node is still dead) cancels nothing; the node really coming back before
// the gate opens cancels the recovery.
func TestStaleAndCancelled(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.controlPlane()
	e.node("n1", sim.NodeOptions{}, false)
	e.vm("a", sim.VMOptions{})
	before := e.running("a", 30*time.Second)
	e.node("n2", sim.NodeOptions{}, false)
	e.serve(e.droverOptions())
	dels := e.watchDeletions("n1")

	t.Run("stale", func(t *testing.T) {
		e.publishNotReady("n1", time.Now().Add(-time.Minute).UTC())
		rec := e.recoveryOf("n1", 30*time.Second, "finished", func(r consumers.Record) bool { return r.State.Terminal() })
		require.Equal(t, consumers.StateSucceeded, rec.State)
		require.Contains(t, rec.Message, "stale: node n1 is Ready again")
		vmi := e.running("a", time.Second)
		require.Equal(t, before.UID, vmi.UID)
		first, names := dels.First()
		require.True(t, first.IsZero(), "%v", names)
	})

	e.fault("n1", sim.FaultDown)
	rec := e.recoveryOf2("n1", 30*time.Second, "waiting at the gate", waitingAtGate)

	t.Run("a node.ready the live cluster contradicts cancels nothing", func(t *testing.T) {
		ev, err := schemas.New("test/alertmanager", "resolved-1", &schemas.NodeReady{Node: "n1", Since: time.Now().UTC()})
		require.NoError(t, err)
		publish(t, e, ev)
		// It was routed (its record notes that it waits for the node, which
		// the recovery holds) and the recovery checked its gate since.
		var routed time.Time
		e.eventually(30*time.Second, "the node.ready routed", func() (bool, string) {
			for _, r := range e.ops("ready.>") {
				routed = r.Created
				return true, r.WaitReason
			}
			return false, ""
		})
		e.eventually(30*time.Second, "the recovery checked its gate since", func() (bool, string) {
			r := e.ops(rec.Key)
			return len(r) == 1 && r[0].Updated.After(routed.Add(time.Second)), ""
		})
		r := e.ops(rec.Key)
		require.Len(t, r, 1)
		require.False(t, r[0].CancelRequested, "cancelled by a contradicted node.ready")
		require.False(t, r[0].State.Terminal(), "%s", r[0].State)
	})

	t.Run("the node back before the gate ends the recovery, nothing done", func(t *testing.T) {
		e.fault("n1", "")
		// Two ways end it, both correct, whichever comes first: the node
		// watcher's node.ready cancels it (once the live node agrees), or
		// the recovery's own next look at its gate finds n1 Ready again.
		e.eventually(60*time.Second, "the recovery ended", func() (bool, string) {
			r := e.ops(rec.Key)
			return len(r) == 1 && r[0].State.Terminal(), fmt.Sprint(r[0].State, " ", r[0].Message)
		})
		r := e.ops(rec.Key)[0]
		switch r.State {
		case consumers.StateCancelled:
			require.Contains(t, r.Message, "cancelled before the fencing gate")
			require.Contains(t, r.Message, "nothing was done to n1")
		case consumers.StateSucceeded:
			require.Equal(t, "stale", r.Phase, r.Message)
			require.Contains(t, r.Message, "stale: node n1 is Ready again")
			require.Contains(t, r.Message, "nothing done")
		default:
			t.Fatalf("the recovery ended %s: %s", r.State, r.Message)
		}
		t.Logf("ended %s: %s", r.State, r.Message)
		n1, err := e.s.Kube.CoreV1().Nodes().Get(e.ctx, "n1", metav1.GetOptions{})
		require.NoError(t, err)
		require.False(t, hasTaint(n1, "node.kubernetes.io/out-of-service"))
		require.NotContains(t, reasons(e.events("Node", "", "n1")), "RecoveryCleanedUp")
	})
	e.noViolations()
}

// recoveryOf2 is recoveryOf for the second incident of a node: the
// unfinished recovery.
func (e *env) recoveryOf2(node string, timeout time.Duration, what string, cond func(r consumers.Record) bool) consumers.Record {
	e.t.Helper()
	var out consumers.Record
	e.eventually(timeout, "recovery of "+node+": "+what, func() (bool, string) {
		for _, r := range e.ops(consumers.RecoveryOperationFilter(node)) {
			if !r.State.Terminal() {
				out = r
				return cond(r), fmt.Sprintf("%s phase %q: %s", r.State, r.Phase, r.WaitReason)
			}
		}
		return false, "no unfinished recovery"
	})
	return out
}
