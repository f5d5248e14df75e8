package main

import (
	"context"
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
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	logs, err := os.CreateTemp(t.TempDir(), "drover-sim-*.log")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--kubeconfig", c.Kubeconfig, "--nodes", "2", "--vms", "3", "--time-scale", "20"}, logs)
	}()
	kube, err := kubernetes.NewForConfig(c.Config)
	require.NoError(t, err)
	kv, err := kvclient.NewForConfig(c.Config)
	require.NoError(t, err)
	deadline := time.Now().Add(60 * time.Second)
	for {
		nodes, err := kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		require.NoError(t, err)
		vmis, err := kv.VirtualMachineInstances("default").List(ctx, metav1.ListOptions{})
		require.NoError(t, err)
		running := 0
		for _, v := range vmis.Items {
			if v.Status.Phase == kvv1.Running {
				running++
			}
		}
		// vm-1..3 are Always, RerunOnFailure, Always
		if len(nodes.Items) == 2 && running == 3 {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("run returned early: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d nodes, %d running VMIs after 60s", len(nodes.Items), running)
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

// TestRunScenario: --scenario seeds the file's cluster: its nodes, its VMs on their nodes.
func TestRunScenario(t *testing.T) {
	c := cluster.StartT(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dir := t.TempDir()
	file := filepath.Join(dir, "two.yaml")
	require.NoError(t, os.WriteFile(file, []byte(`
nodes: [{name: left}, {name: right, labels: {rack: b}}]
vms:
- {name: db-1, cpu: 1, memory: 1Gi, node: right}
- {name: db-2, node: right, disk: {accessMode: ReadWriteOnce}}
`), 0o600))
	logs, err := os.CreateTemp(dir, "drover-sim-*.log")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"--kubeconfig", c.Kubeconfig, "--scenario", file, "--time-scale", "20"}, logs)
	}()
	kv, err := kvclient.NewForConfig(c.Config)
	require.NoError(t, err)
	deadline := time.Now().Add(60 * time.Second)
	for {
		vmis, err := kv.VirtualMachineInstances("default").List(ctx, metav1.ListOptions{})
		require.NoError(t, err)
		onRight := 0
		for _, v := range vmis.Items {
			if v.Status.Phase == kvv1.Running && v.Status.NodeName == "right" {
				onRight++
			}
		}
		if onRight == 2 {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("run returned early: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of 2 VMIs running on node right after 60s", onRight)
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
