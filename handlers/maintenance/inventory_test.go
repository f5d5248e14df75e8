package maintenance

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
)

func TestWithoutHostPinning(t *testing.T) {
	byName := corev1.NodeSelectorRequirement{Key: "metadata.name", Operator: corev1.NodeSelectorOpNotIn, Values: []string{"node-1"}}
	zone := corev1.NodeSelectorRequirement{Key: "zone", Operator: corev1.NodeSelectorOpIn, Values: []string{"b"}}
	aff := func(terms ...corev1.NodeSelectorTerm) *corev1.Affinity {
		return &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{NodeSelectorTerms: terms}}}
	}
	tests := []struct {
		name string
		in   *corev1.Affinity
		want *corev1.Affinity
	}{
		{name: "nil", in: nil, want: nil},
		{name: "only a pin: dropped", in: aff(corev1.NodeSelectorTerm{MatchFields: []corev1.NodeSelectorRequirement{byName}}),
			want: &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{}}},
		{name: "the user's expression stays", in: aff(corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{zone}, MatchFields: []corev1.NodeSelectorRequirement{byName}}),
			want: aff(corev1.NodeSelectorTerm{MatchExpressions: []corev1.NodeSelectorRequirement{zone}})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, withoutHostPinning(tt.in))
		})
	}
}

func TestRetriesLast(t *testing.T) {
	failed := time.Now()
	vms := []*VMState{{Name: "a", LastFailure: failed}, {Name: "b"}, {Name: "c", LastFailure: failed}, {Name: "d"}}
	var order []string
	for _, v := range retriesLast(vms) {
		order = append(order, v.Name)
	}
	require.Equal(t, []string{"b", "d", "a", "c"}, order)
}
