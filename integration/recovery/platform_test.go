package recovery_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/integration/sim"
	"github.com/drover-io/drover/schemas"
)

// deckhouseFencingController plays Deckhouse's fencing controller
// (modules/040-node-manager, node-controller's fencing reconciler): a node
// labelled node-manager.deckhouse.io/fencing-enabled whose kubelet Lease is
// older than 60 s (scaled) has every pod force-deleted, then the Node
// deleted.
func deckhouseFencingController(ctx context.Context, kube kubernetes.Interface, timeout time.Duration, acted func(node string)) {
	for ctx.Err() == nil {
		nodes, err := kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{LabelSelector: recovery.DeckhouseFencingLabel})
		if err == nil {
			for _, n := range nodes.Items {
				lease, err := kube.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, n.Name, metav1.GetOptions{})
				if err != nil || lease.Spec.RenewTime == nil || time.Since(lease.Spec.RenewTime.Time) <= timeout {
					continue
				}
				pods, err := kube.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.nodeName", n.Name).String()})
				if err != nil {
					continue
				}
				for _, p := range pods.Items {
					_ = kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0))})
				}
				if err := kube.CoreV1().Nodes().Delete(ctx, n.Name, metav1.DeleteOptions{}); err == nil {
					acted(n.Name)
				}
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// TestDeckhouse: Deckhouse virtualization with watchdog fencing on the
// node's NodeGroup. Deckhouse's own controller force-deletes the dead
// node's pods and deletes the Node once its Lease is 60 s old; drover does
// not race it (its gate waits past Deckhouse's timeout), reports what
// Deckhouse did, cleans up the rest, and waits until the AlwaysOn and
// AlwaysOnUnlessStoppedManually VMs run elsewhere; the Manual one is
// reported.
func TestDeckhouse(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.controlPlane()
	e.node("n1", sim.NodeOptions{Labels: map[string]string{recovery.DeckhouseFencingLabel: ""}}, false)
	policies := map[string]string{"ha": sim.RunPolicyAlwaysOn, "default": sim.RunPolicyAlwaysOnUnlessStoppedManually, "man": sim.RunPolicyManual}
	for name, policy := range policies {
		_, err := e.s.Kube.CoreV1().PersistentVolumeClaims(ns).Create(e.ctx, sim.NewPVC(ns, name+"-disk", "10Gi", corev1.ReadWriteMany), metav1.CreateOptions{})
		require.NoError(t, err)
		_, err = e.s.Dynamic.Resource(sim.DeckhouseVMGVR).Namespace(ns).Create(e.ctx,
			sim.NewDeckhouseVM(ns, name, sim.VMOptions{RunPolicy: policy, Disk: name + "-disk"}), metav1.CreateOptions{})
		require.NoError(t, err)
	}
	for name := range policies {
		require.Equal(t, "n1", e.deckhouseRunning(name, "", 30*time.Second))
	}
	e.node("n2", sim.NodeOptions{}, false)
	e.serve(e.droverOptions()) // default policy: taint; the Deckhouse label decides here

	acted := make(chan time.Time, 1)
	ctx, cancel := context.WithCancel(e.ctx)
	t.Cleanup(cancel)
	go deckhouseFencingController(ctx, e.s.Kube, e.scaled(recovery.DeckhouseFencingTimeout), func(string) {
		select {
		case acted <- time.Now():
		default:
		}
	})
	e.fault("n1", sim.FaultDown)
	e.recoveryOf("n1", 30*time.Second, "waiting for Deckhouse's timeout", func(r consumers.Record) bool {
		return r.Phase == "gate" && strings.Contains(r.WaitReason, "Deckhouse watchdog fencing")
	})
	rec := e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
	var deckhouseAt time.Time
	select {
	case deckhouseAt = <-acted:
	default:
		t.Fatal("Deckhouse's fencing controller never acted")
	}
	require.True(t, gateOpened(t, rec).After(deckhouseAt), "drover waited for Deckhouse")
	cleanup, _ := incidentOf(t, rec)["cleanup"].(string)
	require.Contains(t, cleanup, "had released 3 of the 3 VMs' pods before drover looked")
	for _, name := range []string{"ha", "default"} {
		require.Equal(t, "n2", e.deckhouseRunning(name, "n1", 30*time.Second))
	}
	require.Contains(t, rec.Message, "default/man (Manual)")
	_, err := e.s.Kube.CoreV1().Nodes().Get(e.ctx, "n1", metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "Deckhouse deleted the node")
	e.noViolations()
}

// deckhouseRunning waits until Deckhouse VM name is Running on a node other
// than not, and returns the node.
func (e *env) deckhouseRunning(name, not string, timeout time.Duration) string {
	e.t.Helper()
	node := ""
	e.eventually(timeout, "deckhouse vm "+name+" Running", func() (bool, string) {
		u, err := e.s.Dynamic.Resource(sim.DeckhouseVMGVR).Namespace(ns).Get(e.ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		phase, _, _ := unstructured.NestedString(u.Object, "status", "phase")
		node, _, _ = unstructured.NestedString(u.Object, "status", "nodeName")
		return phase == "Running" && node != "" && node != not, phase + " on " + node
	})
	return node
}

// TestRecoveryPreemptsMaintenance: a node under maintenance fails. The
// maintenance holds the node's lease; the recovery asks it to yield, it
// checkpoints and is suspended, and the recovery runs at once. (The
// maintenance workflow is not built yet: a stand-in handler holds the node
// the way it will, with the real runtime and the real recovery handler.)
func TestRecoveryPreemptsMaintenance(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.controlPlane()
	e.node("n1", sim.NodeOptions{}, false)
	e.vm("a", sim.VMOptions{})
	require.Equal(t, "n1", e.running("a", 30*time.Second).Status.NodeName)
	e.node("n2", sim.NodeOptions{}, false)

	kube, err := kubernetes.NewForConfig(e.c.Config)
	require.NoError(t, err)
	dyn, err := dynamic.NewForConfig(e.c.Config)
	require.NoError(t, err)
	yielded := make(chan string, 1)
	maintenance := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		// Draining n1 slowly: until pre-empted.
		select {
		case <-op.Preempted():
			if err := op.Checkpoint(ctx, "suspended", "pre-empted", nil); err != nil {
				return err
			}
			yielded <- op.PreemptedBy().By
			return consumers.Yield("node failed during maintenance")
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	})
	o := e.droverOptions()
	rcfg, err := o.RecoveryConfig()
	require.NoError(t, err)
	rcfg.Default = recovery.Policy{Fencing: recovery.FencingNone}
	rt, err := consumers.NewRuntime(e.nc, consumers.Config{AckWait: 10 * time.Second}, zerolog.Nop(), nil,
		consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: maintenance},
		consumers.Workflow{Name: schemas.WorkflowRecovery, Concurrency: 2, Resolver: &recovery.Incident{Kube: kube, LeaseTimeout: o.NodeLeaseTimeout},
			Handler: &recovery.Handler{Kube: kube, Dynamic: dyn, Config: rcfg}},
	)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rt.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("runtime did not stop")
		}
	})
	e.eventually(30*time.Second, "streams declared", func() (bool, string) {
		_, err := e.js.Stream(e.ctx, consumers.StreamRequests)
		return err == nil, fmt.Sprint(err)
	})
	e.cli("maintenance", "start", "n1", "--reason", "firmware", "--request-id", "CHG-1")
	mkey := consumers.MaintenanceOperationKey("n1", "CHG-1")
	e.eventually(30*time.Second, "the maintenance running on n1", func() (bool, string) {
		r := e.ops(mkey)
		return len(r) == 1 && r[0].State == consumers.StateRunning, ""
	})

	// n1 fails; no node watcher here: the event a producer would publish.
	e.fault("n1", sim.FaultDown)
	var since time.Time
	e.eventually(30*time.Second, "n1's lease stale", func() (bool, string) {
		l, err := kube.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(e.ctx, "n1", metav1.GetOptions{})
		if err != nil || l.Spec.RenewTime == nil {
			return false, fmt.Sprint(err)
		}
		since = l.Spec.RenewTime.Time
		return time.Since(since) > o.NodeLeaseTimeout, ""
	})
	e.publishNotReady("n1", since.UTC())
	var by string
	select {
	case by = <-yielded:
	case <-time.After(30 * time.Second):
		t.Fatal("the maintenance was not asked to yield")
	}
	require.True(t, strings.HasPrefix(by, "recovery.n1."), by)
	rec := e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
	require.Equal(t, by, rec.Key)
	require.Equal(t, "n2", e.runningElsewhere("a", "n1", 30*time.Second).Status.NodeName)
	m := e.ops(mkey)
	require.Len(t, m, 1)
	require.Contains(t, []consumers.State{consumers.StateSuspended, consumers.StateRunning, consumers.StateWaiting}, m[0].State,
		"the maintenance resumes once the recovery is done (%s)", m[0].State)
	e.noViolations()
}
