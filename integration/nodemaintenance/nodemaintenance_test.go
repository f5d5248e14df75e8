// Package nodemaintenance_test runs drover's NodeMaintenance watcher against
// a real kube-apiserver with the medik8s CRD, a real nats-server and the
// runtime: resources in, maintenance requests out, status written back.
package nodemaintenance_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/cluster"
	"github.com/drover-io/drover/integration/deploy"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/producers/nodemaintenance"
	"github.com/drover-io/drover/schemas"
)

func TestNodeMaintenanceResources(t *testing.T) {
	// The watcher acts as drover's ServiceAccount with deploy/base's RBAC:
	// a permission it lacks fails the test (CheckAudit).
	c := cluster.StartWithOptionsT(t, cluster.Options{Audit: true})
	kubeconfig, err := deploy.InstallRBAC(context.Background(), c)
	require.NoError(t, err)
	t.Cleanup(func() {
		if err := deploy.CheckAudit(c); err != nil {
			t.Error(err)
		}
	})
	saConfig, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	require.NoError(t, err)
	dyn, err := dynamic.NewForConfig(saConfig)
	require.NoError(t, err)
	admin, err := dynamic.NewForConfig(c.Config)
	require.NoError(t, err)
	srv := natstest.Start(t)
	js, err := jetstream.New(natstest.Connect(t, srv.URL()))
	require.NoError(t, err)
	log := zerolog.New(zerolog.NewTestWriter(t))

	// A maintenance that moves two VMs: node-1's waits for the test between
	// them; node-2's runs until it is cancelled.
	moved := make(chan struct{})
	handler := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		req, ok := ev.Payload.(*schemas.MaintenanceRequested)
		if !ok {
			return nil // maintenance.ended: the runtime cancelled the request
		}
		for _, vm := range []string{"prod/db-0", "prod/web-0"} {
			if err := op.Progress(ctx, vm, consumers.TargetProgress{Phase: "Migrating", Node: "node-9"}); err != nil {
				return err
			}
		}
		if err := op.Flush(ctx); err != nil {
			return err
		}
		if req.Node == "node-2" {
			select {
			case <-op.Cancelled():
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if err := op.Progress(ctx, "prod/db-0", consumers.TargetProgress{Phase: "Running", Node: "node-9"}); err != nil {
			return err
		}
		if err := op.Flush(ctx); err != nil {
			return err
		}
		select {
		case <-moved:
		case <-ctx.Done():
			return ctx.Err()
		}
		return op.Progress(ctx, "prod/web-0", consumers.TargetProgress{Phase: "Running", Node: "node-9"})
	})
	cfg := consumers.Config{AckWait: 3 * time.Second, FetchWait: 200 * time.Millisecond, StatusInterval: 50 * time.Millisecond, ShutdownGrace: time.Second}
	rt, err := consumers.NewRuntime(natstest.Connect(t, srv.URL()), cfg, log, nil,
		consumers.Workflow{Name: schemas.WorkflowMaintenance, Concurrency: 4, Handler: handler})
	require.NoError(t, err)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	rtDone := make(chan error, 1)
	go func() { rtDone <- rt.Start(ctx) }()
	t.Cleanup(func() { stop(); <-rtDone })
	require.Eventually(t, rt.Bound, 30*time.Second, 20*time.Millisecond)

	w := &nodemaintenance.Watcher{Dynamic: dyn, JS: js, Publisher: &producers.Publisher{JS: js}, Interval: 100 * time.Millisecond, Log: log}
	wDone := make(chan error, 1)
	go func() { wDone <- w.Start(ctx) }()
	t.Cleanup(func() { stop(); <-wDone })

	res := admin.Resource(nodemaintenance.Resource) // a person (or Flux) creates and deletes them
	create := func(name, node string) *unstructured.Unstructured {
		nm, err := res.Create(ctx, &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "nodemaintenance.medik8s.io/v1beta1", "kind": "NodeMaintenance",
			"metadata": map[string]any{"name": name},
			"spec":     map[string]any{"nodeName": node, "reason": "replace disk"},
		}}, metav1.CreateOptions{})
		require.NoError(t, err)
		return nm
	}
	status := func(name string) (map[string]any, []string) {
		nm, err := res.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, nil
		}
		st, _, _ := unstructured.NestedMap(nm.Object, "status")
		return st, nm.GetFinalizers()
	}
	pending := func(st map[string]any) []any { p, _ := st["pendingPods"].([]any); return p }
	eventually := func(cond func() bool, msg string) {
		t.Helper()
		require.Eventually(t, cond, 30*time.Second, 50*time.Millisecond, msg)
	}

	nm1 := create("nm-node-1", "node-1")
	key1 := consumers.MaintenanceOperationKey("node-1", nodemaintenance.RequestID("nm-node-1", string(nm1.GetUID())))
	eventually(func() bool {
		st, fin := status("nm-node-1")
		return len(fin) == 1 && fin[0] == nodemaintenance.Finalizer && st["phase"] == "Running" &&
			st["drainProgress"] == int64(50) && len(pending(st)) == 1
	}, "a new NodeMaintenance gets drover's finalizer and its status follows the evacuation (1 of 2 VMs moved)")
	st, _ := status("nm-node-1")
	require.Equal(t, []any{"prod/web-0"}, st["pendingPods"])
	require.Equal(t, int64(2), st["totalpods"])

	close(moved)
	eventually(func() bool {
		st, _ := status("nm-node-1")
		return st["phase"] == "Succeeded" && st["drainProgress"] == int64(100) && st["pendingPods"] == nil
	}, "the evacuation's end shows as Succeeded, 100%")

	require.NoError(t, res.Delete(ctx, "nm-node-1", metav1.DeleteOptions{}))
	eventually(func() bool {
		_, err := res.Get(ctx, "nm-node-1", metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	}, "deleting it ends the maintenance, then the finalizer lets it go")
	kv, err := js.KeyValue(ctx, consumers.BucketOps)
	require.NoError(t, err)
	end, _, found, err := consumers.NewOpStore(kv).Get(ctx, consumers.MaintenanceEndOperationKey("node-1", nodemaintenance.RequestID("nm-node-1", string(nm1.GetUID()))))
	require.NoError(t, err)
	require.True(t, found)
	require.Equal(t, consumers.StateSucceeded, end.State)
	rec, _, _, err := consumers.NewOpStore(kv).Get(ctx, key1)
	require.NoError(t, err)
	require.Equal(t, consumers.StateSucceeded, rec.State)

	nm2 := create("nm-node-2", "node-2")
	eventually(func() bool {
		st, _ := status("nm-node-2")
		return st["phase"] == "Running" && len(pending(st)) == 2
	}, "the second maintenance runs")
	require.NoError(t, res.Delete(ctx, "nm-node-2", metav1.DeleteOptions{}))
	_, fin := status("nm-node-2")
	require.Contains(t, fin, nodemaintenance.Finalizer, "deleted mid-evacuation, it stays until drover ended the maintenance")
	eventually(func() bool {
		_, err := res.Get(ctx, "nm-node-2", metav1.GetOptions{})
		return apierrors.IsNotFound(err)
	}, "then it goes")
	rec, _, _, err = consumers.NewOpStore(kv).Get(ctx, consumers.MaintenanceOperationKey("node-2", nodemaintenance.RequestID("nm-node-2", string(nm2.GetUID()))))
	require.NoError(t, err)
	require.Equal(t, consumers.StateCancelled, rec.State, "the evacuation was cancelled, not left running")
}
