package recovery_test

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/integration/sim"
	"github.com/drover-io/drover/schemas"
)

var jsonUnmarshal = json.Unmarshal

// TestNodeDown: a node powers off with two node watchers running. One
// node.notready event is published and one recovery runs; it waits at the
// fencing gate (taint mode) and deletes nothing meanwhile; a fencing
// agent's node.fenced opens it; the Always and RerunOnFailure VMs then run
// elsewhere, the Manual and Halted ones are reported; the checker's whole
// history shows no VM twice; when the node comes back drover takes its
// out-of-service taint off.
func TestNodeDown(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.controlPlane()
	e.node("n1", sim.NodeOptions{}, false)
	for name, rs := range map[string]kvv1.VirtualMachineRunStrategy{
		"always": kvv1.RunStrategyAlways, "rerun": kvv1.RunStrategyRerunOnFailure, "manual": kvv1.RunStrategyManual, "halted": kvv1.RunStrategyAlways,
	} {
		e.vm(name, sim.VMOptions{RunStrategy: rs})
	}
	before := map[string]types.UID{}
	for _, name := range []string{"always", "rerun", "manual", "halted"} {
		vmi := e.running(name, 30*time.Second)
		require.Equal(t, "n1", vmi.Status.NodeName)
		before[name] = vmi.UID
	}
	e.node("n2", sim.NodeOptions{}, false)

	// Every publish of a node event, duplicates included, as a core subscriber sees it.
	ids := map[string]int{}
	sub, err := e.nc.Subscribe("drover.req.node-notready.>", func(m *nats.Msg) {
		e.mu.Lock()
		ids[m.Header.Get("Nats-Msg-Id")]++
		e.mu.Unlock()
	})
	require.NoError(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })

	first := e.serve(e.droverOptions())
	e.serve(e.droverOptions())
	dels := e.watchDeletions("n1")

	e.fault("n1", sim.FaultDown)
	down := time.Now()
	// The VM switched to Halted once its node is dead is not restarted.
	_, err = e.s.KubeVirt.VirtualMachines(ns).Patch(e.ctx, "halted", types.MergePatchType, []byte(`{"spec":{"runStrategy":"Halted"}}`), metav1.PatchOptions{})
	require.NoError(t, err)

	rec := e.recoveryOf("n1", 30*time.Second, "waiting at the gate", waitingAtGate)
	require.Contains(t, rec.WaitReason, "fencing gate (taint) closed")
	// Well past detection, still nothing deleted: the gate holds.
	e.eventually(30*time.Second, "two more gate checks", func() (bool, string) {
		r := e.ops(rec.Key)
		return len(r) == 1 && r[0].Updated.After(rec.Updated.Add(2*time.Second)), ""
	})
	first0, names := dels.First()
	require.True(t, first0.IsZero(), "pods deleted before the gate opened: %v", names)
	e.mu.Lock()
	require.Len(t, ids, 1, "two node watchers publish one node.notready (the same message id)")
	e.mu.Unlock()

	out := e.cli("node", "fenced", "n1", "--method", "ipmi-power-off", "--by", "fence-agent")
	require.Contains(t, out, schemas.TypeNodeFenced)
	rec = e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
	gate := gateOpened(t, rec)
	first0, _ = dels.First()
	require.False(t, first0.IsZero())
	require.False(t, first0.Before(gate), "a pod was deleted at %s, before the gate opened at %s", first0, gate)

	for _, name := range []string{"always", "rerun"} {
		vmi := e.runningElsewhere(name, "n1", 10*time.Second)
		require.Equal(t, "n2", vmi.Status.NodeName)
		require.NotEqual(t, before[name], vmi.UID)
	}
	for _, name := range []string{"manual", "halted"} {
		require.Empty(t, e.s.Truth().GuestNodes(ns+"/"+name), "%s does not run anywhere", name)
	}
	require.Contains(t, rec.Message, "recovered n1: 2 VMs Running elsewhere")
	require.Contains(t, rec.Message, "default/halted (Halted)")
	require.Contains(t, rec.Message, "default/manual (Manual)")
	require.Regexp(t, `detected .* after the last heartbeat, gate opened \+.* \(taint\), cleaned up \+.*, all Running \+`, rec.Message)
	prog := e.progress(rec.Key)
	require.Equal(t, "Running", prog["default/always"].Phase)
	require.Equal(t, "n2", prog["default/always"].Node)
	require.Equal(t, "Stopped", prog["default/manual"].Phase)
	t.Logf("node down -> all Running: %s; %s", time.Since(down).Round(time.Millisecond), rec.Message)

	n1, err := e.s.Kube.CoreV1().Nodes().Get(e.ctx, "n1", metav1.GetOptions{})
	require.NoError(t, err)
	require.True(t, hasTaint(n1, recovery.TaintOutOfService), "drover turned node.fenced into the taint")
	require.Equal(t, rec.Key, n1.Annotations[recovery.AnnotationTaintedBy])
	e.hasEvents("Node", "", "n1", "FencingGateOpened", "RecoveryCleanedUp", "RecoveryCompleted")
	e.hasEvents("VirtualMachine", ns, "always", "RestartedAfterNodeFailure")
	e.hasEvents("VirtualMachine", ns, "manual", "NotRestartedAfterNodeFailure")
	require.Equal(t, "0", metric(t, first.HTTPAddr, "drover_recovery_storm_active"))

	// The node comes back: node.ready, and the taint comes off once it holds
	// no VM pod from before.
	e.fault("n1", "")
	e.eventually(60*time.Second, "the out-of-service taint removed", func() (bool, string) {
		n, err := e.s.Kube.CoreV1().Nodes().Get(e.ctx, "n1", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return !hasTaint(n, recovery.TaintOutOfService) && n.Annotations[recovery.AnnotationTaintedBy] == "", fmt.Sprint(n.Spec.Taints)
	})
	e.hasEvents("Node", "", "n1", "OutOfServiceTaintRemoved")
	readyOps := e.ops("ready.>")
	require.NotEmpty(t, readyOps)
	for _, r := range readyOps {
		require.Equal(t, consumers.StateSucceeded, r.State, r.Message)
	}
	require.Len(t, e.ops(consumers.RecoveryOperationFilter("n1")), 1, "one incident, one recovery")
	e.noViolations()
}

func hasTaint(n *corev1.Node, key string) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == key {
			return true
		}
	}
	return false
}
