// Package resolve_test checks the resolvers that name operations from the
// live cluster (recovery incidents, a migration's node) against a real
// kube-apiserver.
package resolve_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/migration"
	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/integration/cluster"
	"github.com/drover-io/drover/schemas"
)

func event(t *testing.T, p schemas.Payload, id string) (consumers.Event, consumers.Keys) {
	t.Helper()
	keys, err := consumers.Route(p, id)
	require.NoError(t, err)
	return consumers.Event{Payload: p, Keys: keys}, keys
}

// node creates a node whose Ready condition changed at readySince with
// status ready, and whose kubelet Lease was last renewed at renewed.
func node(t *testing.T, kube kubernetes.Interface, name string, ready corev1.ConditionStatus, readySince, renewed time.Time) *corev1.Node {
	t.Helper()
	ctx := context.Background()
	n, err := kube.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	require.NoError(t, err)
	n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: ready,
		LastTransitionTime: metav1.NewTime(readySince), LastHeartbeatTime: metav1.NewTime(readySince)}}
	n, err = kube.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
	require.NoError(t, err)
	rt := metav1.NewMicroTime(renewed)
	_, err = kube.CoordinationV1().Leases(corev1.NamespaceNodeLease).Create(ctx, &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: corev1.NamespaceNodeLease},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &name, RenewTime: &rt},
	}, metav1.CreateOptions{})
	require.NoError(t, err)
	return n
}

func TestResolvers(t *testing.T) {
	c := cluster.StartT(t)
	kube, err := kubernetes.NewForConfig(c.Config)
	require.NoError(t, err)
	dyn, err := dynamic.NewForConfig(c.Config)
	require.NoError(t, err)
	ctx := context.Background()
	now := time.Now().Truncate(time.Second)
	inc := &recovery.Incident{Kube: kube}

	t.Run("a dead node: every producer's event is one incident", func(t *testing.T) {
		// The lease stopped 2 minutes ago; the node lifecycle controller
		// marked it Unknown 70 s ago.
		n := node(t, kube, "dead-1", corev1.ConditionUnknown, now.Add(-70*time.Second), now.Add(-2*time.Minute))
		var ops []string
		for _, since := range []time.Time{now.Add(-80 * time.Second), now.Add(15 * time.Minute)} { // node watcher, Alertmanager
			ev, keys := event(t, &schemas.NodeNotReady{Node: "dead-1", Since: since, Reason: "test"}, "e")
			got, err := inc.Resolve(ctx, ev, keys)
			require.NoError(t, err)
			ops = append(ops, got.Operation)
		}
		require.Equal(t, ops[0], ops[1])
		require.Equal(t, consumers.RecoveryOperationKey("dead-1", string(n.UID)+"-"+itoa(now.Add(-2*time.Minute).Unix())), ops[0])
	})
	t.Run("a node that renews its lease but is not Ready: the spell starts at the transition", func(t *testing.T) {
		n := node(t, kube, "sick-1", corev1.ConditionFalse, now.Add(-30*time.Second), now)
		ev, keys := event(t, &schemas.NodeNotReady{Node: "sick-1", Since: now, Reason: "test"}, "e")
		got, err := inc.Resolve(ctx, ev, keys)
		require.NoError(t, err)
		require.Equal(t, consumers.RecoveryOperationKey("sick-1", string(n.UID)+"-"+itoa(now.Add(-30*time.Second).Unix())), got.Operation)
	})
	t.Run("a node Ready again: the event's own spell (a stale event, or one redelivered after the node came back)", func(t *testing.T) {
		n := node(t, kube, "fine-1", corev1.ConditionTrue, now.Add(-time.Second), now)
		since := now.Add(-time.Minute)
		ev, keys := event(t, &schemas.NodeNotReady{Node: "fine-1", Since: since, Reason: "test"}, "e")
		got, err := inc.Resolve(ctx, ev, keys)
		require.NoError(t, err)
		require.Equal(t, consumers.RecoveryOperationKey("fine-1", string(n.UID)+"-"+itoa(since.Unix())), got.Operation)
	})
	t.Run("a node the cloud controller deleted keeps the event's key", func(t *testing.T) {
		ev, keys := event(t, &schemas.NodeNotReady{Node: "gone-1", Since: now, Reason: "test"}, "e")
		got, err := inc.Resolve(ctx, ev, keys)
		require.NoError(t, err)
		require.Equal(t, keys.Operation, got.Operation)
	})

	lock := &migration.NodeLock{Dynamic: dyn}
	t.Run("a migration also takes the lease of the VM's node", func(t *testing.T) {
		vmi := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
			"metadata": map[string]any{"name": "db-0", "namespace": "default"},
			"spec":     map[string]any{"domain": map[string]any{"devices": map[string]any{}}},
			"status":   map[string]any{"nodeName": "dead-1", "phase": "Running"},
		}}
		res := dyn.Resource(migration.VMIResource).Namespace("default")
		created, err := res.Create(ctx, vmi, metav1.CreateOptions{})
		require.NoError(t, err)
		if node, _, _ := unstructured.NestedString(created.Object, "status", "nodeName"); node == "" {
			created.Object["status"] = vmi.Object["status"]
			_, err = res.UpdateStatus(ctx, created, metav1.UpdateOptions{})
			require.NoError(t, err)
		}
		ev, keys := event(t, &schemas.VMMigrateRequested{Namespace: "default", Name: "db-0"}, "e")
		got, err := lock.Resolve(ctx, ev, keys)
		require.NoError(t, err)
		require.ElementsMatch(t, []consumers.Lock{
			{Key: consumers.VMLock("default", "db-0"), Priority: consumers.PriorityMigration},
			{Key: consumers.NodeLock("dead-1"), Priority: consumers.PriorityMigration},
		}, got.Locks)
	})
	t.Run("a VM that does not exist adds nothing", func(t *testing.T) {
		ev, keys := event(t, &schemas.VMMigrateRequested{Namespace: "default", Name: "nope"}, "e")
		got, err := lock.Resolve(ctx, ev, keys)
		require.NoError(t, err)
		require.Equal(t, keys.Locks, got.Locks)
	})
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
