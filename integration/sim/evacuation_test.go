package sim

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	virtv1 "kubevirt.io/api/core/v1"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/drover-io/drover/integration/cluster"
)

// evTimeScale runs the simulated world five times faster than real time: migrations of 1 GiB
// guests take under a second, node heartbeats stay comfortably inside their grace period on a
// busy machine.
const evTimeScale = 5

// evEnv is a test cluster with the full simulator running on it.
type evEnv struct {
	cluster *cluster.Cluster
	sim     *Simulator
	kv      *kvPlane
}

// evStartSim starts a cluster and the simulator (TimeScale evTimeScale, then the given option
// changes); both stop when the test ends.
func evStartSim(t *testing.T, change ...func(*Options)) *evEnv {
	t.Helper()
	c := cluster.StartT(t)
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel).With().Timestamp().Logger()
	opts := Options{TimeScale: evTimeScale, Logger: &log}
	for _, f := range change {
		f(&opts)
	}
	s := runSim(t, c, opts)
	kv, err := newKVPlane(c.Config, log, nil, nil)
	require.NoError(t, err)
	e := &evEnv{cluster: c, sim: s, kv: kv}
	t.Cleanup(func() {
		if t.Failed() {
			e.dump(t)
		}
	})
	return e
}

// dump logs what kubectl shows of the cluster, to explain a failure.
func (e *evEnv) dump(t *testing.T) {
	out, err := exec.Command("/usr/bin/kubectl", "--kubeconfig", e.cluster.Kubeconfig, "get",
		"nodes,pods,vm,vmi,vmim,virtualmachines.virtualization.deckhouse.io,vmop", "-A", "-o", "wide").CombinedOutput()
	t.Logf("cluster state (err %v):\n%s", err, out)
	out, err = exec.Command("/usr/bin/kubectl", "--kubeconfig", e.cluster.Kubeconfig, "get", "kubevirt", "-A", "-o", "yaml").CombinedOutput()
	t.Logf("KubeVirt CR (err %v):\n%s", err, out)
}

// nodes creates simulated nodes; the ones in cordoned start unschedulable.
func (e *evEnv) nodes(t *testing.T, names []string, cordoned ...string) {
	t.Helper()
	for _, n := range names {
		_, err := e.sim.CreateNode(context.Background(), NewNode(n, NodeOptions{}))
		require.NoError(t, err)
	}
	for _, n := range cordoned {
		e.cordon(t, n, true)
	}
}

func (e *evEnv) cordon(t *testing.T, node string, on bool) {
	t.Helper()
	patch := fmt.Sprintf(`{"spec":{"unschedulable":%t}}`, on)
	_, err := e.kv.kube.CoreV1().Nodes().Patch(context.Background(), node, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	require.NoError(t, err)
}

// setMigrationLimits writes the KubeVirt CR's migration limits.
func (e *evEnv) setMigrationLimits(t *testing.T, perCluster, perNode uint32) {
	t.Helper()
	e.setMigrationConfig(t, func(m *virtv1.MigrationConfiguration) {
		m.ParallelMigrationsPerCluster = ptr.To(perCluster)
		m.ParallelOutboundMigrationsPerNode = ptr.To(perNode)
	})
}

// setMigrationConfig edits spec.configuration.migrations of the KubeVirt CR.
func (e *evEnv) setMigrationConfig(t *testing.T, edit func(*virtv1.MigrationConfiguration)) {
	t.Helper()
	ctx := context.Background()
	require.Eventually(t, func() bool {
		var list virtv1.KubeVirtList
		if err := e.kv.c.List(ctx, &list); err != nil || len(list.Items) == 0 {
			return false
		}
		cr := &list.Items[0]
		if cr.Spec.Configuration.MigrationConfiguration == nil {
			cr.Spec.Configuration.MigrationConfiguration = &virtv1.MigrationConfiguration{}
		}
		edit(cr.Spec.Configuration.MigrationConfiguration)
		return e.kv.c.Update(ctx, cr) == nil
	}, 20*time.Second, 100*time.Millisecond, "update the KubeVirt CR")
}

// vm creates a KubeVirt VM.
func (e *evEnv) vm(t *testing.T, ns, name string, o VMOptions) {
	t.Helper()
	require.NoError(t, e.sim.ensureNamespace(context.Background(), ns))
	_, err := e.sim.CreateKubeVirtVM(context.Background(), NewKubeVirtVM(ns, name, o))
	require.NoError(t, err)
}

// vmi returns the VMI ns/name, nil when there is none (safe to call while polling).
func (e *evEnv) vmi(t *testing.T, ns, name string) *virtv1.VirtualMachineInstance {
	t.Helper()
	vmi := &virtv1.VirtualMachineInstance{}
	err := e.kv.c.Get(context.Background(), ctrlclient.ObjectKey{Namespace: ns, Name: name}, vmi)
	if err != nil {
		// NotFound, or a transient error: callers poll.
		if !apierrors.IsNotFound(err) {
			t.Logf("get vmi %s/%s: %v", ns, name, err)
		}
		return nil
	}
	return vmi
}

// waitRunning waits until VMI ns/name is Running with a launcher pod Running (on node, when
// node is not "") and returns it.
func (e *evEnv) waitRunning(t *testing.T, ns, name, node string, timeout time.Duration) *virtv1.VirtualMachineInstance {
	t.Helper()
	var last *virtv1.VirtualMachineInstance
	evEventually(t, timeout, fmt.Sprintf("VMI %s/%s Running (on %q)", ns, name, node), func() (bool, string) {
		last = e.vmi(t, ns, name)
		if last == nil || last.Status.Phase != virtv1.Running || last.DeletionTimestamp != nil {
			return false, evDescribe(last)
		}
		if node != "" && last.Status.NodeName != node {
			return false, evDescribe(last)
		}
		pod := e.launcher(t, last)
		return pod != nil && pod.Status.Phase == corev1.PodRunning, evDescribe(last) + " (launcher pod not running)"
	})
	return last
}

// launcher returns the running virt-launcher pod of the VMI on its node, nil if none (safe to
// call while polling).
func (e *evEnv) launcher(t *testing.T, vmi *virtv1.VirtualMachineInstance) *corev1.Pod {
	t.Helper()
	pods, err := e.kv.kube.CoreV1().Pods(vmi.Namespace).List(context.Background(), metav1.ListOptions{
		LabelSelector: virtv1.CreatedByLabel + "=" + string(vmi.UID),
	})
	if err != nil {
		t.Logf("list launcher pods of %s/%s: %v", vmi.Namespace, vmi.Name, err)
		return nil
	}
	for i := range pods.Items {
		p := &pods.Items[i]
		if p.Spec.NodeName == vmi.Status.NodeName && p.DeletionTimestamp == nil && p.Status.Phase == corev1.PodRunning {
			return p
		}
	}
	return nil
}

// guestNodes is where the ground truth says the guest of VMI ns/name runs.
func (e *evEnv) guestNodes(ns, name string) []string {
	var nodes []string
	for _, g := range e.sim.Truth().Guests {
		if g.VMI == ns+"/"+name {
			nodes = append(nodes, g.Node)
		}
	}
	return nodes
}

// drain runs kubectl drain as an administrator would.
func (e *evEnv) drain(ctx context.Context, node string, timeout time.Duration) (string, time.Duration, error) {
	begin := time.Now()
	cmd := exec.CommandContext(ctx, "/usr/bin/kubectl", "--kubeconfig", e.cluster.Kubeconfig, "drain", node,
		"--pod-selector", "kubevirt.io=virt-launcher", "--ignore-daemonsets", "--delete-emptydir-data",
		"--timeout", timeout.String())
	out, err := cmd.CombinedOutput()
	return string(out), time.Since(begin), err
}

// evEventually polls cond every 50ms until it holds; when timeout passes first, the test fails
// with what and the last state cond described.
func evEventually(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, last := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; last seen: %s", timeout, what, last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func evDescribe(vmi *virtv1.VirtualMachineInstance) string {
	if vmi == nil {
		return "none"
	}
	return fmt.Sprintf("uid=%s phase=%s node=%s evacuationNodeName=%q", vmi.UID, vmi.Status.Phase, vmi.Status.NodeName, vmi.Status.EvacuationNodeName)
}

// TestKubectlDrainEvacuatesVMs drains a node with kubectl, as on a KubeVirt cluster: the
// webhook turns the evictions of LiveMigrate launchers into migrations (within the migration
// limits), the eviction of a launcher with eviction strategy None goes through and its run
// strategy restarts it elsewhere, and the drain completes.
func TestKubectlDrainEvacuatesVMs(t *testing.T) {
	e := evStartSim(t)
	e.nodes(t, []string{"node-1", "node-2", "node-3"}, "node-2", "node-3")
	e.setMigrationLimits(t, 2, 1)
	const ns = "drain"
	live := []string{"lm-1", "lm-2", "lm-3", "lm-4"}
	for _, name := range live {
		e.vm(t, ns, name, VMOptions{Memory: "1Gi"})
	}
	e.vm(t, ns, "none-1", VMOptions{Memory: "1Gi", EvictionStrategy: virtv1.EvictionStrategyNone, RunStrategy: virtv1.RunStrategyAlways})

	before := map[string]types.UID{}
	for _, name := range append(live, "none-1") {
		vmi := e.waitRunning(t, ns, name, "node-1", 60*time.Second)
		before[name] = vmi.UID
	}
	e.cordon(t, "node-2", false)
	e.cordon(t, "node-3", false)
	evWaitWebhookActive(t, e.kv, e.launcher(t, e.vmi(t, ns, "lm-1")))

	// Sample the evacuation migrations from node-1 while the drain runs: never more unfinished
	// than parallelOutboundMigrationsPerNode allows.
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	maxFromNode, created := 0, map[string]bool{}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			var migs virtv1.VirtualMachineInstanceMigrationList
			if err := e.kv.c.List(ctx, &migs, ctrlclient.InNamespace(ns)); err == nil {
				n := 0
				for _, m := range migs.Items {
					if m.Annotations[virtv1.EvacuationMigrationAnnotation] != "node-1" {
						continue
					}
					created[m.Name] = true
					if !m.IsFinal() {
						n++
					}
				}
				maxFromNode = max(maxFromNode, n)
			}
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	out, took, err := e.drain(context.Background(), "node-1", 120*time.Second)
	cancel()
	wg.Wait()
	t.Logf("kubectl drain took %s:\n%s", took.Round(time.Millisecond), out)
	require.NoError(t, err, "kubectl drain")
	require.Contains(t, out, "Eviction triggered evacuation of VMI", "the webhook answered the drain")
	require.Contains(t, out, "node/node-1 drained")
	require.LessOrEqual(t, maxFromNode, 1, "unfinished evacuation migrations from node-1 at once")
	require.GreaterOrEqual(t, len(created), len(live), "one evacuation migration per LiveMigrate VM at least")

	for _, name := range live {
		var vmi *virtv1.VirtualMachineInstance
		evEventually(t, 20*time.Second, "VMI "+name+" left node-1 and lost its mark", func() (bool, string) {
			vmi = e.vmi(t, ns, name)
			return vmi != nil && vmi.Status.Phase == virtv1.Running && vmi.Status.NodeName != "node-1" &&
				vmi.Status.EvacuationNodeName == "", evDescribe(vmi)
		})
		require.Equal(t, before[name], vmi.UID, "VMI %s was live-migrated, not restarted", name)
		require.NotNil(t, vmi.Status.MigrationState)
		require.True(t, vmi.Status.MigrationState.Completed)
		require.False(t, vmi.Status.MigrationState.Failed)
		require.Equal(t, []string{vmi.Status.NodeName}, e.guestNodes(ns, name), "ground truth of %s", name)

		var migs virtv1.VirtualMachineInstanceMigrationList
		require.NoError(t, e.kv.c.List(context.Background(), &migs, ctrlclient.InNamespace(ns), ctrlclient.MatchingLabels{virtv1.MigrationSelectorLabel: name}))
		require.NotEmpty(t, migs.Items, "evacuation migration of %s", name)
		m := migs.Items[0]
		require.True(t, strings.HasPrefix(m.Name, "kubevirt-evacuation-"), m.Name)
		require.Nil(t, m.Spec.Priority, "no priority without the MigrationPriorityQueue feature gate (GenerateNewMigration)")
	}

	// The None VM was evicted and restarted elsewhere by its run strategy.
	var none *virtv1.VirtualMachineInstance
	evEventually(t, 60*time.Second, "VM none-1 restarted on another node", func() (bool, string) {
		none = e.vmi(t, ns, "none-1")
		return none != nil && none.UID != before["none-1"] && none.Status.Phase == virtv1.Running &&
			none.Status.NodeName != "" && none.Status.NodeName != "node-1", evDescribe(none)
	})
	require.Empty(t, none.Status.EvacuationNodeName)

	pods, err := e.kv.kube.CoreV1().Pods(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "spec.nodeName=node-1"})
	require.NoError(t, err)
	require.Empty(t, pods.Items, "no pod left on the drained node")
	require.Empty(t, e.sim.Violations())
}

// TestKubectlDrainBlockedByNonMigratableVM: a LiveMigrate VM that cannot migrate (RWO disk)
// makes every eviction fail, so kubectl drain times out and the VM keeps running where it is.
func TestKubectlDrainBlockedByNonMigratableVM(t *testing.T) {
	e := evStartSim(t)
	e.nodes(t, []string{"node-1", "node-2"}, "node-2")
	const ns = "blocked"
	require.NoError(t, e.sim.ensureNamespace(context.Background(), ns))
	_, err := e.kv.kube.CoreV1().PersistentVolumeClaims(ns).Create(context.Background(), NewPVC(ns, "stuck-disk", "10Gi", corev1.ReadWriteOnce), metav1.CreateOptions{})
	require.NoError(t, err)
	e.vm(t, ns, "stuck", VMOptions{Memory: "1Gi", Disk: "stuck-disk", EvictionStrategy: virtv1.EvictionStrategyLiveMigrate})
	vmi := e.waitRunning(t, ns, "stuck", "node-1", 60*time.Second)
	require.False(t, vmi.IsMigratable(), "an RWO disk makes the VMI not live-migratable")
	e.cordon(t, "node-2", false)
	pod := e.launcher(t, vmi)
	require.NotNil(t, pod)
	evWaitWebhookActive(t, e.kv, pod)

	out, took, err := e.drain(context.Background(), "node-1", 15*time.Second)
	t.Logf("kubectl drain took %s:\n%s", took.Round(time.Millisecond), out)
	require.Error(t, err, "kubectl drain must not complete")
	require.Contains(t, out, "is configured with an eviction strategy but is not live-migratable")
	require.GreaterOrEqual(t, took, 15*time.Second)

	after := e.waitRunning(t, ns, "stuck", "node-1", 5*time.Second)
	require.Equal(t, vmi.UID, after.UID)
	require.Empty(t, after.Status.EvacuationNodeName)
	require.Equal(t, []string{"node-1"}, e.guestNodes(ns, "stuck"))
	p, err := e.kv.kube.CoreV1().Pods(ns).Get(context.Background(), pod.Name, metav1.GetOptions{})
	require.NoError(t, err)
	require.Nil(t, p.DeletionTimestamp, "the launcher pod was not evicted")
	var migs virtv1.VirtualMachineInstanceMigrationList
	require.NoError(t, e.kv.c.List(context.Background(), &migs, ctrlclient.InNamespace(ns)))
	require.Empty(t, migs.Items, "no migration for a VMI that cannot migrate")
	require.Empty(t, e.sim.Violations())
}

// TestEvacuationCandidates checks which VMIs the evacuation controller migrates (KubeVirt's
// vmisToMigrate and filterRunningNonMigratingVMIs) and its back-off after failed evacuation
// migrations, without a cluster.
func TestEvacuationCandidates(t *testing.T) {
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	kv := &kvPlane{log: zerolog.Nop(), simToWall: func(d time.Duration) time.Duration { return d / 10 }, now: func() time.Time { return now }}
	e := newEvacuationController(kv, nil)
	lm, lmip, ext, none := virtv1.EvictionStrategyLiveMigrate, virtv1.EvictionStrategyLiveMigrateIfPossible, virtv1.EvictionStrategyExternal, virtv1.EvictionStrategyNone
	vmi := func(name string, strategy *virtv1.EvictionStrategy, migratable bool, node, mark string) *virtv1.VirtualMachineInstance {
		v := &virtv1.VirtualMachineInstance{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, UID: types.UID("uid-" + name)},
			Spec:       virtv1.VirtualMachineInstanceSpec{EvictionStrategy: strategy},
			Status:     virtv1.VirtualMachineInstanceStatus{Phase: virtv1.Running, NodeName: node, EvacuationNodeName: mark},
		}
		status := corev1.ConditionFalse
		if migratable {
			status = corev1.ConditionTrue
		}
		v.Status.Conditions = []virtv1.VirtualMachineInstanceCondition{{Type: virtv1.VirtualMachineInstanceIsMigratable, Status: status}}
		return v
	}
	evacMig := func(name, vmiName string, phase virtv1.VirtualMachineInstanceMigrationPhase, created, ended time.Time) virtv1.VirtualMachineInstanceMigration {
		return virtv1.VirtualMachineInstanceMigration{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, CreationTimestamp: metav1.NewTime(created),
				Annotations: map[string]string{virtv1.EvacuationMigrationAnnotation: "n1"}},
			Spec: virtv1.VirtualMachineInstanceMigrationSpec{VMIName: vmiName},
			Status: virtv1.VirtualMachineInstanceMigrationStatus{Phase: phase, PhaseTransitionTimestamps: []virtv1.VirtualMachineInstanceMigrationPhaseTransitionTimestamp{
				{Phase: phase, PhaseTransitionTimestamp: metav1.NewTime(ended)},
			}},
		}
	}

	tests := []struct {
		name        string
		taint       bool // the node carries kubevirt.io/drain:NoSchedule
		vmi         *virtv1.VirtualMachineInstance
		cluster     *virtv1.EvictionStrategy
		migs        []virtv1.VirtualMachineInstanceMigration
		pods        int
		wantMigrate bool
	}{
		{name: "marked LiveMigrate", vmi: vmi("a", &lm, true, "n1", "n1"), wantMigrate: true},
		{name: "marked LiveMigrateIfPossible", vmi: vmi("a", &lmip, true, "n1", "n1"), wantMigrate: true},
		{name: "cluster default LiveMigrate", vmi: vmi("a", nil, true, "n1", "n1"), cluster: &lm, wantMigrate: true},
		{name: "not marked", vmi: vmi("a", &lm, true, "n1", "")},
		{name: "marked for another node (already moved)", vmi: vmi("a", &lm, true, "n2", "n1")},
		{name: "not migratable", vmi: vmi("a", &lm, false, "n1", "n1")},
		{name: "External leaves it to someone else", vmi: vmi("a", &ext, true, "n1", "n1")},
		{name: "None", vmi: vmi("a", &none, true, "n1", "n1")},
		{name: "drain taint, not marked", taint: true, vmi: vmi("a", &lm, true, "n1", ""), wantMigrate: true},
		{name: "migration in flight", vmi: vmi("a", &lm, true, "n1", "n1"),
			migs: []virtv1.VirtualMachineInstanceMigration{evacMig("m1", "a", virtv1.MigrationRunning, now.Add(-time.Minute), now)}},
		{name: "pods of a previous migration still there", vmi: vmi("a", &lm, true, "n1", "n1"), pods: 2},
		{name: "back-off after a failure (20s simulated = 2s)", vmi: vmi("a", &lm, true, "n1", "n1"),
			migs: []virtv1.VirtualMachineInstanceMigration{evacMig("m1", "a", virtv1.MigrationFailed, now.Add(-time.Minute), now.Add(-time.Second))}},
		{name: "back-off elapsed", vmi: vmi("a", &lm, true, "n1", "n1"), wantMigrate: true,
			migs: []virtv1.VirtualMachineInstanceMigration{evacMig("m1", "a", virtv1.MigrationFailed, now.Add(-time.Minute), now.Add(-3*time.Second))}},
		{name: "back-off doubles after two failures", vmi: vmi("a", &lm, true, "n1", "n1"),
			migs: []virtv1.VirtualMachineInstanceMigration{
				evacMig("m1", "a", virtv1.MigrationFailed, now.Add(-2*time.Minute), now.Add(-time.Minute)),
				evacMig("m2", "a", virtv1.MigrationFailed, now.Add(-time.Minute), now.Add(-3*time.Second)),
			}},
		{name: "a success resets the back-off", vmi: vmi("a", &lm, true, "n1", "n1"), wantMigrate: true,
			migs: []virtv1.VirtualMachineInstanceMigration{
				evacMig("m1", "a", virtv1.MigrationFailed, now.Add(-3*time.Minute), now.Add(-2*time.Minute)),
				evacMig("m2", "a", virtv1.MigrationSucceeded, now.Add(-2*time.Minute), now.Add(-time.Minute)),
				evacMig("m3", "a", virtv1.MigrationFailed, now.Add(-time.Minute), now.Add(-3*time.Second)),
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n1"}}
			if tt.taint {
				node.Spec.Taints = []corev1.Taint{{Key: evacDefaultNodeDrainTaintKey, Effect: corev1.TaintEffectNoSchedule}}
			}
			var onNode []*virtv1.VirtualMachineInstance
			if tt.vmi.Status.NodeName == "n1" {
				onNode = append(onNode, tt.vmi)
			}
			var unfinished []*virtv1.VirtualMachineInstanceMigration
			for i := range tt.migs {
				if !tt.migs[i].IsFinal() {
					unfinished = append(unfinished, &tt.migs[i])
				}
			}
			pods := map[string]int{string(tt.vmi.UID): max(tt.pods, 1)}
			got := e.filterCandidates(evacuationVMIsToMigrate(node, onNode, evacDefaultNodeDrainTaintKey), unfinished, pods, tt.cluster, tt.migs)
			require.Equal(t, tt.wantMigrate, len(got) == 1, "candidates: %v", got)
		})
	}
}

// TestMigrationsFromNode: a migration counts against its source node until it finishes, also
// after the hand-off moved its VMI away.
func TestMigrationsFromNode(t *testing.T) {
	onN1 := []*virtv1.VirtualMachineInstance{{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "still-here"}}}
	mig := func(vmi, source string) *virtv1.VirtualMachineInstanceMigration {
		m := &virtv1.VirtualMachineInstanceMigration{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "m-" + vmi},
			Spec:       virtv1.VirtualMachineInstanceMigrationSpec{VMIName: vmi},
		}
		if source != "" {
			m.Status.MigrationState = &virtv1.VirtualMachineInstanceMigrationState{SourceNode: source}
		}
		return m
	}
	unfinished := []*virtv1.VirtualMachineInstanceMigration{
		mig("still-here", ""),       // pending, its VMI is on n1
		mig("handed-off", "n1"),     // running, its VMI already reports n2
		mig("from-elsewhere", "n2"), // another node's
		mig("elsewhere-pending", ""),
	}
	require.Equal(t, 2, migrationsFromNode("n1", onN1, unfinished))
}
