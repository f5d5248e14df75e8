// Package migration holds the single-VM migration workflow's cluster logic.
// This file finds the node a VM runs on, whose lease a migration takes at the
// lowest priority, so that it never runs beside a maintenance or a recovery
// of that node.
package migration

import (
	"context"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

// Resources the resolver reads.
var (
	// VMIResource is KubeVirt's VirtualMachineInstance.
	VMIResource = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstances"}
	// DeckhouseVMResource is Deckhouse virtualization's VirtualMachine.
	DeckhouseVMResource = schema.GroupVersionResource{Group: "virtualization.deckhouse.io", Version: "v1alpha2", Resource: "virtualmachines"}
)

// NodeLock adds the lease of the node a VM runs on to a migration's keys:
// the KubeVirt VMI's status.nodeName, else the Deckhouse VirtualMachine's. A
// VM that runs nowhere (stopped, unknown) adds nothing; the handler reports it.
type NodeLock struct {
	Dynamic dynamic.Interface
}

var _ consumers.Resolver = (*NodeLock)(nil)

// Resolve implements consumers.Resolver.
func (n *NodeLock) Resolve(ctx context.Context, e consumers.Event, keys consumers.Keys) (consumers.Keys, error) {
	var ns, name string
	switch p := e.Payload.(type) {
	case *schemas.VMMigrateRequested:
		ns, name = p.Namespace, p.Name
	case *schemas.VMMigrateCancelled:
		return keys, nil // cancelling takes the VM's lease only
	default:
		return keys, nil
	}
	node, err := n.nodeOf(ctx, ns, name)
	if err != nil || node == "" {
		return keys, err
	}
	keys.Locks = append(keys.Locks, consumers.Lock{Key: consumers.NodeLock(node), Priority: consumers.PriorityMigration})
	return keys, nil
}

func (n *NodeLock) nodeOf(ctx context.Context, ns, name string) (string, error) {
	for _, gvr := range []schema.GroupVersionResource{VMIResource, DeckhouseVMResource} {
		obj, err := n.Dynamic.Resource(gvr).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue // no such object, or no such API on this platform
		}
		if err != nil {
			return "", fmt.Errorf("read %s %s/%s to find its node: %w", gvr.Resource, ns, name, err)
		}
		node, _, _ := unstructured.NestedString(obj.Object, "status", "nodeName")
		return node, nil
	}
	return "", nil
}
