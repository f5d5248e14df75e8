package platform

import (
	"context"
	"encoding/json"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	kvv1 "kubevirt.io/api/core/v1"
)

// AnnotationRunStrategyBefore keeps, on a KubeVirt VM drover halted, the run
// strategy to give it back when it starts it again.
const AnnotationRunStrategyBefore = "drover.io/run-strategy-before-maintenance"

// RunStrategy returns a VM's run strategy: KubeVirt's spec.runStrategy (or
// Always/Halted from the deprecated spec.running), Deckhouse's
// spec.runPolicy. "" when the VM is unknown.
func (c *Cluster) RunStrategy(vmi *kvv1.VirtualMachineInstance, ns, name string) string {
	if c.PlatformOf(vmi) == Deckhouse {
		if dvm := c.DeckhouseVM(ns, name); dvm != nil {
			p, _, _ := unstructured.NestedString(dvm.Object, "spec", "runPolicy")
			if p == "" {
				p = "AlwaysOnUnlessStoppedManually"
			}
			return p
		}
		return ""
	}
	vm := c.VM(ns, name)
	if vm == nil {
		return ""
	}
	s, err := vm.RunStrategy()
	if err != nil {
		return ""
	}
	if before := vm.Annotations[AnnotationRunStrategyBefore]; before != "" && s == kvv1.RunStrategyHalted {
		return before
	}
	return string(s)
}

// powerOp creates a Deckhouse VirtualMachineOperation of type typ named
// name (deterministic: a re-run finds it).
func (c *Cluster) powerOp(ctx context.Context, ns, vm, name, typ, op, token string) error {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": DeckhouseVMOPResource.GroupVersion().String(), "kind": "VirtualMachineOperation",
		"metadata": map[string]any{"name": name, "namespace": ns},
		"spec":     map[string]any{"type": typ, "virtualMachineName": vm}}}
	u.SetLabels(map[string]string{LabelOperation: OpHash(op), LabelManagedBy: ManagedBy})
	u.SetAnnotations(map[string]string{AnnotationOperation: op, AnnotationToken: token})
	_, err := c.Dynamic.Resource(DeckhouseVMOPResource).Namespace(ns).Create(ctx, u, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create %s operation %s/%s for %s: %w", typ, ns, name, vm, err)
	}
	return nil
}

// stateChange appends state change requests to a KubeVirt VM's status, as
// virt-api's start, stop and restart subresources do, unless an equal
// request is already queued.
func (c *Cluster) stateChange(ctx context.Context, ns, name string, reqs ...kvv1.VirtualMachineStateChangeRequest) error {
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		vm, err := c.KubeVirt.VirtualMachines(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, r := range reqs {
			dup := false
			for _, q := range vm.Status.StateChangeRequests {
				if q.Action == r.Action && (r.UID == nil || (q.UID != nil && *q.UID == *r.UID)) {
					dup = true
				}
			}
			if !dup {
				vm.Status.StateChangeRequests = append(vm.Status.StateChangeRequests, r)
			}
		}
		_, err = c.KubeVirt.VirtualMachines(ns).UpdateStatus(ctx, vm, metav1.UpdateOptions{})
		return err
	})
}

// Restart shuts the VM of vmi down so that it starts again elsewhere: a stop
// and a start request for that VMI (KubeVirt's restart), or a Restart
// operation (Deckhouse). It never deletes the VM.
func (c *Cluster) Restart(ctx context.Context, vmi *kvv1.VirtualMachineInstance, op, token string) error {
	if c.PlatformOf(vmi) == Deckhouse {
		return c.powerOp(ctx, vmi.Namespace, vmi.Name, ObjectName(op, vmi.Name, "restart"), VMOPRestart, op, token)
	}
	uid := vmi.UID
	return c.stateChange(ctx, vmi.Namespace, vmi.Name,
		kvv1.VirtualMachineStateChangeRequest{Action: kvv1.StopRequest, UID: &uid},
		kvv1.VirtualMachineStateChangeRequest{Action: kvv1.StartRequest})
}

// Stop shuts the VM of vmi down and keeps it down: a Stop operation
// (Deckhouse); on KubeVirt a stop request, and for run strategy Always (which
// would start it again) the run strategy Halted, the former one kept in an
// annotation for Start, as `virtctl stop` does.
func (c *Cluster) Stop(ctx context.Context, vmi *kvv1.VirtualMachineInstance, op, token string) error {
	if c.PlatformOf(vmi) == Deckhouse {
		return c.powerOp(ctx, vmi.Namespace, vmi.Name, ObjectName(op, vmi.Name, "stop"), VMOPStop, op, token)
	}
	vm, err := c.KubeVirt.VirtualMachines(vmi.Namespace).Get(ctx, vmi.Name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("stop vm %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}
	s, err := vm.RunStrategy()
	if err != nil {
		return fmt.Errorf("stop vm %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}
	if s == kvv1.RunStrategyAlways {
		patch, _ := json.Marshal(map[string]any{
			"metadata": map[string]any{"annotations": map[string]string{AnnotationRunStrategyBefore: string(s)}},
			"spec":     map[string]any{"runStrategy": kvv1.RunStrategyHalted}})
		if _, err := c.KubeVirt.VirtualMachines(vmi.Namespace).Patch(ctx, vmi.Name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			return fmt.Errorf("stop vm %s/%s: halt: %w", vmi.Namespace, vmi.Name, err)
		}
		return nil
	}
	uid := vmi.UID
	return c.stateChange(ctx, vmi.Namespace, vmi.Name, kvv1.VirtualMachineStateChangeRequest{Action: kvv1.StopRequest, UID: &uid})
}

// Start starts a VM drover stopped: it gives a halted KubeVirt VM its run
// strategy back, or sends a start request; on Deckhouse a Start operation.
func (c *Cluster) Start(ctx context.Context, platform, ns, name, op, token string) error {
	if platform == Deckhouse {
		return c.powerOp(ctx, ns, name, ObjectName(op, name, "start"), VMOPStart, op, token)
	}
	vm, err := c.KubeVirt.VirtualMachines(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("start vm %s/%s: %w", ns, name, err)
	}
	if before := vm.Annotations[AnnotationRunStrategyBefore]; before != "" {
		patch, _ := json.Marshal(map[string]any{
			"metadata": map[string]any{"annotations": map[string]any{AnnotationRunStrategyBefore: nil}},
			"spec":     map[string]any{"runStrategy": before}})
		if _, err := c.KubeVirt.VirtualMachines(ns).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
			return fmt.Errorf("start vm %s/%s: restore run strategy %s: %w", ns, name, before, err)
		}
		return nil
	}
	if c.VMI(ns, name) != nil {
		return nil
	}
	return c.stateChange(ctx, ns, name, kvv1.VirtualMachineStateChangeRequest{Action: kvv1.StartRequest})
}
