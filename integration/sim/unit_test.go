package sim

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	clocktesting "k8s.io/utils/clock/testing"
	kvv1 "kubevirt.io/api/core/v1"
)

func TestFitsNode(t *testing.T) {
	node := NewNode("n", NodeOptions{CPU: "4", Memory: "8Gi", Pods: 3, Labels: map[string]string{"zone": "a", "rank": "5"},
		Taints: []corev1.Taint{{Key: "dedicated", Value: "db", Effect: corev1.TaintEffectNoSchedule}}})
	tolerant := []corev1.Toleration{{Key: "dedicated", Operator: corev1.TolerationOpExists}}
	pod := func(mut func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{Spec: corev1.PodSpec{Tolerations: tolerant, Containers: []corev1.Container{{Resources: corev1.ResourceRequirements{
			Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("1"), corev1.ResourceMemory: resource.MustParse("2Gi")}}}}}}
		if mut != nil {
			mut(p)
		}
		return p
	}
	affinity := func(reqs ...corev1.NodeSelectorRequirement) func(*corev1.Pod) {
		return func(p *corev1.Pod) {
			p.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{
				NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchExpressions: reqs}}}}}
		}
	}
	tests := []struct {
		name   string
		pod    *corev1.Pod
		used   resources
		cordon bool
		want   string
	}{
		{name: "fits", pod: pod(nil)},
		{name: "cordoned", pod: pod(nil), cordon: true, want: "node(s) were unschedulable"},
		{name: "tolerates cordon", pod: pod(func(p *corev1.Pod) {
			p.Spec.Tolerations = append(p.Spec.Tolerations, corev1.Toleration{Key: taintUnschedulable, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule})
		}), cordon: true},
		{name: "untolerated taint", pod: pod(func(p *corev1.Pod) { p.Spec.Tolerations = nil }), want: "node(s) had untolerated taint {dedicated: db}"},
		{name: "selector matches", pod: pod(func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{"zone": "a"} })},
		{name: "selector does not match", pod: pod(func(p *corev1.Pod) { p.Spec.NodeSelector = map[string]string{"zone": "b"} }), want: "node(s) didn't match Pod's node affinity/selector"},
		{name: "affinity In", pod: pod(affinity(corev1.NodeSelectorRequirement{Key: "zone", Operator: corev1.NodeSelectorOpIn, Values: []string{"a", "b"}}))},
		{name: "affinity NotIn", pod: pod(affinity(corev1.NodeSelectorRequirement{Key: "zone", Operator: corev1.NodeSelectorOpNotIn, Values: []string{"a"}})), want: "node(s) didn't match Pod's node affinity/selector"},
		{name: "affinity Gt", pod: pod(affinity(corev1.NodeSelectorRequirement{Key: "rank", Operator: corev1.NodeSelectorOpGt, Values: []string{"4"}}))},
		{name: "affinity DoesNotExist", pod: pod(affinity(corev1.NodeSelectorRequirement{Key: "gpu", Operator: corev1.NodeSelectorOpDoesNotExist}))},
		{name: "memory full", pod: pod(nil), used: resources{mem: 7 << 30, pods: 1}, want: "Insufficient memory"},
		{name: "cpu full", pod: pod(nil), used: resources{cpu: 3500, pods: 1}, want: "Insufficient cpu"},
		{name: "exactly full", pod: pod(nil), used: resources{cpu: 3000, mem: 6 << 30, pods: 2}},
		{name: "too many pods", pod: pod(nil), used: resources{pods: 3}, want: "Too many pods"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := node.DeepCopy()
			n.Spec.Unschedulable = tc.cordon
			require.Equal(t, tc.want, fitsNode(tc.pod, n, podRequests(tc.pod), tc.used))
		})
	}
}

func TestMatchFieldsAvoidsSourceNode(t *testing.T) {
	vmi := &kvv1.VirtualMachineInstance{ObjectMeta: metav1.ObjectMeta{Name: "v", Namespace: "ns", UID: "u"}}
	m := &kvv1.VirtualMachineInstanceMigration{ObjectMeta: metav1.ObjectMeta{Name: "m", UID: "mu"},
		Spec: kvv1.VirtualMachineInstanceMigrationSpec{AddedNodeSelector: map[string]string{"zone": "b", kvv1.NodeSchedulable: "false"}}}
	p := newLauncherPod(vmi, m, "src")
	require.Equal(t, "true", p.Spec.NodeSelector[kvv1.NodeSchedulable], "addedNodeSelector cannot override the VMI's own")
	require.Equal(t, "b", p.Spec.NodeSelector["zone"])
	sel := p.Spec.Affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution
	require.False(t, nodeSelectorMatches(sel, NewNode("src", NodeOptions{})))
	require.True(t, nodeSelectorMatches(sel, NewNode("other", NodeOptions{})))
	require.Equal(t, string(m.UID), p.Labels[kvv1.MigrationJobLabel])
	require.Equal(t, string(vmi.UID), p.Labels[kvv1.CreatedByLabel])
}

func TestStartBackoff(t *testing.T) {
	for count, limits := range map[int][2]int{1: {10, 15}, 2: {40, 60}, 3: {90, 135}, 10: {300, 300}} {
		for i := 0; i < 20; i++ {
			d := startBackoffSeconds(count, 300)
			require.GreaterOrEqual(t, d, limits[0], "count %d", count)
			require.LessOrEqual(t, d, limits[1], "count %d", count)
		}
	}
}

func TestPlanMigration(t *testing.T) {
	s, err := New(&rest.Config{Host: "https://127.0.0.1:1"}, Options{MigrationBandwidth: 1 << 30, InstallCRDs: noCRDs})
	require.NoError(t, err)
	vmi := func(mem, dirty string) *kvv1.VirtualMachineInstance {
		q := resource.MustParse(mem)
		v := &kvv1.VirtualMachineInstance{Spec: kvv1.VirtualMachineInstanceSpec{Domain: kvv1.DomainSpec{Memory: &kvv1.Memory{Guest: &q}}}}
		if dirty != "" {
			v.Annotations = map[string]string{AnnotationDirtyRate: dirty}
		}
		return v
	}
	tests := []struct {
		name      string
		vmi       *kvv1.VirtualMachineInstance
		converges bool
		duration  time.Duration
	}{
		{"4Gi at 1Gi/s", vmi("4Gi", ""), true, 4 * time.Second},
		{"4Gi at 1Gi/s with 512Mi/s dirtied", vmi("4Gi", "512Mi"), true, 8 * time.Second},
		{"dirtier than the bandwidth", vmi("4Gi", "2Gi"), false, 150 * time.Second},
		{"too slow to finish in 150s per GiB", vmi("1Gi", "1073741000"), false, 150 * time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := s.PlanMigration(tc.vmi)
			require.Equal(t, tc.converges, p.Converges)
			require.Equal(t, tc.duration, p.Duration)
			if !tc.converges {
				require.NotEmpty(t, p.Reason)
			}
		})
	}
}

func noCRDs(_ context.Context, _ *rest.Config) error { return nil }

func TestTruthRecordsEveryViolation(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Unix(1000, 0))
	tr := newTruth(clk)
	tr.start(Guest{VMI: "ns/a", Node: "n1", Pod: "ns/p1", PodUID: "p1", RWOVolumes: []string{"ns/disk"}})
	require.Empty(t, tr.violations)
	// a migration hands over in one step: never two guests
	require.True(t, tr.move("p1", Guest{VMI: "ns/a", Node: "n2", Pod: "ns/p2", PodUID: "p2"}))
	require.Empty(t, tr.violations)
	require.True(t, tr.ran("p1"))
	require.False(t, tr.running("p1"))
	// a transient double run, gone before anyone looks, is still recorded once
	clk.Step(time.Second)
	tr.start(Guest{VMI: "ns/a", Node: "n3", Pod: "ns/p3", PodUID: "p3", RWOVolumes: []string{"ns/disk"}})
	tr.start(Guest{VMI: "ns/a", Node: "n3", Pod: "ns/p3", PodUID: "p3"}) // idempotent
	require.Equal(t, 1, tr.killNode("n3"))
	require.Equal(t, 1, tr.killNode("n2"))
	require.Len(t, tr.violations, 2)
	require.Equal(t, DoubleRun, tr.violations[0].Kind)
	require.Equal(t, []string{"n2", "n3"}, tr.violations[0].Nodes)
	require.Equal(t, RWOMultiAttach, tr.violations[1].Kind)
	require.Equal(t, time.Unix(1001, 0), tr.violations[0].At)
	// a new episode is a new violation
	tr.start(Guest{VMI: "ns/a", Node: "n1", Pod: "ns/p4", PodUID: "p4"})
	tr.start(Guest{VMI: "ns/a", Node: "n2", Pod: "ns/p5", PodUID: "p5"})
	require.Len(t, tr.violations, 3)
}

func TestMigratableCondition(t *testing.T) {
	s, err := New(&rest.Config{Host: "https://127.0.0.1:1"}, Options{InstallCRDs: noCRDs})
	require.NoError(t, err)
	bridge := NewKubeVirtVM("ns", "b", VMOptions{BridgeOnPodNetwork: true}).Spec.Template.Spec
	masq := NewKubeVirtVM("ns", "m", VMOptions{}).Spec.Template.Spec
	tests := []struct {
		name        string
		spec        kvv1.VirtualMachineInstanceSpec
		annotations map[string]string
		status      corev1.ConditionStatus
		reason      string
	}{
		{"masquerade", masq, nil, corev1.ConditionTrue, ""},
		{"bridge on the pod network", bridge, nil, corev1.ConditionFalse, kvv1.VirtualMachineInstanceReasonInterfaceNotMigratable},
		{"bridge allowed by annotation", bridge, map[string]string{allowPodBridgeMigration: "true"}, corev1.ConditionTrue, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			vmi := &kvv1.VirtualMachineInstance{ObjectMeta: metav1.ObjectMeta{Annotations: tc.annotations}, Spec: tc.spec}
			c := s.migratableCondition(vmi)
			require.Equal(t, tc.status, c.Status)
			require.Equal(t, tc.reason, c.Reason)
		})
	}
}
