package e2e

import (
	"context"
	"os/exec"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	kvv1 "kubevirt.io/api/core/v1"
)

// TestKubectlDrainExternalEvictions: `kubectl drain` of a node whose VMIs
// have evictionStrategy External: KubeVirt only marks them; drover migrates
// them and the drain completes.
func TestKubectlDrainExternalEvictions(t *testing.T) {
	t.Parallel()
	kubectl, err := Kubectl()
	require.NoError(t, err, "kubectl is needed to drain like an administrator")
	e := StartT(t, Options{Scenario: `
nodes:
- {name: node-1}
- {name: node-2}
kubevirtPods: {virtAPI: [node-2, node-2], virtController: [node-2, node-2]}
vms:
- {name: ext-1, memory: 2Gi, evictionStrategy: External, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: ext-2, memory: 1Gi, evictionStrategy: External, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: ext-3, memory: 1Gi, evictionStrategy: External, node: node-1}
`})
	ctx := ctxT(t, 4*time.Minute)
	uids := map[string]string{}
	for _, n := range []string{"ext-1", "ext-2", "ext-3"} {
		uids[n] = string(e.VMI(ctx, "default", n).UID)
	}
	s := startSampler(t, e, nil)
	dctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(dctx, kubectl, "--kubeconfig", e.Kubeconfig(), "drain", "node-1",
		"--pod-selector", "kubevirt.io=virt-launcher", "--ignore-daemonsets", "--delete-emptydir-data", "--timeout", "110s").CombinedOutput()
	t.Logf("kubectl drain:\n%s", out)
	require.NoError(t, err)
	require.Contains(t, string(out), "node/node-1 drained")
	s.Stop()
	for n, uid := range uids {
		v := e.VMI(ctx, "default", n)
		require.Equal(t, "node-2", v.Status.NodeName, n)
		require.Equal(t, kvv1.Running, v.Status.Phase, n)
		require.Equal(t, uid, string(v.UID), "%s was live-migrated by drover", n)
		require.Len(t, s.created["default/"+n], 1, "drover's migration of %s", n)
	}
	require.Empty(t, e.Sim.Violations())
}
