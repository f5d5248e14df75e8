// Package observe is the handler `drover serve` runs for a workflow whose
// cluster logic is not built yet: it re-checks the event's target against
// the live cluster and records what it found, without changing anything. An
// unknown node or VM is a terminal error, so bad input is dead-lettered with
// a clear reason instead of being retried.
package observe

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

// VMIResource is KubeVirt's VirtualMachineInstance resource.
var VMIResource = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstances"}

// Handler records what the cluster says about an event's target. Kube and
// Dynamic may be nil when drover runs without a cluster.
type Handler struct {
	Kube    kubernetes.Interface
	Dynamic dynamic.Interface
}

var _ consumers.Handler = (*Handler)(nil)

// Handle implements consumers.Handler.
func (h *Handler) Handle(ctx context.Context, op *consumers.Operation, e consumers.Event) error {
	target := e.Keys.Target
	if h.Kube == nil {
		return op.Progress(ctx, target, consumers.TargetProgress{Phase: "Recorded",
			Message: "no cluster configured: event recorded, nothing inspected or changed"})
	}
	switch p := e.Payload.(type) {
	case *schemas.VMMigrateRequested, *schemas.VMMigrateCancelled:
		ns, name := vmName(p)
		vmi, err := h.Dynamic.Resource(VMIResource).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return consumers.Terminalf("virtual machine instance %s/%s does not exist", ns, name)
		}
		if err != nil {
			return fmt.Errorf("get vmi %s/%s: %w", ns, name, err)
		}
		phase, _, _ := unstructured.NestedString(vmi.Object, "status", "phase")
		node, _, _ := unstructured.NestedString(vmi.Object, "status", "nodeName")
		return op.Progress(ctx, target, consumers.TargetProgress{Phase: "Observed", Node: node,
			Message: "vmi phase " + phase + "; no workflow acts on it in this build"})
	default:
		node, err := h.Kube.CoreV1().Nodes().Get(ctx, target, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return consumers.Terminalf("node %s does not exist", target)
		}
		if err != nil {
			return fmt.Errorf("get node %s: %w", target, err)
		}
		return op.Progress(ctx, target, consumers.TargetProgress{Phase: "Observed", Node: target,
			Message: fmt.Sprintf("node Ready=%s unschedulable=%t; no workflow acts on it in this build", ready(node), node.Spec.Unschedulable)})
	}
}

func vmName(p schemas.Payload) (string, string) {
	switch v := p.(type) {
	case *schemas.VMMigrateRequested:
		return v.Namespace, v.Name
	case *schemas.VMMigrateCancelled:
		return v.Namespace, v.Name
	}
	return "", ""
}

func ready(n *corev1.Node) corev1.ConditionStatus {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status
		}
	}
	return corev1.ConditionUnknown
}
