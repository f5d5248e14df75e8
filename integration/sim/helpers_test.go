package sim

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/integration/cluster"
)

const testNS = "default"

// updateNode changes node name with f, retrying on conflicts (the
// simulator's kubelets write nodes all the time).
func updateNode(t *testing.T, s *Simulator, name string, f func(*corev1.Node)) {
	t.Helper()
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := s.Kube.CoreV1().Nodes().Get(ctxT(t), name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		f(n)
		_, err = s.Kube.CoreV1().Nodes().Update(ctxT(t), n, metav1.UpdateOptions{})
		return err
	})
	require.NoError(t, err)
}

// startSim starts a cluster and a simulator on it; both stop when the test
// ends, and the test fails if Run does not return in time or with an error.
// setTimeFormat sets zerolog's global time format once: parallel tests log
// while later ones start, and the global is not safe to write meanwhile.
var setTimeFormat sync.Once

func startSim(t *testing.T, opts Options) *Simulator {
	t.Helper()
	// Each test has its own control plane and simulator, so they can run
	// in parallel (up to -parallel, GOMAXPROCS by default).
	t.Parallel()
	c := cluster.StartT(t)
	if opts.TimeScale == 0 {
		opts.TimeScale = 20
	}
	if opts.Logger == nil {
		setTimeFormat.Do(func() { zerolog.TimeFieldFormat = "15:04:05.000" })
		lvl := zerolog.InfoLevel
		if os.Getenv("SIM_DEBUG") != "" {
			lvl = zerolog.DebugLevel
		}
		l := zerolog.New(zerolog.NewTestWriter(t)).Level(lvl).With().Timestamp().Logger()
		opts.Logger = &l
	}
	return runSim(t, c, opts)
}

// runSim runs a simulator with opts on cluster c until the test ends and
// returns it once it is ready; Run must return within 30 s of the end.
func runSim(t *testing.T, c *cluster.Cluster, opts Options) *Simulator {
	t.Helper()
	return StartT(t, c.Config, opts)
}

// eventually polls cond (reading the simulator's caches or the API) until it
// holds or timeout passes; the last message explains a failure.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		ok, msg := cond()
		if ok {
			return
		}
		last = msg
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %s", timeout, what, last)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func mustNode(t *testing.T, s *Simulator, name string, o NodeOptions) {
	t.Helper()
	_, err := s.CreateNode(ctxT(t), NewNode(name, o))
	require.NoError(t, err)
}

// controlPlaneOn places both replicas of virt-api and virt-controller on node.
func controlPlaneOn(node string) KubeVirtPods {
	return KubeVirtPods{VirtAPI: []string{node, node}, VirtController: []string{node, node}}
}

// mustControlPlaneNodes creates nodes for KubeVirt's own pods (see controlPlaneOn), cordoned
// so that no VM lands there, and waits until virt-api answers and virt-controller leads: the
// tests that break other nodes keep KubeVirt's control plane out of harm's way.
func mustControlPlaneNodes(t *testing.T, s *Simulator, names ...string) {
	t.Helper()
	for _, name := range names {
		mustNode(t, s, name, NodeOptions{})
		updateNode(t, s, name, func(n *corev1.Node) { n.Spec.Unschedulable = true })
	}
	waitControlPlane(t, s, 30*time.Second)
}

// waitControlPlane waits until virt-api answers and virt-controller's controllers act.
func waitControlPlane(t *testing.T, s *Simulator, timeout time.Duration) {
	t.Helper()
	eventually(t, timeout, "KubeVirt's control plane up", func() (bool, string) {
		ok, why := s.virtAPIAvailable()
		return ok && s.virtControllerActive(), fmt.Sprintf("virt-api: %v %s; virt-controller acting: %v", ok, why, s.virtControllerActive())
	})
}

func mustVM(t *testing.T, s *Simulator, name string, o VMOptions) {
	t.Helper()
	_, err := s.CreateKubeVirtVM(ctxT(t), NewKubeVirtVM(testNS, name, o))
	require.NoError(t, err)
}

func mustPVC(t *testing.T, s *Simulator, name string, mode corev1.PersistentVolumeAccessMode) {
	t.Helper()
	_, err := s.Kube.CoreV1().PersistentVolumeClaims(testNS).Create(ctxT(t), NewPVC(testNS, name, "10Gi", mode), metav1.CreateOptions{})
	require.NoError(t, err)
}

// vmiRunningOn waits until VMI name runs (API: phase Running, Ready) and
// returns its node.
func vmiRunning(t *testing.T, s *Simulator, name string, timeout time.Duration) *kvv1.VirtualMachineInstance {
	t.Helper()
	var out *kvv1.VirtualMachineInstance
	eventually(t, timeout, "vmi "+name+" Running", func() (bool, string) {
		vmi := s.getVMI(testNS + "/" + name)
		if vmi == nil {
			return false, "no vmi"
		}
		c := vmiCondition(vmi, kvv1.VirtualMachineInstanceReady)
		if vmi.Status.Phase != kvv1.Running || c == nil || c.Status != corev1.ConditionTrue || vmi.DeletionTimestamp != nil {
			return false, fmt.Sprintf("phase %s conditions %+v", vmi.Status.Phase, vmi.Status.Conditions)
		}
		out = vmi
		return true, ""
	})
	return out
}

func vmiPods(s *Simulator, name string) []*corev1.Pod {
	return s.podsBy(byVMI, testNS+"/"+name)
}
