package evacuation

import (
	"testing"

	"github.com/stretchr/testify/require"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

func TestWants(t *testing.T) {
	vmi := func(strategy kvv1.EvictionStrategy, mark, node string, phase kvv1.VirtualMachineInstancePhase) *kvv1.VirtualMachineInstance {
		v := &kvv1.VirtualMachineInstance{}
		if strategy != "" {
			v.Spec.EvictionStrategy = ptr.To(strategy)
		}
		v.Status.EvacuationNodeName, v.Status.NodeName, v.Status.Phase = mark, node, phase
		return v
	}
	tests := []struct {
		name    string
		vmi     *kvv1.VirtualMachineInstance
		cluster string
		want    bool
	}{
		{"External, marked on its node", vmi(kvv1.EvictionStrategyExternal, "node-1", "node-1", kvv1.Running), "", true},
		{"cluster default External", vmi("", "node-1", "node-1", kvv1.Running), "External", true},
		{"own LiveMigrate beats the cluster's External: KubeVirt migrates it", vmi(kvv1.EvictionStrategyLiveMigrate, "node-1", "node-1", kvv1.Running), "External", false},
		{"not marked", vmi(kvv1.EvictionStrategyExternal, "", "node-1", kvv1.Running), "", false},
		{"already left the marked node", vmi(kvv1.EvictionStrategyExternal, "node-1", "node-2", kvv1.Running), "", false},
		{"not running", vmi(kvv1.EvictionStrategyExternal, "node-1", "node-1", kvv1.Failed), "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, wants(tt.vmi, tt.cluster))
		})
	}
}
