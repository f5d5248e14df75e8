package sim

// Deckhouse virtualization's evacuation controller
// (images/virtualization-artifact/pkg/controller/evacuation, handler/evacuation.go). Deckhouse's
// KubeVirt fork disables KubeVirt's evacuation controller (evacuation.go then only clears the
// mark at the hand-off, virt-handler's part): the eviction webhook still marks the VMI
// (status.evacuationNodeName), Deckhouse's VM controller turns the mark into the VM condition
// EvictionRequired (deckhouseConditions), and this controller answers it with a
// VirtualMachineOperation of type Evict, named evacuation-*, which the vmop controller carries out
// with a VirtualMachineInstanceMigration.
//
// Its back-off is Deckhouse's as written (common/backoff/backgoff.go): CalculateBackOff(n) is
// wait.Backoff{Duration: 2s, Factor: 2, Steps: n}.Step(), which is 2 s for every n > 0, and the
// handler creates nothing while it is positive. So once an evacuation operation of a VM has
// failed, no other is created while that failed operation exists (Deckhouse's vmop garbage
// collector deletes finished operations after 24 h); the VM stays EvictionRequired and a drain
// keeps getting 429s.

import (
	"context"
	"errors"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/retry"
	kvv1 "kubevirt.io/api/core/v1"
)

const (
	// AnnotationVMOPEvacuation marks a VirtualMachineOperation the evacuation controller created
	// (annotations.AnnVMOPEvacuation).
	AnnotationVMOPEvacuation = "virtualization.deckhouse.io/evacuation"
	// finalizerVMOPEvacuation is v1alpha2.FinalizerVMOPProtectionByEvacuationController.
	finalizerVMOPEvacuation = "virtualization.deckhouse.io/vmop-protection-by-evacuation-controller"
	// vmopEvacuationPrefix is the GenerateName of the evacuation operations.
	vmopEvacuationPrefix = "evacuation-"
	// byVMOPVM indexes operations by namespace/spec.virtualMachineName.
	byVMOPVM = "vmopvm"
)

// deckhouseEvacuationBackoff is common/backoff.CalculateBackOff.
func deckhouseEvacuationBackoff(failed int) time.Duration {
	if failed == 0 {
		return 0
	}
	b := wait.Backoff{Duration: 2 * time.Second, Factor: 2.0, Cap: 5 * time.Minute, Steps: failed}
	return b.Step()
}

// setupDeckhouseEvacuation indexes operations by VM and wakes the controller as
// evacuation/internal/watcher does: on VM changes while EvictionRequired or Migrating holds, and
// on changes of the VM's operations.
func (s *Simulator) setupDeckhouseEvacuation() {
	if err := s.vmopInformer.AddIndexers(cache.Indexers{byVMOPVM: func(obj interface{}) ([]string, error) {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			return nil, nil
		}
		vm, _, _ := unstructured.NestedString(u.Object, "spec", "virtualMachineName")
		return []string{u.GetNamespace() + "/" + vm}, nil
	}}); err != nil {
		panic(fmt.Sprintf("sim: add vmop indexer: %v", err))
	}
	_, _ = s.dvmInformer.AddEventHandler(handler(func(obj interface{}) {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok {
			return
		}
		if deckhouseConditionTrue(u, DeckhouseConditionEvictionRequired) || deckhouseConditionTrue(u, DeckhouseConditionMigrating) {
			s.dhEvacQueue.Add(keyOf(u))
		}
	}))
	_, _ = s.vmopInformer.AddEventHandler(handler(func(obj interface{}) {
		if u, ok := obj.(*unstructured.Unstructured); ok {
			vm, _, _ := unstructured.NestedString(u.Object, "spec", "virtualMachineName")
			s.dhEvacQueue.Add(u.GetNamespace() + "/" + vm)
		}
	}))
}

func deckhouseConditionTrue(u *unstructured.Unstructured, typ string) bool {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		if m, ok := c.(map[string]any); ok && m["type"] == typ {
			return m["status"] == string(metav1.ConditionTrue)
		}
	}
	return false
}

// runDeckhouseEvacuation runs the evacuation controller until ctx ends.
func (s *Simulator) runDeckhouseEvacuation(ctx context.Context) error {
	pending := newRSExpectations() // evacuation operations created, not in the cache yet
	return s.runWorkers(ctx, "deckhouse-evacuation", s.dhEvacQueue, 2, func(ctx context.Context, key string) error {
		return s.syncDeckhouseEvacuation(ctx, key, pending)
	})
}

// syncDeckhouseEvacuation is EvacuationHandler.Handle for VM key.
func (s *Simulator) syncDeckhouseEvacuation(ctx context.Context, key string, pending *rsExpectations) error {
	vm := s.getDVM(key)
	if vm == nil {
		return nil
	}
	ns := vm.GetNamespace()
	var active, finished []*unstructured.Unstructured
	cached := map[string]bool{}
	objs, _ := s.vmopInformer.GetIndexer().ByIndex(byVMOPVM, key)
	for _, o := range objs {
		op := o.(*unstructured.Unstructured)
		cached[op.GetName()] = true
		typ, _, _ := unstructured.NestedString(op.Object, "spec", "type")
		if typ != VMOPTypeEvict && typ != VMOPTypeMigrate {
			continue
		}
		switch phase, _, _ := unstructured.NestedString(op.Object, "status", "phase"); phase {
		case VMOPPhaseCompleted, VMOPPhaseFailed, "Superseded":
			finished = append(finished, op)
		default:
			active = append(active, op)
		}
	}
	var errs []error
	for _, op := range finished {
		errs = append(errs, s.releaseEvacuationVMOP(ctx, op))
	}
	if n := pending.pendingNames(key, cached, s.clock.Now()); n > 0 {
		return errors.Join(errs...) // its creation event brings the key back
	}
	if len(active) > 0 {
		for _, op := range active {
			if _, evac := op.GetAnnotations()[AnnotationVMOPEvacuation]; evac && op.GetDeletionTimestamp() != nil {
				// A deleted evacuation cancels the evacuation (evacuate/cancel), then lets go.
				errs = append(errs, s.cancelEvacuation(ctx, ns, vm.GetName()), s.releaseEvacuationVMOP(ctx, op))
			}
		}
		return errors.Join(errs...)
	}
	if !deckhouseConditionTrue(vm, DeckhouseConditionEvictionRequired) || deckhouseConditionTrue(vm, DeckhouseConditionMigrating) {
		return errors.Join(errs...)
	}
	if vmi := s.getVMI(key); vmi == nil || vmi.Status.Phase != kvv1.Running || vmi.Status.EvacuationNodeName == "" {
		// The condition is stale: the VM controller is about to drop it (a real controller
		// meets the same lag far less often than the simulator's tight loops do).
		return errors.Join(errs...)
	}
	failed := 0
	for _, op := range finished {
		phase, _, _ := unstructured.NestedString(op.Object, "status", "phase")
		if _, evac := op.GetAnnotations()[AnnotationVMOPEvacuation]; evac && phase == VMOPPhaseFailed {
			failed++
		}
	}
	if backoff := deckhouseEvacuationBackoff(failed); backoff > 0 {
		s.dhEvacQueue.AddAfter(key, s.scaled(backoff))
		return errors.Join(errs...)
	}
	op := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": DeckhouseVMOPGVR.GroupVersion().String(), "kind": "VirtualMachineOperation",
		"metadata": map[string]any{
			"generateName": vmopEvacuationPrefix, "namespace": ns,
			"annotations": map[string]any{AnnotationVMOPEvacuation: "true"},
			"finalizers":  []any{finalizerVMOPEvacuation},
		},
		"spec": map[string]any{"type": VMOPTypeEvict, "virtualMachineName": vm.GetName()},
	}}
	created, err := s.Dynamic.Resource(DeckhouseVMOPGVR).Namespace(ns).Create(ctx, op, metav1.CreateOptions{})
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("deckhouse evacuation of vm %s: create vmop: %w", key, err))...)
	}
	pending.expect(pending.creating, key, created.GetName(), s.clock.Now())
	s.log.Info().Str("vm", key).Str("vmop", created.GetName()).Msg("deckhouse evacuation: created Evict operation")
	return errors.Join(errs...)
}

// pendingNames counts the operations created for key that the cache does not show yet.
func (e *rsExpectations) pendingNames(key string, cached map[string]bool, now time.Time) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for name, at := range e.creating[key] {
		if cached[name] || now.Sub(at) > rsExpectTimeout {
			delete(e.creating[key], name)
			continue
		}
		n++
	}
	return n
}

// releaseEvacuationVMOP removes the evacuation controller's finalizer from op.
func (s *Simulator) releaseEvacuationVMOP(ctx context.Context, op *unstructured.Unstructured) error {
	if !hasString(op.GetFinalizers(), finalizerVMOPEvacuation) {
		return nil
	}
	c := s.Dynamic.Resource(DeckhouseVMOPGVR).Namespace(op.GetNamespace())
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := c.Get(ctx, op.GetName(), metav1.GetOptions{})
		if err != nil {
			return err
		}
		if !removeFinalizer(cur, finalizerVMOPEvacuation) {
			return nil
		}
		_, err = c.Update(ctx, cur, metav1.UpdateOptions{})
		return err
	})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deckhouse evacuation: release vmop %s: %w", keyOf(op), err)
	}
	return nil
}

// cancelEvacuation is KubeVirt's evacuate/cancel subresource, which Deckhouse's
// cancel-evacuation calls: it clears the VMI's status.evacuationNodeName ("not evacuated" when
// there is none is not an error).
func (s *Simulator) cancelEvacuation(ctx context.Context, ns, name string) error {
	_, err := s.mutateVMI(ctx, ns, name, func(vmi *kvv1.VirtualMachineInstance) bool {
		if vmi.Status.EvacuationNodeName == "" {
			return false
		}
		vmi.Status.EvacuationNodeName = ""
		return true
	})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deckhouse evacuation: cancel evacuation of vmi %s/%s: %w", ns, name, err)
	}
	return nil
}
