package sim

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	kvv1 "kubevirt.io/api/core/v1"
)

// TestSeedRunsVMs: a seeded cluster brings every VM its run strategy starts
// to Running, and the ground truth agrees with the API.
func TestSeedRunsVMs(t *testing.T) {
	s := startSim(t, Options{})
	res, err := s.Seed(ctxT(t), SeedOptions{Nodes: 3, VMs: 6})
	require.NoError(t, err)
	require.Len(t, res.VMs, 6)
	for i, name := range res.VMs {
		mix := seedMix(i)
		if mix.strategy == kvv1.RunStrategyHalted {
			continue
		}
		vmi := vmiRunning(t, s, name, 30*time.Second)
		eventually(t, 10*time.Second, "vm status of "+name, func() (bool, string) {
			vm := s.getVM(testNS + "/" + name)
			return vm != nil && vm.Status.PrintableStatus == kvv1.VirtualMachineStatusRunning && vm.Status.Ready, string(vm.Status.PrintableStatus)
		})
		require.Equal(t, []string{vmi.Status.NodeName}, s.Truth().GuestNodes(testNS+"/"+name), name)
	}
	require.NoError(t, s.Check())
	require.Empty(t, s.Violations())
}
