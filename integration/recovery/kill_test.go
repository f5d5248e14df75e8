package recovery_test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	admissionv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/sim"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// droverBinary builds cmd/drover once per test binary.
func droverBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "drover-bin-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "drover")
		out, err := exec.Command("go", "build", "-o", binPath, "../../cmd/drover").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build ./cmd/drover: %v\n%s", err, out)
		}
	})
	require.NoError(t, buildErr)
	return binPath
}

// process is `drover serve` as its own process, so that a test can kill it.
type process struct {
	cmd *exec.Cmd
	log string
}

func (e *env) serveProcess(name string, extra ...string) *process {
	e.t.Helper()
	o := e.droverOptions()
	args := []string{"serve", "--nats-url", o.NATSURL, "--kubeconfig", o.Kubeconfig, "--http-listen", "127.0.0.1:0",
		"--node-lease-timeout", o.NodeLeaseTimeout.String(), "--watchdog-timeout", o.WatchdogTimeout.String(),
		"--watchdog-margin", o.WatchdogMargin.String(), "--ack-wait", "6s", "--shutdown-grace", "2s"}
	args = append(args, extra...)
	logPath := filepath.Join(e.t.TempDir(), name+".log")
	f, err := os.Create(logPath)
	require.NoError(e.t, err)
	cmd := exec.Command(droverBinary(e.t), args...)
	cmd.Stdout, cmd.Stderr = f, f
	require.NoError(e.t, cmd.Start())
	p := &process{cmd: cmd, log: logPath}
	e.t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		_ = f.Close()
		if e.t.Failed() {
			b, _ := os.ReadFile(logPath)
			e.t.Logf("%s log:\n%s", name, b)
		}
	})
	e.eventually(60*time.Second, name+" serving", func() (bool, string) {
		b, _ := os.ReadFile(logPath)
		return strings.Contains(string(b), "consumers started"), ""
	})
	return p
}

func (p *process) kill(t *testing.T) {
	t.Helper()
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGKILL))
}

// restarts counts, per VM, the VMIs that ran it (their UIDs), from now on.
type restarts struct {
	mu   sync.Mutex
	uids map[string]map[types.UID]bool
}

func (r *restarts) of(name string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.uids[name])
}

func (e *env) watchRestarts() *restarts {
	e.t.Helper()
	r := &restarts{uids: map[string]map[types.UID]bool{}}
	w, err := e.s.KubeVirt.VirtualMachineInstances(ns).Watch(e.ctx, metav1.ListOptions{})
	require.NoError(e.t, err)
	e.t.Cleanup(w.Stop)
	go func() {
		for ev := range w.ResultChan() {
			vmi, ok := ev.Object.(*kvv1.VirtualMachineInstance)
			if !ok || ev.Type == watch.Deleted {
				continue
			}
			r.mu.Lock()
			if r.uids[vmi.Name] == nil {
				r.uids[vmi.Name] = map[types.UID]bool{}
			}
			r.uids[vmi.Name][vmi.UID] = true
			r.mu.Unlock()
		}
	}()
	return r
}

// nodeEventCount sums the count of drover's Events of one reason on a node.
func (e *env) nodeEventCount(node, reason string) int32 {
	n := int32(0)
	for _, ev := range e.events("Node", "", node) {
		if ev.Reason == reason {
			n += max(ev.Count, 1)
		}
	}
	return n
}

// TestKilledWhileWaitingAtTheGate: the replica holding a recovery at its
// fencing gate is killed (SIGKILL); another one takes it over and completes
// it once the fencing agent reports; nothing is done twice.
func TestKilledWhileWaitingAtTheGate(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.controlPlane()
	e.node("n1", sim.NodeOptions{}, false)
	for _, name := range []string{"a", "b"} {
		e.vm(name, sim.VMOptions{})
		require.Equal(t, "n1", e.running(name, 30*time.Second).Status.NodeName)
	}
	e.node("n2", sim.NodeOptions{}, false)
	vmis := e.watchRestarts()
	first := e.serveProcess("drover-a")
	e.fault("n1", sim.FaultDown)
	rec := e.recoveryOf("n1", 30*time.Second, "waiting at the gate", waitingAtGate)
	e.serveProcess("drover-b")
	first.kill(t)
	e.cli("node", "fenced", "n1", "--method", "ipmi-power-off")
	rec = e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
	for _, name := range []string{"a", "b"} {
		require.Equal(t, "n2", e.runningElsewhere(name, "n1", 30*time.Second).Status.NodeName)
		require.Equal(t, 2, vmis.of(name), "%s ran as its first VMI and once more", name)
	}
	require.Equal(t, 1, rec.Generation)
	e.hasEvents("Node", "", "n1", "FencingGateOpened", "RecoveryCompleted")
	require.Equal(t, int32(1), e.nodeEventCount("n1", "FencingGateOpened"))
	e.noViolations()
}

// TestKilledWhileCleaningUp: the replica cleaning up a dead node is killed
// (SIGKILL) in the middle (a policy makes one virt-launcher pod's deletion
// fail, so the clean-up is caught halfway); another replica resumes it from
// its checkpoint and completes it; nothing is done twice.
func TestKilledWhileCleaningUp(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.controlPlane()
	e.node("n1", sim.NodeOptions{}, false)
	for _, name := range []string{"a", "b", "held"} {
		o := sim.VMOptions{}
		if name == "held" {
			o.Labels = map[string]string{"test.drover.io/hold": "true"}
		}
		e.vm(name, o)
		require.Equal(t, "n1", e.running(name, 30*time.Second).Status.NodeName)
	}
	e.node("n2", sim.NodeOptions{}, false)
	e.holdPodDeletes()
	vmis := e.watchRestarts()
	first := e.serveProcess("drover-a", "--fencing", "none")
	e.fault("n1", sim.FaultDown)
	e.recoveryOf("n1", 60*time.Second, "caught in its clean-up", func(r consumers.Record) bool {
		return r.Phase == "cleaning-up" && strings.Contains(r.LastError, "held by the test")
	})
	e.serveProcess("drover-b", "--fencing", "none")
	first.kill(t)
	e.releasePodDeletes()
	rec := e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
	for _, name := range []string{"a", "b", "held"} {
		require.Equal(t, "n2", e.runningElsewhere(name, "n1", 30*time.Second).Status.NodeName)
		require.Equal(t, 2, vmis.of(name), "%s ran as its first VMI and once more", name)
	}
	require.Greater(t, rec.Attempts, 1, "resumed by another attempt")
	require.Equal(t, 1, rec.Generation)
	e.hasEvents("Node", "", "n1", "FencingGateOpened", "RecoveryCleanedUp", "RecoveryCompleted")
	require.Equal(t, int32(1), e.nodeEventCount("n1", "FencingGateOpened"), "the gate opened once")
	require.Equal(t, int32(1), e.nodeEventCount("n1", "RecoveryCleanedUp"), "cleaned up once")
	e.noViolations()
}

const holdPolicy = "test-hold-pod-deletes"

// holdPodDeletes installs a ValidatingAdmissionPolicy that refuses to
// delete pods labelled test.drover.io/hold=true.
func (e *env) holdPodDeletes() {
	e.t.Helper()
	adm := e.s.Kube.AdmissionregistrationV1()
	fail := admissionv1.Fail
	_, err := adm.ValidatingAdmissionPolicies().Create(e.ctx, &admissionv1.ValidatingAdmissionPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: holdPolicy},
		Spec: admissionv1.ValidatingAdmissionPolicySpec{
			FailurePolicy: &fail,
			MatchConstraints: &admissionv1.MatchResources{ResourceRules: []admissionv1.NamedRuleWithOperations{{
				RuleWithOperations: admissionv1.RuleWithOperations{
					Operations: []admissionv1.OperationType{admissionv1.Delete},
					Rule:       admissionv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"pods"}},
				},
			}}},
			Validations: []admissionv1.Validation{{
				Expression: `!has(oldObject.metadata.labels) || !('test.drover.io/hold' in oldObject.metadata.labels)`,
				Message:    "held by the test",
			}},
		},
	}, metav1.CreateOptions{})
	require.NoError(e.t, err)
	_, err = adm.ValidatingAdmissionPolicyBindings().Create(e.ctx, &admissionv1.ValidatingAdmissionPolicyBinding{
		ObjectMeta: metav1.ObjectMeta{Name: holdPolicy},
		Spec:       admissionv1.ValidatingAdmissionPolicyBindingSpec{PolicyName: holdPolicy, ValidationActions: []admissionv1.ValidationAction{admissionv1.Deny}},
	}, metav1.CreateOptions{})
	require.NoError(e.t, err)
	// The policy takes effect once the API server has loaded it.
	probe := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "hold-probe", Namespace: ns, Labels: map[string]string{"test.drover.io/hold": "true"}},
		Spec: corev1.PodSpec{NodeName: "cp", Containers: []corev1.Container{{Name: "c", Image: "none"}}}}
	_, err = e.s.Kube.CoreV1().Pods(ns).Create(e.ctx, probe, metav1.CreateOptions{})
	require.NoError(e.t, err)
	e.eventually(30*time.Second, "the hold policy in force", func() (bool, string) {
		err := e.s.Kube.CoreV1().Pods(ns).Delete(e.ctx, "hold-probe", metav1.DeleteOptions{DryRun: []string{metav1.DryRunAll}})
		return err != nil && strings.Contains(err.Error(), "held by the test"), fmt.Sprint(err)
	})
}

func (e *env) releasePodDeletes() {
	e.t.Helper()
	require.NoError(e.t, e.s.Kube.AdmissionregistrationV1().ValidatingAdmissionPolicyBindings().Delete(e.ctx, holdPolicy, metav1.DeleteOptions{}))
}
