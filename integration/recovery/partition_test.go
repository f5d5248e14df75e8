package recovery_test

import (
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/integration/sim"
)

// partitioned builds cp, n1 with two VMs (one on an RWO disk) and n2, and
// cuts n1 off: heartbeats stop, its guests keep running.
func partitioned(t *testing.T, e *env, n1 sim.NodeOptions) {
	t.Helper()
	e.controlPlane()
	e.node("n1", n1, false)
	_, err := e.s.Kube.CoreV1().PersistentVolumeClaims(ns).Create(e.ctx, sim.NewPVC(ns, "disk", "10Gi", corev1.ReadWriteOnce), metav1.CreateOptions{})
	require.NoError(t, err)
	e.vm("db", sim.VMOptions{Disk: "disk"})
	e.vm("web", sim.VMOptions{})
	for _, vm := range []string{"db", "web"} {
		require.Equal(t, "n1", e.running(vm, 30*time.Second).Status.NodeName)
	}
	e.node("n2", sim.NodeOptions{}, false)
}

// TestPartitionedTaintMode: in taint mode time alone never opens the gate,
// however long a partitioned node stays silent; a person powers it off and
// puts the out-of-service taint on with kubectl, and only then drover acts.
func TestPartitionedTaintMode(t *testing.T) {
	e := newEnv(t, envOptions{})
	partitioned(t, e, sim.NodeOptions{})
	e.serve(e.droverOptions())
	dels := e.watchDeletions("n1")
	e.fault("n1", sim.FaultPartitioned)

	rec := e.recoveryOf("n1", 30*time.Second, "waiting at the gate", waitingAtGate)
	// Longer than a watchdog would take (60 s + 15 s simulated): still shut.
	waitedFrom := time.Now()
	e.eventually(30*time.Second, "the gate checked for longer than a watchdog takes", func() (bool, string) {
		r := e.ops(rec.Key)
		return len(r) == 1 && waitingAtGate(r[0]) && r[0].Updated.Sub(waitedFrom) > e.scaled(80*time.Second), r[0].WaitReason
	})
	first, names := dels.First()
	require.True(t, first.IsZero(), "deleted while the gate was shut: %v", names)
	require.Equal(t, []string{"n1"}, e.s.Truth().GuestNodes(ns+"/db"), "the cut-off guest still runs")

	e.fault("n1", sim.FaultDown) // the person makes sure it is off...
	e.eventually(10*time.Second, "n1 off", func() (bool, string) {
		return len(e.s.Truth().GuestNodes(ns+"/db")) == 0, string(e.s.NodeState("n1"))
	})
	out, err := exec.CommandContext(e.ctx, kubectl(), "--kubeconfig", e.c.Kubeconfig, "taint", "node", "n1",
		recovery.TaintOutOfService+"=nodeshutdown:NoExecute").CombinedOutput() // ...then says so
	require.NoError(t, err, string(out))

	rec = e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
	require.Contains(t, rec.Message, "gate opened")
	require.Contains(t, rec.Message, "(taint)")
	for _, vm := range []string{"db", "web"} {
		require.Equal(t, "n2", e.runningElsewhere(vm, "n1", 30*time.Second).Status.NodeName)
	}
	n1, err := e.s.Kube.CoreV1().Nodes().Get(e.ctx, "n1", metav1.GetOptions{})
	require.NoError(t, err)
	require.Empty(t, n1.Annotations[recovery.AnnotationTaintedBy], "the person's taint is not drover's to remove")
	e.eventually(10*time.Second, "the node watcher published node.fenced for the person's taint", func() (bool, string) {
		return len(e.ops("fenced.>")) == 1, ""
	})
	e.noViolations()
}

// TestPartitionedWatchdogMode: in watchdog mode drover acts only once the
// node has fenced itself (the simulator's watchdog rebooted it).
func TestPartitionedWatchdogMode(t *testing.T) {
	e := newEnv(t, envOptions{})
	partitioned(t, e, sim.NodeOptions{WatchdogTimeout: 60 * time.Second})
	o := e.droverOptions()
	o.Fencing = recovery.FencingWatchdog
	e.serve(o)
	dels := e.watchDeletions("n1")

	var mu sync.Mutex
	var fenced time.Time
	stop := make(chan struct{})
	t.Cleanup(func() { close(stop) })
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			if e.s.NodeState("n1") == sim.NodeFenced {
				mu.Lock()
				if fenced.IsZero() {
					fenced = time.Now()
				}
				mu.Unlock()
			}
		}
	}()
	e.fault("n1", sim.FaultPartitioned)
	rec := e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
	require.Contains(t, rec.Message, "(watchdog)")
	for _, vm := range []string{"db", "web"} {
		require.Equal(t, "n2", e.runningElsewhere(vm, "n1", 30*time.Second).Status.NodeName)
	}
	first, _ := dels.First()
	mu.Lock()
	defer mu.Unlock()
	require.False(t, fenced.IsZero(), "the node fenced itself")
	require.False(t, first.IsZero())
	require.True(t, first.After(fenced), "first deletion %s, node fenced %s", first.Format("15:04:05.000"), fenced.Format("15:04:05.000"))
	require.True(t, gateOpened(t, rec).After(fenced))
	n1, err := e.s.Kube.CoreV1().Nodes().Get(e.ctx, "n1", metav1.GetOptions{})
	require.NoError(t, err)
	require.True(t, hasTaint(n1, recovery.TaintOutOfService), "drover put the taint on a node that fenced itself")
	e.noViolations()
}

// TestPartitionedNoneMode: without a fencing gate drover releases a
// partitioned node's VMs while their guests still run: the checker sees the
// VMs run twice. It is the only mode that lets this happen: the gates are
// what protect.
func TestPartitionedNoneMode(t *testing.T) {
	e := newEnv(t, envOptions{})
	partitioned(t, e, sim.NodeOptions{})
	o := e.droverOptions()
	o.Fencing = recovery.FencingNone
	e.serve(o)
	e.fault("n1", sim.FaultPartitioned)
	rec := e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
	require.Contains(t, rec.Message, "UNSAFE")
	require.Contains(t, rec.Message, "(none)")
	e.hasEvents("Node", "", "n1", "FencingGateOpened")
	for _, vm := range []string{"db", "web"} {
		require.Equal(t, "n2", e.runningElsewhere(vm, "n1", 30*time.Second).Status.NodeName)
	}
	twice := map[string]bool{}
	for _, v := range e.s.Violations() {
		if v.Kind == sim.DoubleRun {
			twice[v.Subject] = true
		}
	}
	require.Equal(t, map[string]bool{ns + "/db": true, ns + "/web": true}, twice, "both VMs ran on n1 and n2 at once: %v", e.s.Violations())
}

// kubectl is the kubectl a user would run (on the machine image).
func kubectl() string {
	if p, err := exec.LookPath("kubectl"); err == nil {
		return p
	}
	return "/usr/bin/kubectl"
}
