// Package platform_test tests handlers/platform's Cluster against a real
// kube-apiserver.
package platform_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/drover-io/drover/handlers/platform"
	"github.com/drover-io/drover/integration/cluster"
)

// TestFreshSeesWhatTheAPIServerSaw: a workflow that plans from the caches
// right after a person changed the cluster (uncordoned a node, then asked
// for maintenance) must see that change, or it rejects a request the live
// cluster allows. Fresh returns once the caches hold at least what a live
// read returned: every node changed just before is seen changed, every node
// deleted just before is gone.
func TestFreshSeesWhatTheAPIServerSaw(t *testing.T) {
	c := cluster.StartT(t)
	kube, err := kubernetes.NewForConfig(c.Config)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	pc, err := platform.New(c.Config, platform.Options{})
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- pc.Run(runCtx) }()
	t.Cleanup(func() { stop(); <-done })
	require.NoError(t, pc.Ready(ctx))

	for i := range 20 {
		name := fmt.Sprintf("fresh-%d", i)
		_, err := kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.NodeSpec{Unschedulable: true}}, metav1.CreateOptions{})
		require.NoError(t, err)
		require.NoError(t, pc.Fresh(ctx))
		require.NotNil(t, pc.Node(name), "a node created before Fresh is in the cache")

		_, err = kube.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, []byte(`{"spec":{"unschedulable":false}}`), metav1.PatchOptions{})
		require.NoError(t, err)
		require.NoError(t, pc.Fresh(ctx))
		require.False(t, pc.Node(name).Spec.Unschedulable, "uncordoned before Fresh: the cache says so")

		require.NoError(t, kube.CoreV1().Nodes().Delete(ctx, name, metav1.DeleteOptions{}))
		require.NoError(t, pc.Fresh(ctx))
		require.Nil(t, pc.Node(name), "deleted before Fresh: gone from the cache")
	}
}
