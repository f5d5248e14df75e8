package sim

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kvv1 "kubevirt.io/api/core/v1"
)

func dvmStatus(s *Simulator, name string) (phase, node string) {
	u := s.getDVM(testNS + "/" + name)
	if u == nil {
		return "", ""
	}
	phase, _, _ = unstructured.NestedString(u.Object, "status", "phase")
	node, _, _ = unstructured.NestedString(u.Object, "status", "nodeName")
	return phase, node
}

func waitDVM(t *testing.T, s *Simulator, name, phase, node string, timeout time.Duration) {
	t.Helper()
	eventually(t, timeout, fmt.Sprintf("deckhouse vm %s %s on %q", name, phase, node), func() (bool, string) {
		p, n := dvmStatus(s, name)
		return p == phase && (node == "*" || n == node), p + " " + n
	})
}

// TestDeckhouseRunPolicy: Deckhouse VMs are backed by a kubevirt VMI of the
// same name, their pods carry the Deckhouse label, status.phase and
// nodeName follow it; after a node failure only AlwaysOn and
// AlwaysOnUnlessStoppedManually come back; a manual stop holds.
func TestDeckhouseRunPolicy(t *testing.T) {
	s := startSim(t, Options{})
	ctx := ctxT(t)
	mustNode(t, s, "d1", NodeOptions{})
	tests := []struct {
		name, policy string
		runs         bool // runs after creation
		restarts     bool // comes back after its node died
	}{
		{"on", RunPolicyAlwaysOn, true, true},
		{"unless", RunPolicyAlwaysOnUnlessStoppedManually, true, true},
		{"manual", RunPolicyManual, true, false},
		{"off", RunPolicyAlwaysOff, false, false},
	}
	for _, tc := range tests {
		mustPVC(t, s, tc.name+"-disk", corev1.ReadWriteMany)
		_, err := s.Dynamic.Resource(DeckhouseVMGVR).Namespace(testNS).Create(ctx,
			NewDeckhouseVM(testNS, tc.name, VMOptions{RunPolicy: tc.policy, Memory: "2Gi", CPU: 2, Disk: tc.name + "-disk"}), metav1.CreateOptions{})
		require.NoError(t, err)
	}
	for _, tc := range tests {
		if !tc.runs {
			waitDVM(t, s, tc.name, "Stopped", "", 30*time.Second)
			require.Nil(t, s.getVMI(testNS+"/"+tc.name))
			continue
		}
		waitDVM(t, s, tc.name, "Running", "d1", 30*time.Second)
		vmi := s.getVMI(testNS + "/" + tc.name)
		ref := metav1.GetControllerOf(vmi)
		require.Equal(t, "VirtualMachine", ref.Kind)
		require.Equal(t, deckhouseAPIVersion, ref.APIVersion)
		pods := vmiPods(s, tc.name)
		require.Len(t, pods, 1)
		require.Equal(t, tc.name, pods[0].Labels[deckhouseVMLabel])
		require.Equal(t, launcherLabelValue, pods[0].Labels[kvv1.AppLabel])
		require.Equal(t, string(vmi.UID), pods[0].Labels[kvv1.CreatedByLabel])
	}

	mustNode(t, s, "d2", NodeOptions{})
	require.NoError(t, s.SetFault(ctx, "d1", FaultDown))
	waitNodeReady(t, s, "d1", corev1.ConditionUnknown, 30*time.Second)
	require.Equal(t, 3, forceDeletePods(t, s, "d1"))
	for _, tc := range tests {
		t.Run(tc.name+" after node failure", func(t *testing.T) {
			if tc.restarts {
				waitDVM(t, s, tc.name, "Running", "d2", 30*time.Second)
				require.Equal(t, []string{"d2"}, s.Truth().GuestNodes(testNS+"/"+tc.name))
				return
			}
			waitDVM(t, s, tc.name, "Stopped", "", 30*time.Second)
			require.Empty(t, s.Truth().GuestNodes(testNS+"/"+tc.name))
		})
	}

	t.Run("a manual stop holds", func(t *testing.T) {
		require.NoError(t, s.StopDeckhouseVM(ctx, testNS, "unless", false))
		waitDVM(t, s, "unless", "Stopped", "", 30*time.Second)
		eventually(t, 10*time.Second, "vmi removed", func() (bool, string) {
			return s.getVMI(testNS+"/unless") == nil, ""
		})
		require.Empty(t, s.Truth().GuestNodes(testNS+"/unless"))
		require.NoError(t, s.StartDeckhouseVM(ctx, testNS, "unless"))
		waitDVM(t, s, "unless", "Running", "*", 30*time.Second)
	})
	t.Run("manual VM starts on request", func(t *testing.T) {
		require.NoError(t, s.StartDeckhouseVM(ctx, testNS, "manual"))
		waitDVM(t, s, "manual", "Running", "d2", 30*time.Second)
	})
	require.Empty(t, s.Violations())
}

// Seeding a Deckhouse cluster configures KubeVirt as Deckhouse does and
// creates VMs the Deckhouse CRD accepts, which then run per run policy.
func TestSeedDeckhouse(t *testing.T) {
	s := startSim(t, Options{TimeScale: 10})
	ctx := ctxT(t)
	res, err := s.Seed(ctx, SeedOptions{Nodes: 3, VMs: 6, Platform: PlatformDeckhouse, Namespace: testNS})
	require.NoError(t, err)
	require.Len(t, res.VMs, 6)
	eventually(t, 30*time.Second, "migration limits of Deckhouse", func() (bool, string) {
		c := s.MigrationConfig()
		return c.ParallelOutboundMigrationsPerNode == 1 && c.ParallelMigrationsPerCluster == 3, fmt.Sprintf("%+v", c)
	})
	kvs, err := s.KubeVirt.KubeVirts(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	require.Len(t, kvs.Items, 1)
	require.NotNil(t, kvs.Items[0].Spec.Configuration.EvictionStrategy)
	require.Equal(t, "LiveMigrate", string(*kvs.Items[0].Spec.Configuration.EvictionStrategy))
	// seedMix: vm-1..vm-5 start (AlwaysOnUnlessStoppedManually, AlwaysOn, Manual), vm-6 is AlwaysOff.
	for _, vm := range res.VMs[:5] {
		waitDVM(t, s, vm, "Running", "*", 60*time.Second)
	}
	waitDVM(t, s, res.VMs[5], "Stopped", "", 30*time.Second)
}
