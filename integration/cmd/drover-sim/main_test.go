package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	kvv1 "kubevirt.io/api/core/v1"
	kvclient "kubevirt.io/client-go/kubevirt/typed/core/v1"

	"github.com/drover-io/drover/integration/cluster"
)

// TestRunSeedsAndStops: the command seeds the cluster it is pointed at,
// brings the VMs up and returns cleanly when its context ends.
func TestRunSeedsAndStops(t *testing.T) {
	c := cluster.StartT(t)
	kube, err := kubernetes.NewForConfig(c.Config)
	require.NoError(t, err)
	runUntil(t, c, []string{"--nodes", "2", "--vms", "3"}, func(ctx context.Context) (bool, string) {
		nodes, err := kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		require.NoError(t, err)
		running := runningVMIs(ctx, t, c, "")
		// vm-1..3 are Always, RerunOnFailure, Always
		return len(nodes.Items) == 2 && running == 3, fmt.Sprintf("%d nodes, %d running VMIs", len(nodes.Items), running)
	})
}

// TestRunScenario: --scenario seeds the file's cluster: its nodes, its VMs on their nodes.
func TestRunScenario(t *testing.T) {
	c := cluster.StartT(t)
	file := filepath.Join(t.TempDir(), "two.yaml")
	require.NoError(t, os.WriteFile(file, []byte(`
nodes: [{name: left}, {name: right, labels: {rack: b}}]
kubevirtPods: {virtAPI: [left, left]}
vms:
- {name: db-1, cpu: 1, memory: 1Gi, node: right}
- {name: db-2, node: right, disk: {accessMode: ReadWriteOnce}}
`), 0o600))
	kube, err := kubernetes.NewForConfig(c.Config)
	require.NoError(t, err)
	runUntil(t, c, []string{"--scenario", file}, func(ctx context.Context) (bool, string) {
		onRight := runningVMIs(ctx, t, c, "right")
		api, err := kube.CoreV1().Pods("kubevirt").List(ctx, metav1.ListOptions{LabelSelector: "kubevirt.io=virt-api"})
		require.NoError(t, err)
		onLeft := 0
		for _, p := range api.Items {
			if p.Spec.NodeName == "left" {
				onLeft++
			}
		}
		return onRight == 2 && onLeft == 2, fmt.Sprintf("%d of 2 VMIs running on node right, %d of 2 virt-api pods on left", onRight, onLeft)
	})
}

// runUntil runs the command with args (time scale 20) against c until seeded(ctx) holds (60 s
// at most), then stops it; it must return cleanly within 30 s.
func runUntil(t *testing.T, c *cluster.Cluster, args []string, seeded func(ctx context.Context) (bool, string)) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logs, err := os.CreateTemp(t.TempDir(), "drover-sim-*.log")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"--kubeconfig", c.Kubeconfig, "--time-scale", "20"}, args...), logs)
	}()
	deadline := time.Now().Add(60 * time.Second)
	for {
		ok, state := seeded(ctx)
		if ok {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("run returned early: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("not seeded after 60s: %s", state)
		}
		time.Sleep(100 * time.Millisecond)
	}
	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("run did not return within 30s of its context ending")
	}
}

// runningVMIs counts the Running VMIs of namespace default, on node when it is not "".
func runningVMIs(ctx context.Context, t *testing.T, c *cluster.Cluster, node string) int {
	t.Helper()
	kv, err := kvclient.NewForConfig(c.Config)
	require.NoError(t, err)
	vmis, err := kv.VirtualMachineInstances("default").List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	n := 0
	for _, v := range vmis.Items {
		if v.Status.Phase == kvv1.Running && (node == "" || v.Status.NodeName == node) {
			n++
		}
	}
	return n
}

// TestRunScenarioArguments: a scenario replaces the generator's flags, and a bad file is
// reported before anything is created.
func TestRunScenarioArguments(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	require.NoError(t, os.WriteFile(bad, []byte("nodes: [{name: a}]\nvms: [{name: x, runStrategy: Sometimes}]\n"), 0o600))
	tests := []struct {
		name string
		args []string
		want string
	}{
		{name: "with --vms", args: []string{"--scenario", bad, "--vms", "3"}, want: "--scenario describes the whole cluster; drop --vms"},
		{name: "missing file", args: []string{"--scenario", filepath.Join(dir, "none.yaml")}, want: "none.yaml"},
		{name: "bad value", args: []string{"--scenario", bad}, want: `vms[0] (default/x).runStrategy: "Sometimes"`},
		{name: "bad platform", args: []string{"--platform", "vmware"}, want: `--platform "vmware"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := run(context.Background(), append([]string{"--kubeconfig", "/nonexistent"}, tc.args...), os.Stderr)
			require.ErrorContains(t, err, tc.want)
		})
	}
}

func TestRunNeedsKubeconfig(t *testing.T) {
	t.Setenv("KUBECONFIG", "")
	require.ErrorContains(t, run(context.Background(), nil, os.Stderr), "--kubeconfig is required")
}
