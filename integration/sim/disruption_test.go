package sim

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// TestPDBStatus: the budget's status as the disruption controller computes it.
func TestPDBStatus(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	rsRef := metav1.OwnerReference{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "web", UID: "rs-uid", Controller: ptr.To(true)}
	pod := func(name string, ready bool, mut ...func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns", OwnerReferences: []metav1.OwnerReference{rsRef}}}
		st := corev1.ConditionFalse
		if ready {
			st = corev1.ConditionTrue
		}
		p.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: st}}
		for _, m := range mut {
			m(p)
		}
		return p
	}
	unmanaged := func(p *corev1.Pod) { p.OwnerReferences = nil }
	deleting := func(p *corev1.Pod) { p.DeletionTimestamp = &metav1.Time{Time: now} }
	scale := func(replicas int32) scaleOf {
		return func(_ string, ref *metav1.OwnerReference) (types.UID, int32, bool, error) {
			if ref.UID != "rs-uid" {
				return "", 0, false, nil
			}
			return ref.UID, replicas, true, nil
		}
	}
	minAvail := func(v intstr.IntOrString) policyv1.PodDisruptionBudgetSpec {
		return policyv1.PodDisruptionBudgetSpec{MinAvailable: &v}
	}
	maxUnavail := func(v intstr.IntOrString) policyv1.PodDisruptionBudgetSpec {
		return policyv1.PodDisruptionBudgetSpec{MaxUnavailable: &v}
	}
	tests := []struct {
		name      string
		spec      policyv1.PodDisruptionBudgetSpec
		disrupted map[string]metav1.Time
		pods      []*corev1.Pod
		replicas  int32
		// want: currentHealthy, desiredHealthy, expectedPods, disruptionsAllowed
		want        [4]int32
		wantKept    []string // disruptedPods kept
		wantRecheck time.Duration
		wantErr     string
	}{
		{name: "minAvailable 2 of 3 ready", spec: minAvail(intstr.FromInt32(2)), replicas: 3,
			pods: []*corev1.Pod{pod("a", true), pod("b", true), pod("c", true)}, want: [4]int32{3, 2, 3, 1}},
		{name: "minAvailable counts the selected pods, not the scale", spec: minAvail(intstr.FromInt32(2)), replicas: 5,
			pods: []*corev1.Pod{pod("a", true), pod("b", true)}, want: [4]int32{2, 2, 2, 0}},
		{name: "a pod not ready is not healthy", spec: minAvail(intstr.FromInt32(2)), replicas: 3,
			pods: []*corev1.Pod{pod("a", true), pod("b", false), pod("c", true)}, want: [4]int32{2, 2, 3, 0}},
		{name: "a pod being deleted is not healthy", spec: minAvail(intstr.FromInt32(1)), replicas: 2,
			pods: []*corev1.Pod{pod("a", true, deleting), pod("b", true)}, want: [4]int32{1, 1, 2, 0}},
		{name: "minAvailable 50% of the scale, rounded up", spec: minAvail(intstr.FromString("50%")), replicas: 5,
			pods: []*corev1.Pod{pod("a", true), pod("b", true), pod("c", true), pod("d", true)}, want: [4]int32{4, 3, 5, 1}},
		{name: "maxUnavailable 1 of the scale", spec: maxUnavail(intstr.FromInt32(1)), replicas: 3,
			pods: []*corev1.Pod{pod("a", true), pod("b", true), pod("c", true)}, want: [4]int32{3, 2, 3, 1}},
		{name: "maxUnavailable 0 blocks", spec: maxUnavail(intstr.FromInt32(0)), replicas: 2,
			pods: []*corev1.Pod{pod("a", true), pod("b", true)}, want: [4]int32{2, 2, 2, 0}},
		{name: "maxUnavailable over unmanaged pods expects none and allows nothing", spec: maxUnavail(intstr.FromInt32(1)),
			pods: []*corev1.Pod{pod("a", true, unmanaged), pod("b", true, unmanaged)}, want: [4]int32{2, 0, 0, 0}},
		{name: "minAvailable 0 on an unmanaged pod allows it", spec: minAvail(intstr.FromInt32(0)),
			pods: []*corev1.Pod{pod("a", true, unmanaged)}, want: [4]int32{1, 0, 1, 1}},
		{name: "no pods: nothing allowed", spec: minAvail(intstr.FromInt32(0)), want: [4]int32{0, 0, 0, 0}},
		{name: "a disrupted pod not deleted yet is not healthy until its deadline", spec: minAvail(intstr.FromInt32(1)), replicas: 3,
			disrupted: map[string]metav1.Time{"a": {Time: now.Add(-30 * time.Second)}, "gone": {Time: now}},
			pods:      []*corev1.Pod{pod("a", true), pod("b", true), pod("c", true)}, want: [4]int32{2, 1, 3, 1},
			wantKept: []string{"a"}, wantRecheck: 90 * time.Second},
		{name: "an overdue disrupted pod is healthy again", spec: minAvail(intstr.FromInt32(1)), replicas: 2,
			disrupted: map[string]metav1.Time{"a": {Time: now.Add(-3 * time.Minute)}},
			pods:      []*corev1.Pod{pod("a", true), pod("b", true)}, want: [4]int32{2, 1, 2, 1}},
		{name: "a percentage over a pod without a known controller fails", spec: maxUnavail(intstr.FromString("10%")),
			pods: []*corev1.Pod{pod("a", true, func(p *corev1.Pod) { p.OwnerReferences[0].UID = "other" })}, wantErr: `found no controllers for pod "a"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			pdb := &policyv1.PodDisruptionBudget{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "ns", Generation: 4}, Spec: tc.spec}
			pdb.Status.DisruptedPods = tc.disrupted
			st, recheck, err := pdbStatus(pdb, tc.pods, scale(tc.replicas), now, pdbDeletionTimeout)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, [4]int32{st.CurrentHealthy, st.DesiredHealthy, st.ExpectedPods, st.DisruptionsAllowed})
			require.Equal(t, int64(4), st.ObservedGeneration)
			var kept []string
			for k := range st.DisruptedPods {
				kept = append(kept, k)
			}
			require.ElementsMatch(t, tc.wantKept, kept)
			require.Equal(t, tc.wantRecheck, recheck)
			require.Len(t, st.Conditions, 1)
			c := st.Conditions[0]
			require.Equal(t, policyv1.DisruptionAllowedCondition, c.Type)
			if st.DisruptionsAllowed > 0 {
				require.Equal(t, [2]string{"True", policyv1.SufficientPodsReason}, [2]string{string(c.Status), c.Reason})
			} else {
				require.Equal(t, [2]string{"False", policyv1.InsufficientPodsReason}, [2]string{string(c.Status), c.Reason})
			}
		})
	}
}

// TestDrainHonoursDisruptionBudget drains a node as `kubectl drain` does (cordon, then the
// Eviction API, retrying 429s): a ReplicaSet of three pods on two nodes under a budget of
// minAvailable 2. The first eviction is allowed (200), the second refused (429) until the
// evicted pod's replacement, placed on the other node, is Ready; then it is allowed too, and the
// workload ends up whole on the other node. Unmanaged pods get the budgets' real answers.
func TestDrainHonoursDisruptionBudget(t *testing.T) {
	s := startSim(t, Options{})
	ctx := ctxT(t)
	for _, n := range []string{"web-a", "web-b"} {
		mustNode(t, s, n, NodeOptions{Labels: map[string]string{"role": "web"}})
	}
	mustNode(t, s, "other", NodeOptions{})
	// Both web nodes schedulable (seen, Ready, no taint) before the pods exist, so that
	// the scheduler spreads them two and one: a node still starting up would
	// take none of them (a CI run on a busy machine put all three on web-a).
	eventually(t, 30*time.Second, "web-a and web-b schedulable", func() (bool, string) {
		var state []string
		ok := true
		for _, name := range []string{"web-a", "web-b"} {
			// As the simulator's scheduler sees it (its cache).
			obj, found, err := s.nodeInformer.GetStore().GetByKey(name)
			require.NoError(t, err)
			if !found {
				ok = false
				state = append(state, name+" not in the scheduler's cache")
				continue
			}
			n := obj.(*corev1.Node)
			ready := false
			for _, c := range n.Status.Conditions {
				ready = ready || (c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue)
			}
			ok = ok && ready && len(n.Spec.Taints) == 0 && !n.Spec.Unschedulable
			state = append(state, fmt.Sprintf("%s ready=%t taints=%v", name, ready, n.Spec.Taints))
		}
		return ok, fmt.Sprint(state)
	})
	labels := map[string]string{"app": "web"}
	rs := &appsv1.ReplicaSet{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: testNS},
		Spec: appsv1.ReplicaSetSpec{
			Replicas: ptr.To(int32(3)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}, Spec: corev1.PodSpec{
				NodeSelector: map[string]string{"role": "web"},
				Containers: []corev1.Container{{Name: "nginx", Image: "nginx", Resources: corev1.ResourceRequirements{
					Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("64Mi")}}}},
			}},
		},
	}
	_, err := s.Kube.AppsV1().ReplicaSets(testNS).Create(ctx, rs, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = s.Kube.PolicyV1().PodDisruptionBudgets(testNS).Create(ctx, &policyv1.PodDisruptionBudget{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: testNS},
		Spec:       policyv1.PodDisruptionBudgetSpec{MinAvailable: ptr.To(intstr.FromInt32(2)), Selector: &metav1.LabelSelector{MatchLabels: labels}},
	}, metav1.CreateOptions{})
	require.NoError(t, err)

	webPods := func() map[string][]*corev1.Pod { // node -> ready, active pods
		out := map[string][]*corev1.Pod{}
		pods, err := s.Kube.CoreV1().Pods(testNS).List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
		require.NoError(t, err)
		for i := range pods.Items {
			p := &pods.Items[i]
			if p.DeletionTimestamp == nil && podReady(p) {
				out[p.Spec.NodeName] = append(out[p.Spec.NodeName], p)
			}
		}
		return out
	}
	pdbStatusIs := func(what string, healthy, allowed int32) {
		t.Helper()
		eventually(t, 30*time.Second, what, func() (bool, string) {
			pdb, err := s.Kube.PolicyV1().PodDisruptionBudgets(testNS).Get(ctx, "web", metav1.GetOptions{})
			require.NoError(t, err)
			st := pdb.Status
			return st.ObservedGeneration == pdb.Generation && st.ExpectedPods == 3 && st.DesiredHealthy == 2 &&
				st.CurrentHealthy == healthy && st.DisruptionsAllowed == allowed, fmt.Sprintf("%+v", st)
		})
	}
	evict := func(p *corev1.Pod) error {
		return s.Kube.PolicyV1().Evictions(testNS).Evict(ctx, &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: testNS}})
	}

	var drained, spare string
	eventually(t, 30*time.Second, "three web pods Ready on web-a and web-b", func() (bool, string) {
		by := webPods()
		drained, spare = "web-a", "web-b"
		if len(by["web-b"]) == 2 {
			drained, spare = spare, drained
		}
		return len(by[drained]) == 2 && len(by[spare]) == 1, fmt.Sprint(by)
	})
	pdbStatusIs("budget: 3 healthy, 1 disruption allowed", 3, 1)

	updateNode(t, s, drained, func(n *corev1.Node) { n.Spec.Unschedulable = true })
	eventually(t, 10*time.Second, "cordon in cache", func() (bool, string) { return s.getNode(drained).Spec.Unschedulable, "" })
	victims := webPods()[drained]
	require.NoError(t, evict(victims[0]), "the budget allows one disruption")
	err = evict(victims[1])
	require.True(t, apierrors.IsTooManyRequests(err), "second eviction while the first pod's replacement is not Ready: want 429, got %v", err)

	// kubectl drain retries every 5 s; the replacement is Ready on the spare node first.
	eventually(t, 60*time.Second, "second eviction allowed", func() (bool, string) {
		err := evict(victims[1])
		if apierrors.IsTooManyRequests(err) {
			return false, err.Error()
		}
		require.NoError(t, err)
		return true, ""
	})
	eventually(t, 60*time.Second, "the three web pods Ready on the spare node", func() (bool, string) {
		by := webPods()
		return len(by[spare]) == 3 && len(by[drained]) == 0, fmt.Sprint(by)
	})
	pdbStatusIs("budget whole again", 3, 1)
	eventually(t, 30*time.Second, "ReplicaSet status", func() (bool, string) {
		cur, err := s.Kube.AppsV1().ReplicaSets(testNS).Get(ctx, "web", metav1.GetOptions{})
		require.NoError(t, err)
		st := cur.Status
		return st.Replicas == 3 && st.ReadyReplicas == 3 && st.AvailableReplicas == 3 && st.ObservedGeneration == cur.Generation, fmt.Sprintf("%+v", st)
	})

	t.Run("unmanaged pods", func(t *testing.T) {
		for _, tc := range []struct {
			name    string
			spec    policyv1.PodDisruptionBudgetSpec
			allowed bool
		}{
			{name: "minavailable-0", spec: policyv1.PodDisruptionBudgetSpec{MinAvailable: ptr.To(intstr.FromInt32(0))}, allowed: true},
			{name: "maxunavailable-1", spec: policyv1.PodDisruptionBudgetSpec{MaxUnavailable: ptr.To(intstr.FromInt32(1))}},
		} {
			sel := map[string]string{"bare": tc.name}
			tc.spec.Selector = &metav1.LabelSelector{MatchLabels: sel}
			_, err := s.Kube.PolicyV1().PodDisruptionBudgets(testNS).Create(ctx, &policyv1.PodDisruptionBudget{
				ObjectMeta: metav1.ObjectMeta{Name: tc.name, Namespace: testNS}, Spec: tc.spec}, metav1.CreateOptions{})
			require.NoError(t, err)
			p, err := s.Kube.CoreV1().Pods(testNS).Create(ctx, &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: tc.name, Namespace: testNS, Labels: sel},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "busybox"}}},
			}, metav1.CreateOptions{})
			require.NoError(t, err)
			eventually(t, 30*time.Second, tc.name+": budget observed with the pod Ready", func() (bool, string) {
				pdb, err := s.Kube.PolicyV1().PodDisruptionBudgets(testNS).Get(ctx, tc.name, metav1.GetOptions{})
				require.NoError(t, err)
				return pdb.Status.ObservedGeneration == pdb.Generation && pdb.Status.CurrentHealthy == 1, fmt.Sprintf("%+v", pdb.Status)
			})
			err = evict(p)
			if tc.allowed {
				require.NoError(t, err, tc.name)
			} else {
				require.True(t, apierrors.IsTooManyRequests(err), "%s: want 429, got %v", tc.name, err)
			}
		}
	})
}
