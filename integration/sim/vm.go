package sim

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

func (s *Simulator) runVMs(ctx context.Context) error {
	return s.runWorkers(ctx, "vm", s.vmQueue, 4, s.syncVM)
}

func controlledBy(obj metav1.Object, apiVersion, kind string) *metav1.OwnerReference {
	ref := metav1.GetControllerOf(obj)
	if ref == nil || ref.APIVersion != apiVersion || ref.Kind != kind {
		return nil
	}
	return ref
}

// syncVM plays virt-controller's VirtualMachine controller, while virt-controller
// runs (virtControllerActive): it keeps a VMI
// of the VM's name in line with spec.runStrategy (Always, RerunOnFailure,
// Manual, Halted, Once), honours status.stateChangeRequests (what virtctl
// start/stop do through virt-api), backs off restarts of VMIs that fail
// before they ever run, and reports status.
func (s *Simulator) syncVM(ctx context.Context, key string) error {
	if !s.virtControllerActive() {
		return nil // a new leader resyncs every VM
	}
	ns, name := splitKey(key)
	vm := s.getVM(key)
	vmi := s.getVMI(key)
	if vmi != nil && controlledBy(vmi, kvv1.SchemeGroupVersion.String(), "VirtualMachine") == nil {
		vmi = nil // not ours (a Deckhouse VM's or a bare VMI)
	}
	if vmi != nil && vmi.DeletionTimestamp != nil && hasFinalizer(vmi, kvv1.VirtualMachineControllerFinalizer) {
		if _, err := s.mutateVMI(ctx, ns, name, func(v *kvv1.VirtualMachineInstance) bool {
			return removeFinalizer(v, kvv1.VirtualMachineControllerFinalizer)
		}); err != nil {
			return fmt.Errorf("vm %s: release vmi: %w", key, err)
		}
	}
	if vm == nil || (vmi != nil && metav1.GetControllerOf(vmi).UID != vm.UID) {
		// garbage collection of a VMI whose VM is gone
		if vmi != nil && vmi.DeletionTimestamp == nil {
			return s.deleteVMI(ctx, vmi)
		}
		return nil
	}
	if vm.DeletionTimestamp != nil {
		if vmi != nil {
			if vmi.DeletionTimestamp == nil {
				return s.deleteVMI(ctx, vmi)
			}
			return s.updateVMStatus(ctx, vm, vmi)
		}
		_, err := s.mutateVM(ctx, ns, name, false, func(v *kvv1.VirtualMachine) bool {
			return removeFinalizer(v, kvv1.VirtualMachineControllerFinalizer)
		})
		return err
	}
	if !hasFinalizer(vm, kvv1.VirtualMachineControllerFinalizer) {
		if _, err := s.mutateVM(ctx, ns, name, false, func(v *kvv1.VirtualMachine) bool {
			return addFinalizer(v, kvv1.VirtualMachineControllerFinalizer)
		}); err != nil {
			return fmt.Errorf("vm %s: add finalizer: %w", key, err)
		}
	}

	strategy, err := vm.RunStrategy()
	if err != nil {
		return fmt.Errorf("vm %s: %w", key, err)
	}
	vm, err = s.syncStartFailure(ctx, vm, vmi)
	if err != nil || vm == nil {
		return err
	}
	startReq := len(vm.Status.StateChangeRequests) > 0 && vm.Status.StateChangeRequests[0].Action == kvv1.StartRequest
	stopReq := vmi != nil && len(vm.Status.StateChangeRequests) > 0 && vm.Status.StateChangeRequests[0].Action == kvv1.StopRequest &&
		(vm.Status.StateChangeRequests[0].UID == nil || *vm.Status.StateChangeRequests[0].UID == vmi.UID)
	start := func() error {
		if left := s.startBackoffLeft(vm); left > 0 {
			s.vmQueue.AddAfter(key, left)
			return s.updateVMStatus(ctx, vm, vmi)
		}
		created, err := s.createVMIFromVM(ctx, vm)
		if err != nil {
			return err
		}
		return s.updateVMStatus(ctx, vm, created, popStart)
	}
	stop := func(alsoStart bool) error {
		if vmi.DeletionTimestamp == nil {
			if err := s.deleteVMI(ctx, vmi); err != nil {
				return err
			}
		}
		var edits []statusEdit
		if stopReq {
			edits = append(edits, popStop)
		}
		if alsoStart && !startReq {
			edits = append(edits, pushStart)
		}
		return s.updateVMStatus(ctx, vm, vmi, edits...)
	}

	switch strategy {
	case kvv1.RunStrategyAlways:
		if vmi != nil {
			if (stopReq || vmiFinal(vmi)) && vmi.DeletionTimestamp == nil {
				return stop(false)
			}
			return s.updateVMStatus(ctx, vm, vmi)
		}
		return start()
	case kvv1.RunStrategyRerunOnFailure:
		if vmi != nil {
			if vmi.DeletionTimestamp == nil && (stopReq || vmiFinal(vmi)) {
				return stop(vmi.Status.Phase == kvv1.Failed && !stopReq)
			}
			return s.updateVMStatus(ctx, vm, vmi)
		}
		if !startReq && vm.Status.RunStrategy == strategy {
			return s.updateVMStatus(ctx, vm, vmi)
		}
		return start()
	case kvv1.RunStrategyManual:
		if vmi != nil {
			if stopReq && vmi.DeletionTimestamp == nil {
				return stop(false)
			}
			return s.updateVMStatus(ctx, vm, vmi)
		}
		if startReq {
			return start()
		}
		return s.updateVMStatus(ctx, vm, vmi, popStop)
	case kvv1.RunStrategyHalted:
		if vmi != nil && vmi.DeletionTimestamp == nil {
			return stop(false)
		}
		return s.updateVMStatus(ctx, vm, vmi, popStop)
	case kvv1.RunStrategyOnce:
		if vmi == nil {
			return start()
		}
		return s.updateVMStatus(ctx, vm, vmi)
	}
	return fmt.Errorf("vm %s: unknown run strategy %q", key, strategy)
}

func (s *Simulator) deleteVMI(ctx context.Context, vmi *kvv1.VirtualMachineInstance) error {
	uid := vmi.UID
	err := s.kv.VirtualMachineInstances(vmi.Namespace).Delete(ctx, vmi.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("delete vmi %s: %w", keyOf(vmi), err)
	}
	return nil
}

func (s *Simulator) createVMIFromVM(ctx context.Context, vm *kvv1.VirtualMachine) (*kvv1.VirtualMachineInstance, error) {
	if vm.Spec.Template == nil {
		return nil, fmt.Errorf("vm %s: no template", keyOf(vm))
	}
	vmi := &kvv1.VirtualMachineInstance{
		ObjectMeta: *vm.Spec.Template.ObjectMeta.DeepCopy(),
		Spec:       *vm.Spec.Template.Spec.DeepCopy(),
	}
	vmi.Name = vm.Name
	vmi.GenerateName = ""
	vmi.Namespace = vm.Namespace
	vmi.OwnerReferences = []metav1.OwnerReference{{
		APIVersion: kvv1.SchemeGroupVersion.String(), Kind: "VirtualMachine", Name: vm.Name, UID: vm.UID,
		Controller: ptr.To(true), BlockOwnerDeletion: ptr.To(true),
	}}
	vmi.Finalizers = []string{kvv1.VirtualMachineControllerFinalizer}
	if vmi.Labels == nil {
		vmi.Labels = map[string]string{}
	}
	vmi.Labels["vm.kubevirt.io/name"] = vm.Name
	created, err := s.kv.VirtualMachineInstances(vm.Namespace).Create(ctx, vmi, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("vm %s: previous vmi still terminating: %w", keyOf(vm), err)
	}
	if err != nil {
		return nil, fmt.Errorf("vm %s: create vmi: %w", keyOf(vm), err)
	}
	s.log.Info().Str("vm", keyOf(vm)).Msg("vm: started by creating a new VMI")
	return created, nil
}

// wasRunning reports whether vmi ever reached Running.
func wasRunning(vmi *kvv1.VirtualMachineInstance) bool {
	for _, t := range vmi.Status.PhaseTransitionTimestamps {
		if t.Phase == kvv1.Running {
			return true
		}
	}
	return false
}

// startBackoffSeconds is KubeVirt's calculateStartBackoffTime.
func startBackoffSeconds(failCount int, maxDelay int) int {
	if failCount <= 0 {
		failCount = 1
	}
	interval := max(maxDelay/30, 10)
	delay := interval * failCount * failCount
	delay += rand.IntN(delay/2 + 1)
	return min(delay, maxDelay)
}

func (s *Simulator) startBackoffLeft(vm *kvv1.VirtualMachine) time.Duration {
	sf := vm.Status.StartFailure
	if sf == nil || sf.RetryAfterTimestamp == nil {
		return 0
	}
	return sf.RetryAfterTimestamp.Time.Sub(s.clock.Now())
}

// syncStartFailure records a VMI that failed before it ever ran (back-off)
// and clears the record once a VMI runs.
func (s *Simulator) syncStartFailure(ctx context.Context, vm *kvv1.VirtualMachine, vmi *kvv1.VirtualMachineInstance) (*kvv1.VirtualMachine, error) {
	switch {
	case vmi != nil && vmi.Status.Phase == kvv1.Running && vm.Status.StartFailure != nil:
		return s.mutateVM(ctx, vm.Namespace, vm.Name, true, func(v *kvv1.VirtualMachine) bool {
			v.Status.StartFailure = nil
			return true
		})
	case vmi != nil && vmi.Status.Phase == kvv1.Failed && !wasRunning(vmi):
		if sf := vm.Status.StartFailure; sf != nil && sf.LastFailedVMIUID == vmi.UID {
			return vm, nil
		}
		count := 1
		if vm.Status.StartFailure != nil {
			count = vm.Status.StartFailure.ConsecutiveFailCount + 1
		}
		delay := s.scaled(time.Duration(startBackoffSeconds(count, int(s.opts.StartBackoffMax/time.Second))) * time.Second)
		retry := metav1.NewTime(s.clock.Now().Add(delay))
		return s.mutateVM(ctx, vm.Namespace, vm.Name, true, func(v *kvv1.VirtualMachine) bool {
			v.Status.StartFailure = &kvv1.VirtualMachineStartFailure{LastFailedVMIUID: vmi.UID, RetryAfterTimestamp: &retry, ConsecutiveFailCount: count}
			return true
		})
	}
	return vm, nil
}

type statusEdit int

const (
	popStart statusEdit = iota
	popStop
	pushStart
)

// printableStatus is what `kubectl get vm` shows.
func (s *Simulator) printableStatus(vm *kvv1.VirtualMachine, vmi *kvv1.VirtualMachineInstance) kvv1.VirtualMachinePrintableStatus {
	switch {
	case vm.DeletionTimestamp != nil:
		return kvv1.VirtualMachineStatusTerminating
	case vmi == nil:
		if s.startBackoffLeft(vm) > 0 {
			return kvv1.VirtualMachineStatusCrashLoopBackOff
		}
		return kvv1.VirtualMachineStatusStopped
	case vmi.DeletionTimestamp != nil:
		return kvv1.VirtualMachineStatusStopping
	}
	switch vmi.Status.Phase {
	case kvv1.VmPhaseUnset, kvv1.Pending, kvv1.Scheduling:
		if c := vmiCondition(vmi, kvv1.VirtualMachineInstanceConditionType(corev1.PodScheduled)); c != nil && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
			return kvv1.VirtualMachineStatusUnschedulable
		}
		return kvv1.VirtualMachineStatusStarting
	case kvv1.Scheduled:
		return kvv1.VirtualMachineStatusStarting
	case kvv1.Running:
		if ms := vmi.Status.MigrationState; ms != nil && !ms.Completed {
			return kvv1.VirtualMachineStatusMigrating
		}
		return kvv1.VirtualMachineStatusRunning
	case kvv1.Succeeded, kvv1.Failed:
		if s.startBackoffLeft(vm) > 0 {
			return kvv1.VirtualMachineStatusCrashLoopBackOff
		}
		return kvv1.VirtualMachineStatusStopped
	}
	return kvv1.VirtualMachineStatusUnknown
}

func (s *Simulator) updateVMStatus(ctx context.Context, vm *kvv1.VirtualMachine, vmi *kvv1.VirtualMachineInstance, edits ...statusEdit) error {
	now := s.now()
	strategy, _ := vm.RunStrategy()
	_, err := s.mutateVM(ctx, vm.Namespace, vm.Name, true, func(v *kvv1.VirtualMachine) bool {
		changed := false
		for _, e := range edits {
			reqs := v.Status.StateChangeRequests
			switch e {
			case popStart:
				if len(reqs) > 0 && reqs[0].Action == kvv1.StartRequest {
					v.Status.StateChangeRequests = reqs[1:]
					changed = true
				}
			case popStop:
				if len(reqs) > 0 && reqs[0].Action == kvv1.StopRequest {
					v.Status.StateChangeRequests = reqs[1:]
					changed = true
				}
			case pushStart:
				v.Status.StateChangeRequests = append(v.Status.StateChangeRequests, kvv1.VirtualMachineStateChangeRequest{Action: kvv1.StartRequest})
				changed = true
			}
		}
		created := vmi != nil
		ready := vmi != nil && vmi.Status.Phase == kvv1.Running && vmi.DeletionTimestamp == nil
		if ready {
			c := vmiCondition(vmi, kvv1.VirtualMachineInstanceReady)
			ready = c != nil && c.Status == corev1.ConditionTrue
		}
		ps := s.printableStatus(v, vmi)
		if v.Status.Created != created || v.Status.Ready != ready || v.Status.PrintableStatus != ps || v.Status.RunStrategy != strategy {
			v.Status.Created, v.Status.Ready, v.Status.PrintableStatus, v.Status.RunStrategy = created, ready, ps, strategy
			changed = true
		}
		rc := kvv1.VirtualMachineCondition{Type: kvv1.VirtualMachineReady, Status: corev1.ConditionFalse, Reason: "VMINotExists"}
		if vmi != nil {
			rc.Reason = "PodNotReady"
		}
		if ready {
			rc.Status, rc.Reason = corev1.ConditionTrue, ""
		}
		found := false
		for i := range v.Status.Conditions {
			c := &v.Status.Conditions[i]
			if c.Type != kvv1.VirtualMachineReady {
				continue
			}
			found = true
			if c.Status != rc.Status || c.Reason != rc.Reason {
				c.Status, c.Reason, c.LastTransitionTime = rc.Status, rc.Reason, now
				changed = true
			}
		}
		if !found {
			rc.LastTransitionTime = now
			v.Status.Conditions = append(v.Status.Conditions, rc)
			changed = true
		}
		if v.Status.ObservedGeneration != v.Generation {
			v.Status.ObservedGeneration = v.Generation
			v.Status.DesiredGeneration = v.Generation
			changed = true
		}
		return changed
	})
	if err != nil {
		return fmt.Errorf("vm %s: update status: %w", keyOf(vm), err)
	}
	return nil
}
