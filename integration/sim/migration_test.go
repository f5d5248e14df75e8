package sim

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

// setMigrations replaces spec.configuration.migrations of the KubeVirt CR
// and waits until the simulator sees it.
func setMigrations(t *testing.T, s *Simulator, m kvv1.MigrationConfiguration) {
	t.Helper()
	ctx := ctxT(t)
	kv, err := s.KubeVirt.KubeVirts(s.opts.KubeVirtNamespace).Get(ctx, kubevirtCRName, metav1.GetOptions{})
	require.NoError(t, err)
	kv.Spec.Configuration.MigrationConfiguration = &m
	kv, err = s.KubeVirt.KubeVirts(kv.Namespace).Update(ctx, kv, metav1.UpdateOptions{})
	require.NoError(t, err)
	eventually(t, 10*time.Second, "KubeVirt CR in cache", func() (bool, string) {
		obj, ok, _ := s.kvInformer.GetStore().GetByKey(keyOf(kv))
		return ok && obj.(*kvv1.KubeVirt).ResourceVersion >= kv.ResourceVersion, ""
	})
}

func newMigration(name, vmi string) *kvv1.VirtualMachineInstanceMigration {
	return &kvv1.VirtualMachineInstanceMigration{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: testNS},
		Spec:       kvv1.VirtualMachineInstanceMigrationSpec{VMIName: vmi},
	}
}

func createMigration(t *testing.T, s *Simulator, m *kvv1.VirtualMachineInstanceMigration) *kvv1.VirtualMachineInstanceMigration {
	t.Helper()
	out, err := s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Create(ctxT(t), m, metav1.CreateOptions{})
	require.NoError(t, err)
	return out
}

func waitMigrationPhase(t *testing.T, s *Simulator, name string, want kvv1.VirtualMachineInstanceMigrationPhase, timeout time.Duration) *kvv1.VirtualMachineInstanceMigration {
	t.Helper()
	var out *kvv1.VirtualMachineInstanceMigration
	eventually(t, timeout, "migration "+name+" "+string(want), func() (bool, string) {
		m := s.getVMIM(testNS + "/" + name)
		if m == nil {
			return false, "gone"
		}
		out = m
		return m.Status.Phase == want, string(m.Status.Phase)
	})
	return out
}

func phasesOf(m *kvv1.VirtualMachineInstanceMigration) []kvv1.VirtualMachineInstanceMigrationPhase {
	var out []kvv1.VirtualMachineInstanceMigrationPhase
	for _, ts := range m.Status.PhaseTransitionTimestamps {
		out = append(out, ts.Phase)
	}
	return out
}

// TestMigrations covers the migration engine on one cluster: the phases of
// a successful migration and the handover, abort by deletion, the ways a
// migration fails, and the concurrency limits.
func TestMigrations(t *testing.T) {
	s := startSim(t, Options{MigrationUnschedulableTimeout: 60 * time.Second})
	ctx := ctxT(t)
	for _, n := range []string{"m1", "m2", "m3"} {
		mustNode(t, s, n, NodeOptions{})
	}

	t.Run("phases and handover", func(t *testing.T) {
		mustPVC(t, s, "shared", corev1.ReadWriteMany)
		mustVM(t, s, "mig", VMOptions{Memory: "2Gi", Disk: "shared"})
		before := vmiRunning(t, s, "mig", 30*time.Second)
		srcPod := activePod(before, vmiPods(s, "mig"))
		require.NotNil(t, srcPod)
		createMigration(t, s, newMigration("mig-1", "mig"))
		m := waitMigrationPhase(t, s, "mig-1", kvv1.MigrationSucceeded, 30*time.Second)
		require.Equal(t, []kvv1.VirtualMachineInstanceMigrationPhase{
			kvv1.MigrationPending, kvv1.MigrationScheduling, kvv1.MigrationScheduled, kvv1.MigrationPreparingTarget,
			kvv1.MigrationTargetReady, kvv1.MigrationRunning, kvv1.MigrationSucceeded,
		}, phasesOf(m))
		vmi := s.getVMI(testNS + "/mig")
		ms := vmi.Status.MigrationState
		require.NotNil(t, ms)
		require.True(t, ms.Completed)
		require.False(t, ms.Failed)
		require.Equal(t, before.Status.NodeName, ms.SourceNode)
		require.NotEqual(t, ms.SourceNode, ms.TargetNode)
		require.Equal(t, ms.TargetNode, vmi.Status.NodeName)
		require.Equal(t, m.UID, ms.MigrationUID)
		require.NotNil(t, ms.StartTimestamp)
		require.NotNil(t, ms.EndTimestamp)
		require.NotEmpty(t, ms.TargetPod)
		require.Equal(t, vmi.Status.NodeName, vmi.Labels[kvv1.NodeNameLabel])
		require.Equal(t, []string{ms.TargetNode}, s.Truth().GuestNodes(testNS+"/mig"))
		eventually(t, 20*time.Second, "source pod completed and removed", func() (bool, string) {
			return s.getPod(keyOf(srcPod)) == nil, ""
		})
		eventually(t, 10*time.Second, "vm Running", func() (bool, string) {
			vm := s.getVM(testNS + "/mig")
			return vm.Status.PrintableStatus == kvv1.VirtualMachineStatusRunning, string(vm.Status.PrintableStatus)
		})
		require.Empty(t, s.Violations())
	})

	t.Run("deleting a running migration aborts it", func(t *testing.T) {
		setMigrations(t, s, kvv1.MigrationConfiguration{BandwidthPerMigration: ptr.To(resource.MustParse("16Mi"))})
		before := vmiRunning(t, s, "mig", 10*time.Second)
		m := createMigration(t, s, newMigration("mig-abort", "mig"))
		waitMigrationPhase(t, s, "mig-abort", kvv1.MigrationRunning, 30*time.Second)
		require.NoError(t, s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Delete(ctx, m.Name, metav1.DeleteOptions{}))
		eventually(t, 20*time.Second, "abort recorded on the VMI", func() (bool, string) {
			ms := s.getVMI(testNS + "/mig").Status.MigrationState
			if ms == nil || ms.MigrationUID != m.UID {
				return false, "no state"
			}
			return ms.AbortRequested && ms.AbortStatus == kvv1.MigrationAbortSucceeded && ms.Failed && ms.Completed, fmt.Sprintf("%+v", *ms)
		})
		eventually(t, 20*time.Second, "migration object and target pod gone", func() (bool, string) {
			for _, p := range vmiPods(s, "mig") {
				if p.Labels[kvv1.MigrationJobLabel] == string(m.UID) {
					return false, "target pod " + p.Name
				}
			}
			return s.getVMIM(testNS+"/mig-abort") == nil, "vmim still there"
		})
		vmi := s.getVMI(testNS + "/mig")
		require.Equal(t, before.Status.NodeName, vmi.Status.NodeName, "the source keeps running")
		require.Equal(t, kvv1.Running, vmi.Status.Phase)
		require.Equal(t, []string{before.Status.NodeName}, s.Truth().GuestNodes(testNS+"/mig"))
	})

	t.Run("failures", func(t *testing.T) {
		setMigrations(t, s, kvv1.MigrationConfiguration{ProgressTimeout: ptr.To(int64(30))})
		// a guest dirtying memory faster than the 1Gi/s default bandwidth
		hot := NewKubeVirtVM(testNS, "hot", VMOptions{})
		hot.Spec.Template.ObjectMeta.Annotations = map[string]string{AnnotationDirtyRate: "2Gi"}
		_, err := s.CreateKubeVirtVM(ctx, hot)
		require.NoError(t, err)
		vmiRunning(t, s, "hot", 30*time.Second)
		vmiRunning(t, s, "mig", 10*time.Second)

		nowhere := newMigration("nowhere", "mig")
		nowhere.Spec.AddedNodeSelector = map[string]string{"zone": "nowhere"}
		tests := []struct {
			name      string
			mig       *kvv1.VirtualMachineInstanceMigration
			reason    string
			atLeast   time.Duration // simulated time before it fails
			scheduled bool
		}{
			{name: "does not converge", mig: newMigration("hot-mig", "hot"), reason: "stuck for 30 seconds", atLeast: 30 * time.Second, scheduled: true},
			{name: "target unschedulable", mig: nowhere, reason: "unschedulable", atLeast: 60 * time.Second},
		}
		for _, tc := range tests {
			t.Run(tc.name, func(t *testing.T) {
				vmiName := tc.mig.Spec.VMIName
				before := s.getVMI(testNS + "/" + vmiName)
				start := time.Now()
				m := createMigration(t, s, tc.mig)
				m = waitMigrationPhase(t, s, m.Name, kvv1.MigrationFailed, 30*time.Second)
				require.GreaterOrEqual(t, time.Since(start), s.scaled(tc.atLeast))
				phases := phasesOf(m)
				require.Equal(t, tc.scheduled, len(phases) > 3 && phases[3] == kvv1.MigrationPreparingTarget, "%v", phases)
				vmi := s.getVMI(testNS + "/" + vmiName)
				require.Equal(t, kvv1.Running, vmi.Status.Phase)
				require.Equal(t, before.Status.NodeName, vmi.Status.NodeName)
				require.Equal(t, []string{before.Status.NodeName}, s.Truth().GuestNodes(testNS+"/"+vmiName))
				reason := ""
				if st := m.Status.MigrationState; st != nil {
					reason = st.FailureReason
					require.True(t, st.Failed)
				}
				if vmi.Status.MigrationState != nil && vmi.Status.MigrationState.MigrationUID == m.UID {
					require.True(t, vmi.Status.MigrationState.Failed)
					reason = vmi.Status.MigrationState.FailureReason
				}
				require.Contains(t, reason, tc.reason)
				eventually(t, 10*time.Second, "no target pod left", func() (bool, string) {
					for _, p := range vmiPods(s, vmiName) {
						if p.Labels[kvv1.MigrationJobLabel] == string(m.UID) {
							return false, p.Name
						}
					}
					return true, ""
				})
			})
		}
	})

	t.Run("limits are never exceeded with 20 queued", func(t *testing.T) {
		const perCluster, perNode = 5, 2 // KubeVirt's defaults
		// 1Gi at 16Mi/s is 64 s simulated, over 3 s real at TimeScale 20:
		// the first five are admitted long before any of them ends, even on
		// a loaded machine, so both limits are reached.
		setMigrations(t, s, kvv1.MigrationConfiguration{BandwidthPerMigration: ptr.To(resource.MustParse("16Mi"))})
		cfg := s.MigrationConfig()
		require.Equal(t, perCluster, cfg.ParallelMigrationsPerCluster)
		require.Equal(t, perNode, cfg.ParallelOutboundMigrationsPerNode)
		var names []string
		for i := 0; i < 20; i++ {
			name := fmt.Sprintf("q%02d", i)
			names = append(names, name)
			mustVM(t, s, name, VMOptions{Memory: "1Gi"})
		}
		began := time.Now()
		source := map[string]string{} // VMI -> node it runs on before it migrates
		for _, n := range names {
			source[n] = vmiRunning(t, s, n, 60*time.Second).Status.NodeName
		}
		t.Logf("20 VMs running in %s", time.Since(began).Round(time.Millisecond))
		began = time.Now()
		defer func() { t.Logf("20 migrations done in %s", time.Since(began).Round(time.Millisecond)) }()
		// sample every change of every migration through a watch
		wctx, cancel := context.WithTimeout(ctx, 90*time.Second)
		defer cancel()
		w, err := s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Watch(wctx, metav1.ListOptions{LabelSelector: "test=limits"})
		require.NoError(t, err)
		defer w.Stop()
		for _, n := range names {
			m := newMigration("lim-"+n, n)
			m.Labels = map[string]string{"test": "limits"}
			createMigration(t, s, m)
		}
		state := map[types.UID]*kvv1.VirtualMachineInstanceMigration{}
		maxTotal, maxNode := 0, 0
		for done := 0; done < len(names); {
			var ev watch.Event
			select {
			case ev = <-w.ResultChan():
			case <-wctx.Done():
				t.Fatalf("migrations did not finish: %d of %d done", done, len(names))
			}
			if ev.Type == watch.Error {
				t.Fatalf("watch error: %v", apierrors.FromObject(ev.Object))
			}
			m := ev.Object.(*kvv1.VirtualMachineInstanceMigration)
			state[m.UID] = m
			total, byNode, finished := 0, map[string]int{}, 0
			for _, cur := range state {
				switch cur.Status.Phase {
				case kvv1.MigrationScheduling, kvv1.MigrationScheduled, kvv1.MigrationPreparingTarget, kvv1.MigrationTargetReady, kvv1.MigrationRunning:
					total++
					byNode[source[cur.Spec.VMIName]]++
				case kvv1.MigrationSucceeded:
					finished++
				case kvv1.MigrationFailed:
					t.Fatalf("migration %s failed: %+v", cur.Name, cur.Status.MigrationState)
				}
			}
			done = finished
			maxTotal = max(maxTotal, total)
			require.LessOrEqual(t, total, perCluster, "migrations in flight in the cluster")
			for node, n := range byNode {
				maxNode = max(maxNode, n)
				require.LessOrEqual(t, n, perNode, "outbound migrations from %s", node)
			}
			inflight, perSource := s.InFlightMigrations()
			require.LessOrEqual(t, inflight, perCluster)
			for _, n := range perSource {
				require.LessOrEqual(t, n, perNode)
			}
		}
		require.Equal(t, perCluster, maxTotal, "the cluster limit was reached (the queue was exercised)")
		require.Equal(t, perNode, maxNode, "the per-node limit was reached")
		require.Empty(t, s.Violations())
		for _, n := range names {
			require.Len(t, s.Truth().GuestNodes(testNS+"/"+n), 1, n)
		}
	})
}

// TestMigrationHandoverSourceLost: a source node that goes down between the
// last checks of a migration and the handover fails the migration; the VMI
// is not moved to the target, and no guest appears there.
func TestMigrationHandoverSourceLost(t *testing.T) {
	// KubeVirt's own pods on a third node the VM cannot use: the source that
	// dies takes only the guest with it, never virt-api (whose loss would
	// leave the outcome to the taint manager's 300 s, which is another test).
	s := startSim(t, Options{KubeVirtPods: KubeVirtPods{VirtAPI: []string{"kv", "kv"}, VirtController: []string{"kv", "kv"}}})
	ctx := ctxT(t)
	compute := map[string]string{"role": "compute"}
	for _, n := range []string{"h1", "h2"} {
		mustNode(t, s, n, NodeOptions{Labels: compute})
	}
	mustNode(t, s, "kv", NodeOptions{})
	mustVM(t, s, "ho", VMOptions{Memory: "1Gi", NodeSelector: compute})
	before := vmiRunning(t, s, "ho", 30*time.Second)
	src := before.Status.NodeName

	// The fault is injected at the handover: the hook takes the source node
	// down and returns once the simulator's node state machine has carried
	// it out (its guests are dead), then the handover goes on.
	var calls atomic.Int32
	hookErr := make(chan error, 1)
	s.migration.mu.Lock()
	s.migration.beforeHandover = func(m *kvv1.VirtualMachineInstanceMigration, source, target string) {
		if calls.Add(1) != 1 {
			return
		}
		hookErr <- func() error {
			if source != src {
				return fmt.Errorf("handover from %s, want %s", source, src)
			}
			if err := s.SetFault(ctx, source, FaultDown); err != nil {
				return err
			}
			for s.NodeState(source) != NodeDown {
				select {
				case <-ctx.Done():
					return fmt.Errorf("node %s not down: %w", source, ctx.Err())
				case <-time.After(10 * time.Millisecond):
				}
			}
			return nil
		}()
	}
	s.migration.mu.Unlock()

	createMigration(t, s, newMigration("ho-1", "ho"))
	m := waitMigrationPhase(t, s, "ho-1", kvv1.MigrationFailed, 30*time.Second)
	select {
	case err := <-hookErr:
		require.NoError(t, err)
	default:
		t.Fatal("the handover hook did not run")
	}
	require.EqualValues(t, 1, calls.Load(), "one handover attempt")
	phases := phasesOf(m)
	require.Equal(t, kvv1.MigrationRunning, phases[len(phases)-2], "%v", phases)
	require.NotNil(t, m.Status.MigrationState)
	require.True(t, m.Status.MigrationState.Failed)
	require.Contains(t, m.Status.MigrationState.FailureReason, "source node "+src+" lost during handover")

	vmi := s.getVMI(testNS + "/ho")
	require.Equal(t, before.UID, vmi.UID)
	require.Equal(t, src, vmi.Status.NodeName, "the VMI was not handed over")
	require.Equal(t, src, vmi.Labels[kvv1.NodeNameLabel])
	require.NotNil(t, vmi.Status.MigrationState)
	require.Equal(t, m.UID, vmi.Status.MigrationState.MigrationUID)
	require.True(t, vmi.Status.MigrationState.Failed)
	require.Empty(t, s.Truth().GuestNodes(testNS+"/ho"), "the guest died with its node and did not reach the target")
	eventually(t, 10*time.Second, "no target pod left", func() (bool, string) {
		for _, p := range vmiPods(s, "ho") {
			if p.Labels[kvv1.MigrationJobLabel] == string(m.UID) {
				return false, p.Name
			}
		}
		return true, ""
	})
	require.Empty(t, s.Violations())
}

// TestMigrationSourceNodeDies: a migration whose source node dies after hand-off hangs where it
// is, holding its slot (KubeVirt has no timeout after hand-off); deleting it asks for an abort
// that no virt-handler carries out. It ends when its VMI does: once the source pod is
// force-deleted, the VMI fails, the migration fails and its slot goes to the next one.
func TestMigrationSourceNodeDies(t *testing.T) {
	s := startSim(t, Options{KubeVirtPods: controlPlaneOn("cp")})
	ctx := ctxT(t)
	mustControlPlaneNodes(t, s, "cp")
	setMigrations(t, s, kvv1.MigrationConfiguration{
		ParallelMigrationsPerCluster: ptr.To(uint32(1)),
		BandwidthPerMigration:        ptr.To(resource.MustParse("16Mi")), // 4Gi: 256 s simulated
	})
	mustNode(t, s, "src", NodeOptions{})
	mustVM(t, s, "hung", VMOptions{Memory: "4Gi"})
	require.Equal(t, "src", vmiRunning(t, s, "hung", 30*time.Second).Status.NodeName)
	pool := map[string]string{"pool": "b"}
	mustNode(t, s, "b1", NodeOptions{Labels: pool})
	mustNode(t, s, "b2", NodeOptions{Labels: pool})
	mustVM(t, s, "next", VMOptions{Memory: "1Gi", NodeSelector: pool})
	vmiRunning(t, s, "next", 30*time.Second)

	hung := createMigration(t, s, newMigration("hung-1", "hung"))
	m := waitMigrationPhase(t, s, "hung-1", kvv1.MigrationRunning, 30*time.Second)
	t.Run("the migration object shows the source pod only; the VMI has the details", func(t *testing.T) {
		st := m.Status.MigrationState
		require.NotNil(t, st)
		require.NotEmpty(t, st.SourcePod)
		require.Equal(t, kvv1.VirtualMachineInstanceMigrationState{SourcePod: st.SourcePod}, *st)
		vst := s.getVMI(testNS + "/hung").Status.MigrationState
		require.NotNil(t, vst)
		require.Equal(t, hung.UID, vst.MigrationUID)
		require.Equal(t, "src", vst.SourceNode)
		require.NotEmpty(t, vst.TargetNode)
		require.NotNil(t, vst.StartTimestamp)
	})

	require.NoError(t, s.SetFault(ctx, "src", FaultDown))
	createMigration(t, s, newMigration("next-1", "next"))
	waitMigrationPhase(t, s, "next-1", kvv1.MigrationPending, 30*time.Second)
	stuck := func() bool {
		h, n := s.getVMIM(testNS+"/hung-1"), s.getVMIM(testNS+"/next-1")
		return h != nil && h.Status.Phase == kvv1.MigrationRunning && n != nil && n.Status.Phase == kvv1.MigrationPending
	}
	require.Never(t, func() bool { return !stuck() }, s.scaled(2*time.Minute), 10*time.Millisecond,
		"for two simulated minutes the migration hangs in Running and holds the only slot")
	total, perNode := s.InFlightMigrations()
	require.Equal(t, 1, total)
	require.Equal(t, map[string]int{"src": 1}, perNode)

	require.NoError(t, s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Delete(ctx, "hung-1", metav1.DeleteOptions{}))
	eventually(t, 10*time.Second, "abort requested on the VMI", func() (bool, string) {
		st := s.getVMI(testNS + "/hung").Status.MigrationState
		return st != nil && st.AbortRequested, fmt.Sprintf("%+v", st)
	})
	require.Never(t, func() bool { return !stuck() }, s.scaled(30*time.Second), 10*time.Millisecond,
		"no virt-handler aborts it: the deleted migration still holds the slot")
	require.NotNil(t, s.getVMIM(testNS+"/hung-1").DeletionTimestamp)
	require.Empty(t, s.getVMI(testNS+"/hung").Status.MigrationState.AbortStatus)

	// The source pod is force-deleted: the VMI fails, the migration with it, and the next one
	// gets the slot.
	require.Equal(t, 1, forceDeletePods(t, s, "src"))
	eventually(t, 30*time.Second, "the hung migration gone", func() (bool, string) {
		return s.getVMIM(testNS+"/hung-1") == nil, ""
	})
	waitMigrationPhase(t, s, "next-1", kvv1.MigrationSucceeded, 30*time.Second)
	eventually(t, 30*time.Second, "the hung VM restarted", func() (bool, string) {
		vmi := s.getVMI(testNS + "/hung")
		return vmi != nil && vmi.Status.Phase == kvv1.Running && vmi.Status.NodeName != "src", fmt.Sprint(vmi.Status.Phase, vmi.Status.NodeName)
	})
	require.Empty(t, s.Violations())
}

// TestMigrationAbortRace: deleting a migration after hand-off asks the source virt-handler to
// abort it. A migration far from its end is aborted (the VM stays); one whose transfer ends
// before the abort takes effect succeeds anyway (abortStatus Failed, the VM moved).
func TestMigrationAbortRace(t *testing.T) {
	// Each phase and the abort take 70 s simulated; at 16Mi/s 1Gi moves in 64 s, 8Gi in 512 s.
	s := startSim(t, Options{MigrationStepDuration: 70 * time.Second})
	ctx := ctxT(t)
	mustNode(t, s, "r1", NodeOptions{})
	mustNode(t, s, "r2", NodeOptions{})
	setMigrations(t, s, kvv1.MigrationConfiguration{BandwidthPerMigration: ptr.To(resource.MustParse("16Mi"))})
	mustVM(t, s, "far", VMOptions{Memory: "8Gi"})
	mustVM(t, s, "near", VMOptions{Memory: "1Gi"})
	before := map[string]*kvv1.VirtualMachineInstance{"far": vmiRunning(t, s, "far", 30*time.Second), "near": vmiRunning(t, s, "near", 30*time.Second)}

	for _, name := range []string{"far", "near"} {
		createMigration(t, s, newMigration(name+"-1", name))
	}
	targets := map[string]string{}
	for _, name := range []string{"far", "near"} {
		waitMigrationPhase(t, s, name+"-1", kvv1.MigrationRunning, 60*time.Second)
		require.NoError(t, s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Delete(ctx, name+"-1", metav1.DeleteOptions{}))
		targets[name] = s.getVMI(testNS + "/" + name).Status.MigrationState.TargetNode
	}
	tests := []struct {
		name        string
		abortStatus kvv1.MigrationAbortStatus
		failed      bool
		node        string
	}{
		{name: "far", abortStatus: kvv1.MigrationAbortSucceeded, failed: true, node: before["far"].Status.NodeName},
		{name: "near", abortStatus: kvv1.MigrationAbortFailed, failed: false, node: targets["near"]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var st *kvv1.VirtualMachineInstanceMigrationState
			eventually(t, 30*time.Second, "the abort settled", func() (bool, string) {
				st = s.getVMI(testNS + "/" + tt.name).Status.MigrationState
				return st != nil && st.Completed && st.AbortStatus != kvv1.MigrationAbortInProgress, fmt.Sprintf("%+v", st)
			})
			require.True(t, st.AbortRequested)
			require.Equal(t, tt.abortStatus, st.AbortStatus)
			require.Equal(t, tt.failed, st.Failed)
			eventually(t, 20*time.Second, "migration object gone", func() (bool, string) {
				return s.getVMIM(testNS+"/"+tt.name+"-1") == nil, ""
			})
			vmi := s.getVMI(testNS + "/" + tt.name)
			require.Equal(t, before[tt.name].UID, vmi.UID)
			require.Equal(t, tt.node, vmi.Status.NodeName)
			require.Equal(t, []string{tt.node}, s.Truth().GuestNodes(testNS+"/"+tt.name))
		})
	}
	require.NotEqual(t, before["near"].Status.NodeName, targets["near"])
	require.Empty(t, s.Violations())
}

// TestMigrationGarbageCollection: at most five finished migrations per VMI are kept, and the
// migrations of a VMI that is gone are deleted.
func TestMigrationGarbageCollection(t *testing.T) {
	s := startSim(t, Options{})
	ctx := ctxT(t)
	mustNode(t, s, "g1", NodeOptions{})
	mustNode(t, s, "g2", NodeOptions{})
	mustVM(t, s, "gc", VMOptions{Memory: "1Gi"})
	vmiRunning(t, s, "gc", 30*time.Second)
	const runs = 7
	for i := range runs {
		createMigration(t, s, newMigration(fmt.Sprintf("gc-%d", i), "gc"))
		waitMigrationPhase(t, s, fmt.Sprintf("gc-%d", i), kvv1.MigrationSucceeded, 30*time.Second)
	}
	eventually(t, 20*time.Second, "the five most recent kept", func() (bool, string) {
		var names []string
		for _, m := range s.migrationsForVMI(testNS, "gc") {
			names = append(names, m.Name)
		}
		sort.Strings(names)
		return slices.Equal(names, []string{"gc-2", "gc-3", "gc-4", "gc-5", "gc-6"}), fmt.Sprint(names)
	})
	require.NoError(t, s.KubeVirt.VirtualMachines(testNS).Delete(ctx, "gc", metav1.DeleteOptions{}))
	eventually(t, 30*time.Second, "the migrations of the deleted VMI deleted", func() (bool, string) {
		return s.getVMI(testNS+"/gc") == nil && len(s.migrationsForVMI(testNS, "gc")) == 0, fmt.Sprint(len(s.migrationsForVMI(testNS, "gc")))
	})
}

// TestMigrationSlotRefillWaitsForRequeue: a Pending migration that found no free slot looks
// again only after KubeVirt's requeue delay (5 s): a slot freed meanwhile waits for it.
func TestMigrationSlotRefillWaitsForRequeue(t *testing.T) {
	// Time scale 4, 2 s steps: the abort that frees the slot takes 0.5 s; the requeue 1.25 s.
	s := startSim(t, Options{TimeScale: 4, MigrationStepDuration: 2 * time.Second})
	ctx := ctxT(t)
	mustNode(t, s, "f1", NodeOptions{})
	mustNode(t, s, "f2", NodeOptions{})
	setMigrations(t, s, kvv1.MigrationConfiguration{
		ParallelMigrationsPerCluster: ptr.To(uint32(1)),
		BandwidthPerMigration:        ptr.To(resource.MustParse("16Mi")),
	})
	mustVM(t, s, "a", VMOptions{Memory: "4Gi"})
	mustVM(t, s, "b", VMOptions{Memory: "1Gi"})
	vmiRunning(t, s, "a", 30*time.Second)
	vmiRunning(t, s, "b", 30*time.Second)
	createMigration(t, s, newMigration("a-1", "a"))
	waitMigrationPhase(t, s, "a-1", kvv1.MigrationRunning, 60*time.Second)

	w, err := s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Watch(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	defer w.Stop()
	createMigration(t, s, newMigration("b-1", "b"))
	var pending, released, scheduling time.Time
	for scheduling.IsZero() {
		var ev watch.Event
		select {
		case ev = <-w.ResultChan():
		case <-ctx.Done():
			t.Fatal("no migration event")
		}
		m, ok := ev.Object.(*kvv1.VirtualMachineInstanceMigration)
		if !ok {
			t.Fatalf("watch: %v", apierrors.FromObject(ev.Object))
		}
		now := time.Now()
		switch {
		case m.Name == "b-1" && m.Status.Phase == kvv1.MigrationPending && pending.IsZero():
			pending = now
			// b-1 has looked for a slot and found none: free it.
			require.NoError(t, s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Delete(ctx, "a-1", metav1.DeleteOptions{}))
		case m.Name == "a-1" && (ev.Type == watch.Deleted || isMigrationFinal(m)) && released.IsZero():
			released = now
		case m.Name == "b-1" && m.Status.Phase == kvv1.MigrationScheduling:
			scheduling = now
		}
	}
	t.Logf("b-1 Pending, a-1 released after %s, b-1 admitted after %s", released.Sub(pending).Round(time.Millisecond), scheduling.Sub(pending).Round(time.Millisecond))
	require.False(t, released.IsZero(), "a-1 ended before b-1 was admitted")
	require.True(t, scheduling.After(released))
	require.GreaterOrEqual(t, scheduling.Sub(pending), s.scaled(migrationRequeueDelay)-100*time.Millisecond,
		"the free slot waited for b-1's next look")
	waitMigrationPhase(t, s, "b-1", kvv1.MigrationSucceeded, 60*time.Second)
}
