package sim

// Deckhouse virtualization's VirtualMachineOperation controller, for the types that move a VM:
// Evict and Migrate (images/virtualization-artifact/pkg/controller/vmop/migration). A vmop goes
// Pending -> InProgress -> Completed / Failed by creating a KubeVirt
// VirtualMachineInstanceMigration "vmop-<name>" for the VM's backing VMI (owned by the vmop)
// and mirroring its phase into status.phase, status.progress and the Completed condition.
// Deleting a vmop that has not finished deletes its migration, which aborts it; a finalizer
// makes the controller see the deletion. Start, Stop and Restart go through the simulated
// Deckhouse VM controller's power state (Simulator.StartDeckhouseVM, StopDeckhouseVM) and
// complete when the VM reaches the phase they ask for.

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	virtv1 "kubevirt.io/api/core/v1"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"
)

// VirtualMachineOperation types, phases and the Completed condition's reasons
// (api/core/v1alpha2/virtual_machine_operation.go, vmopcondition).
const (
	VMOPTypeEvict   = "Evict"
	VMOPTypeMigrate = "Migrate"
	VMOPTypeStart   = "Start"
	VMOPTypeStop    = "Stop"
	VMOPTypeRestart = "Restart"

	VMOPPhasePending     = "Pending"
	VMOPPhaseInProgress  = "InProgress"
	VMOPPhaseCompleted   = "Completed"
	VMOPPhaseFailed      = "Failed"
	VMOPPhaseTerminating = "Terminating"

	VMOPConditionCompleted  = "Completed"
	VMOPConditionSignalSent = "SignalSent"

	VMOPReasonVirtualMachineNotFound        = "VirtualMachineNotFound"
	VMOPReasonNotApplicableForRunPolicy     = "NotApplicableForVirtualMachineRunPolicy"
	VMOPReasonNotApplicableForVMPhase       = "NotApplicableForVirtualMachinePhase"
	VMOPReasonNotApplicableForLiveMigration = "NotApplicableForLiveMigrationPolicy"
	VMOPReasonNotReadyToBeExecuted          = "NotReadyToBeExecuted"
	VMOPReasonMigrationPending              = "MigrationPending"
	VMOPReasonTargetScheduling              = "TargetScheduling"
	VMOPReasonTargetUnschedulable           = "TargetUnschedulable"
	VMOPReasonTargetDiskError               = "TargetDiskError"
	VMOPReasonTargetPreparing               = "TargetPreparing"
	VMOPReasonSyncing                       = "Syncing"
	VMOPReasonNotConverging                 = "NotConverging"
	VMOPReasonSourceSuspended               = "SourceSuspended"
	VMOPReasonTargetResumed                 = "TargetResumed"
	VMOPReasonMigrationCompleted            = "Completed"
	VMOPReasonAborted                       = "Aborted"
	VMOPReasonFailed                        = "Failed"
	VMOPReasonOtherMigrationInProgress      = "OtherMigrationInProgress"
	VMOPReasonOperationFailed               = "OperationFailed"
	VMOPReasonSignalSentSuccess             = "SignalSentSuccess"
	VMOPReasonSignalSentError               = "SignalSentError"
	VMOPReasonStartInProgress               = "StartInProgress"
	VMOPReasonStopInProgress                = "StopInProgress"
	VMOPReasonRestartInProgress             = "RestartInProgress"
	VMOPReasonOperationCompleted            = "OperationCompleted"
	// vmopRestartFromAnnotation records on a Restart operation the VMI it replaces.
	vmopRestartFromAnnotation                   = "sim.drover.io/restart-from-vmi"
	vmopReasonUnknown                           = "Unknown"
	vmopReasonNotSimulated                      = "NotSimulated"
	vmopFinalizerCleanup                        = "virtualization.deckhouse.io/vmop-cleanup"
	vmopMigrationPrefix                         = "vmop-"
	vmopMigrationLabel                          = "virtualization.deckhouse.io/vmop"
	vmopResync                                  = time.Second
	vmopProgressPending, vmopProgressScheduling = 0, 2
	vmopProgressPreparing                       = 3
	vmopProgressSyncFrom, vmopProgressSyncTo    = 10, 90
	vmopProgressSourceSuspended                 = 91
	vmopProgressTargetResumed                   = 92
	vmopProgressCompleted                       = 100
)

// vmopMigrationFailedCondition is the condition KubeVirt's migration controller sets on a failed
// migration (the API module of 1.8 names no constant for it).
const vmopMigrationFailedCondition = virtv1.VirtualMachineInstanceMigrationConditionType("Failed")

// vmopGVR, deckhouseVMGVR and the Deckhouse kind names.
var (
	vmopGVR        = schema.GroupVersionResource{Group: "virtualization.deckhouse.io", Version: "v1alpha2", Resource: "virtualmachineoperations"}
	deckhouseVMGVR = schema.GroupVersionResource{Group: "virtualization.deckhouse.io", Version: "v1alpha2", Resource: "virtualmachines"}
)

// vmopSpec is the part of a vmop's spec this controller reads.
type vmopSpec struct {
	Type               string `json:"type"`
	VirtualMachineName string `json:"virtualMachineName"`
	Force              *bool  `json:"force,omitempty"`
	Migrate            *struct {
		NodeSelector map[string]string `json:"nodeSelector,omitempty"`
	} `json:"migrate,omitempty"`
}

// vmopStatus is a vmop's status as the simulator's CRD types it.
type vmopStatus struct {
	Phase              string             `json:"phase"`
	Conditions         []metav1.Condition `json:"conditions,omitempty"`
	ObservedGeneration int64              `json:"observedGeneration,omitempty"`
	Progress           *int32             `json:"progress,omitempty"`
}

// vmopController reconciles every VirtualMachineOperation of the cluster.
type vmopController struct {
	kv  *kvPlane
	log zerolog.Logger
	now func() time.Time
	// timeScale and expected estimate how far a running migration has got (Deckhouse reads the
	// transfer counters KubeVirt 1.8 does not publish on the object): expected is the simulated
	// duration of the memory transfer of a VMI.
	timeScale float64
	expected  func(*virtv1.VirtualMachineInstance) time.Duration
	// power starts and stops Deckhouse VMs the way the simulator's VM controller understands
	// (the Simulator); nil leaves Start, Stop and Restart out.
	power vmopPower
	// sim holds the caches the controller reads.
	sim *Simulator
}

// vmopPower is what Start, Stop and Restart operations ask of the Deckhouse VM controller.
type vmopPower interface {
	StartDeckhouseVM(ctx context.Context, ns, name string) error
	StopDeckhouseVM(ctx context.Context, ns, name string, force bool) error
}

var _ vmopPower = (*Simulator)(nil)

func newVMOPController(kv *kvPlane, timeScale float64, expected func(*virtv1.VirtualMachineInstance) time.Duration) *vmopController {
	if timeScale <= 0 {
		timeScale = 1
	}
	if expected == nil {
		// guest memory at 1 GiB/s, the simulator's default bandwidth
		expected = func(vmi *virtv1.VirtualMachineInstance) time.Duration {
			return time.Duration(float64(vmopGuestMemory(vmi)) / float64(1<<30) * float64(time.Second))
		}
	}
	return &vmopController{
		kv:        kv,
		log:       kv.log.With().Str("controller", "vmop").Logger(),
		now:       kv.now,
		timeScale: timeScale,
		expected:  expected,
	}
}

// runVMOperations runs Deckhouse's VirtualMachineOperation controller (Evict, Migrate, Start,
// Stop, Restart) until ctx ends.
func (s *Simulator) runVMOperations(ctx context.Context) error {
	kv, err := s.kubevirtPlane()
	if err != nil {
		return err
	}
	plan := func(vmi *virtv1.VirtualMachineInstance) time.Duration { return s.PlanMigration(vmi).Duration }
	c := newVMOPController(kv, s.opts.TimeScale, plan)
	c.power = s
	c.sim = s
	return c.run(ctx)
}

// run blocks until ctx ends. It reconciles one operation at a time (so that two operations of
// one VM are never decided at once), when the operation, its migration, its VM, the VM's VMI or
// a migration target pod of it changes, and every vmopResync while it has not finished.
func (c *vmopController) run(ctx context.Context) error {
	s := c.sim
	q := s.vmopQueue
	ofVM := func(ns, vm string) {
		objs, _ := s.vmopInformer.GetIndexer().ByIndex(byVMOPVM, ns+"/"+vm)
		for _, o := range objs {
			q.Add(keyOf(o.(*unstructured.Unstructured)))
		}
	}
	for _, w := range []struct {
		inf cache.SharedIndexInformer
		f   func(obj interface{})
	}{
		{s.vmopInformer, func(obj interface{}) {
			if u, ok := obj.(*unstructured.Unstructured); ok {
				q.Add(keyOf(u))
			}
		}},
		{s.vmimInformer, func(obj interface{}) {
			m, ok := obj.(*virtv1.VirtualMachineInstanceMigration)
			if ref := metav1.GetControllerOf(m); ok && ref != nil && ref.Kind == "VirtualMachineOperation" {
				q.Add(m.Namespace + "/" + ref.Name)
			}
		}},
		{s.dvmInformer, func(obj interface{}) {
			if u, ok := obj.(*unstructured.Unstructured); ok {
				ofVM(u.GetNamespace(), u.GetName())
			}
		}},
		{s.vmiInformer, func(obj interface{}) {
			if vmi, ok := obj.(*virtv1.VirtualMachineInstance); ok {
				ofVM(vmi.Namespace, vmi.Name)
			}
		}},
		{s.podInformer, func(obj interface{}) {
			if p, ok := obj.(*corev1.Pod); ok && isLauncher(p) && p.Labels[virtv1.MigrationJobLabel] != "" {
				ofVM(p.Namespace, p.Annotations[virtv1.DomainAnnotation])
			}
		}},
	} {
		reg, err := w.inf.AddEventHandler(handler(w.f))
		if err != nil {
			return fmt.Errorf("vmop: watch: %w", err)
		}
		defer func() { _ = w.inf.RemoveEventHandler(reg) }()
	}
	return s.runWorkers(ctx, "vmop", q, 1, c.syncKey)
}

// syncKey reconciles the operation key from the cache.
func (c *vmopController) syncKey(ctx context.Context, key string) error {
	s := c.sim
	obj, ok, _ := s.vmopInformer.GetIndexer().GetByKey(key)
	if !ok {
		return nil
	}
	cached := obj.(*unstructured.Unstructured)
	vm, _, _ := unstructured.NestedString(cached.Object, "spec", "virtualMachineName")
	objs, _ := s.vmopInformer.GetIndexer().ByIndex(byVMOPVM, cached.GetNamespace()+"/"+vm)
	all := make([]unstructured.Unstructured, 0, len(objs))
	for _, o := range objs {
		all = append(all, *o.(*unstructured.Unstructured))
	}
	err := c.reconcile(ctx, cached.DeepCopy(), all)
	if phase, _, _ := unstructured.NestedString(cached.Object, "status", "phase"); cached.GetDeletionTimestamp() != nil || (phase != VMOPPhaseCompleted && phase != VMOPPhaseFailed) {
		s.vmopQueue.AddAfter(key, vmopResync) // progress is estimated from the time that passed
	}
	return err
}

// reconcile moves one vmop forward. Conflicts and vanished objects are outcomes: the next
// round reads the new state.
func (c *vmopController) reconcile(ctx context.Context, u *unstructured.Unstructured, all []unstructured.Unstructured) error {
	ref := u.GetNamespace() + "/" + u.GetName()
	var spec vmopSpec
	if err := fromUnstructuredField(u, "spec", &spec); err != nil {
		return fmt.Errorf("vmop %s: decode spec: %w", ref, err)
	}
	var st vmopStatus
	if err := fromUnstructuredField(u, "status", &st); err != nil {
		return fmt.Errorf("vmop %s: decode status: %w", ref, err)
	}
	orig := st.DeepCopyForCompare()

	if u.GetDeletionTimestamp() != nil {
		return c.finalize(ctx, u, &st, orig)
	}
	if !hasString(u.GetFinalizers(), vmopFinalizerCleanup) {
		u.SetFinalizers(append(u.GetFinalizers(), vmopFinalizerCleanup))
		updated, err := c.kv.dyn.Resource(vmopGVR).Namespace(u.GetNamespace()).Update(ctx, u, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("vmop %s: add finalizer: %w", ref, err)
		}
		u = updated
	}
	if st.Phase == VMOPPhaseCompleted || st.Phase == VMOPPhaseFailed {
		return nil
	}
	if st.Phase == "" {
		st.Phase = VMOPPhasePending
		c.setCondition(&st, u, VMOPConditionSignalSent, metav1.ConditionUnknown, vmopReasonUnknown, "")
		c.setCondition(&st, u, VMOPConditionCompleted, metav1.ConditionUnknown, vmopReasonUnknown, "")
	}

	switch spec.Type {
	case VMOPTypeEvict, VMOPTypeMigrate:
		if err := c.reconcileMigration(ctx, u, &spec, &st, all); err != nil {
			return fmt.Errorf("vmop %s: %w", ref, err)
		}
	case VMOPTypeStart, VMOPTypeStop, VMOPTypeRestart:
		if c.power == nil {
			c.fail(&st, u, vmopReasonNotSimulated, fmt.Sprintf("The simulator does not carry out %s operations here.", spec.Type))
			break
		}
		if err := c.reconcilePower(ctx, u, &spec, &st, all); err != nil {
			return fmt.Errorf("vmop %s: %w", ref, err)
		}
	default:
		c.fail(&st, u, vmopReasonNotSimulated, fmt.Sprintf("The simulator does not carry out %s operations.", spec.Type))
	}
	st.ObservedGeneration = u.GetGeneration()
	return c.writeStatus(ctx, u, &st, orig)
}

// reconcileMigration: create the migration once the operation is applicable, then mirror it.
func (c *vmopController) reconcileMigration(ctx context.Context, u *unstructured.Unstructured, spec *vmopSpec, st *vmopStatus, all []unstructured.Unstructured) error {
	mig, err := c.getMigration(ctx, u)
	if err != nil {
		return err
	}
	if mig == nil {
		if st.Phase == VMOPPhaseInProgress {
			c.fail(st, u, VMOPReasonOperationFailed, "Migration failed: its VirtualMachineInstanceMigration is gone.")
			return nil
		}
		ok, err := c.applicable(ctx, u, spec, st, all)
		if err != nil || !ok {
			return err
		}
		if mig, err = c.createMigration(ctx, u, spec); err != nil {
			return err
		}
		c.setCondition(st, u, VMOPConditionSignalSent, metav1.ConditionTrue, VMOPReasonSignalSentSuccess, "")
		c.log.Info().Str("vmop", u.GetNamespace()+"/"+u.GetName()).Str("type", spec.Type).
			Str("vm", spec.VirtualMachineName).Str("migration", mig.Name).Msg("created migration")
	}
	return c.mirror(ctx, u, st, mig)
}

// applicable runs Deckhouse's checks before a migration is started; a check that fails sets
// the Failed phase (or keeps the operation Pending) and returns false.
func (c *vmopController) applicable(ctx context.Context, u *unstructured.Unstructured, spec *vmopSpec, st *vmopStatus, all []unstructured.Unstructured) (bool, error) {
	ns := u.GetNamespace()
	vm, err := c.kv.dyn.Resource(deckhouseVMGVR).Namespace(ns).Get(ctx, spec.VirtualMachineName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		c.fail(st, u, VMOPReasonVirtualMachineNotFound, fmt.Sprintf("VirtualMachine %s/%s not found.", ns, spec.VirtualMachineName))
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("get virtualmachine %s/%s: %w", ns, spec.VirtualMachineName, err)
	}
	runPolicy, _, _ := unstructured.NestedString(vm.Object, "spec", "runPolicy")
	if runPolicy == "AlwaysOff" {
		c.fail(st, u, VMOPReasonNotApplicableForRunPolicy, fmt.Sprintf("Operation %s is not applicable for runPolicy %s.", spec.Type, runPolicy))
		return false, nil
	}
	policy, _, _ := unstructured.NestedString(vm.Object, "spec", "liveMigrationPolicy")
	if policy == "Never" {
		c.fail(st, u, VMOPReasonNotApplicableForLiveMigration, "Migration settings: liveMigrationPolicy Never forbids live migration.")
		return false, nil
	}
	phase, _, _ := unstructured.NestedString(vm.Object, "status", "phase")
	if phase != "Running" {
		c.fail(st, u, VMOPReasonNotApplicableForVMPhase, fmt.Sprintf("Operation %s is not applicable for a VirtualMachine in phase %q.", spec.Type, phase))
		return false, nil
	}
	if c.waitForOtherOperation(u, spec, st, all) {
		return false, nil
	}
	for _, m := range c.sim.migrationsForVMI(ns, spec.VirtualMachineName) {
		if !m.IsFinal() && !metav1.IsControlledBy(m, u) {
			c.fail(st, u, VMOPReasonOtherMigrationInProgress, "Other Migrations are in progress")
			return false, nil
		}
	}
	vmi := &virtv1.VirtualMachineInstance{}
	err = c.kv.c.Get(ctx, ctrlclient.ObjectKey{Namespace: ns, Name: spec.VirtualMachineName}, vmi)
	if apierrors.IsNotFound(err) {
		c.fail(st, u, VMOPReasonOperationFailed, "Migration failed because the virtual machine is currently not running.")
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("get vmi %s/%s: %w", ns, spec.VirtualMachineName, err)
	}
	if !vmi.IsMigratable() {
		c.fail(st, u, VMOPReasonOperationFailed, "VirtualMachine is not migratable, cannot be processed.")
		return false, nil
	}
	return true, nil
}

// waitForOtherOperation keeps the operation Pending while another operation on the same VM is
// in progress (one operation per VM at a time) and reports whether it does.
func (c *vmopController) waitForOtherOperation(u *unstructured.Unstructured, spec *vmopSpec, st *vmopStatus, all []unstructured.Unstructured) bool {
	for i := range all {
		o := &all[i]
		if o.GetUID() == u.GetUID() || o.GetNamespace() != u.GetNamespace() || o.GetDeletionTimestamp() != nil {
			continue
		}
		name, _, _ := unstructured.NestedString(o.Object, "spec", "virtualMachineName")
		phase, _, _ := unstructured.NestedString(o.Object, "status", "phase")
		if name == spec.VirtualMachineName && phase == VMOPPhaseInProgress {
			st.Phase = VMOPPhasePending
			c.setCondition(st, u, VMOPConditionCompleted, metav1.ConditionFalse, VMOPReasonNotReadyToBeExecuted,
				fmt.Sprintf("Waiting for operation %s on the same VirtualMachine to finish.", o.GetName()))
			return true
		}
	}
	return false
}

// vmopPowerRule is Deckhouse's powerstate service for one operation type: where it applies and
// when it is done.
type vmopPowerRule struct {
	policies   []string
	phases     []string
	inProgress string
}

var vmopPowerRules = map[string]vmopPowerRule{
	VMOPTypeStart: {
		policies:   []string{RunPolicyManual, RunPolicyAlwaysOnUnlessStoppedManually},
		phases:     []string{"Stopped", "Stopping"},
		inProgress: VMOPReasonStartInProgress,
	},
	VMOPTypeStop: {
		policies:   []string{RunPolicyManual, RunPolicyAlwaysOnUnlessStoppedManually},
		phases:     []string{"Running", "Degraded", "Starting", "Pause", "Pending", "Migrating"},
		inProgress: VMOPReasonStopInProgress,
	},
	VMOPTypeRestart: {
		policies:   []string{RunPolicyManual, RunPolicyAlwaysOnUnlessStoppedManually, RunPolicyAlwaysOn},
		phases:     []string{"Running", "Degraded", "Starting", "Pause", "Migrating"},
		inProgress: VMOPReasonRestartInProgress,
	},
}

// reconcilePower carries out Start, Stop and Restart (Deckhouse's powerstate controller): check
// the VM's run policy and phase, send the signal once, then wait for the VM to reach the
// phase the operation asks for.
func (c *vmopController) reconcilePower(ctx context.Context, u *unstructured.Unstructured, spec *vmopSpec, st *vmopStatus, all []unstructured.Unstructured) error {
	ns, name := u.GetNamespace(), spec.VirtualMachineName
	rule := vmopPowerRules[spec.Type]
	vm := c.sim.getDVM(ns + "/" + name)
	if vm == nil {
		c.fail(st, u, VMOPReasonVirtualMachineNotFound, fmt.Sprintf("VirtualMachine %s/%s not found.", ns, name))
		return nil
	}
	vmPhase, _, _ := unstructured.NestedString(vm.Object, "status", "phase")

	sent := meta.IsStatusConditionTrue(st.Conditions, VMOPConditionSignalSent)
	if sent {
		done, err := c.powerDone(ctx, u, spec, vmPhase)
		if err != nil {
			return err
		}
		if done {
			st.Phase = VMOPPhaseCompleted
			c.setCondition(st, u, VMOPConditionCompleted, metav1.ConditionTrue, VMOPReasonOperationCompleted, "")
		} else {
			c.setCondition(st, u, VMOPConditionCompleted, metav1.ConditionFalse, rule.inProgress, "Wait until operation completed")
		}
		return nil
	}

	if c.waitForOtherOperation(u, spec, st, all) {
		return nil
	}
	policy, _, _ := unstructured.NestedString(vm.Object, "spec", "runPolicy")
	if policy == "" {
		policy = RunPolicyAlwaysOnUnlessStoppedManually
	}
	if !hasString(rule.policies, policy) {
		c.fail(st, u, VMOPReasonNotApplicableForRunPolicy, fmt.Sprintf("Operation %s is not applicable for runPolicy %s.", spec.Type, policy))
		return nil
	}
	if !hasString(rule.phases, vmPhase) && !(spec.Type == VMOPTypeStop && vmPhase == "Stopping" && ptr.Deref(spec.Force, false)) {
		c.fail(st, u, VMOPReasonNotApplicableForVMPhase, fmt.Sprintf("Operation %s is not applicable for a VirtualMachine in phase %q.", spec.Type, vmPhase))
		return nil
	}
	if err := c.powerExecute(ctx, u, spec); err != nil {
		if apierrors.IsConflict(err) {
			return nil // the vmop changed (annotation); next round
		}
		msg := fmt.Sprintf("Sending signal %q to VM: %v", spec.Type, err)
		c.fail(st, u, VMOPReasonOperationFailed, msg)
		c.setCondition(st, u, VMOPConditionSignalSent, metav1.ConditionFalse, VMOPReasonSignalSentError, "")
		return nil
	}
	c.log.Info().Str("vmop", ns+"/"+u.GetName()).Str("type", spec.Type).Str("vm", name).Msg("sent signal")
	st.Phase = VMOPPhaseInProgress
	c.setCondition(st, u, VMOPConditionCompleted, metav1.ConditionFalse, rule.inProgress, "Waiting for the operation to complete.")
	c.setCondition(st, u, VMOPConditionSignalSent, metav1.ConditionTrue, VMOPReasonSignalSentSuccess, "")
	return nil
}

// powerExecute sends the signal: the power state for Start and Stop; for Restart, the power
// state "on" (a Manual VM must come back) and the deletion of the running VMI, recorded first
// on the operation so that its replacement can be recognised.
func (c *vmopController) powerExecute(ctx context.Context, u *unstructured.Unstructured, spec *vmopSpec) error {
	ns, name := u.GetNamespace(), spec.VirtualMachineName
	switch spec.Type {
	case VMOPTypeStart:
		return c.power.StartDeckhouseVM(ctx, ns, name)
	case VMOPTypeStop:
		return c.power.StopDeckhouseVM(ctx, ns, name, ptr.Deref(spec.Force, false))
	}
	vmi := &virtv1.VirtualMachineInstance{}
	err := c.kv.c.Get(ctx, ctrlclient.ObjectKey{Namespace: ns, Name: name}, vmi)
	if apierrors.IsNotFound(err) {
		return c.power.StartDeckhouseVM(ctx, ns, name)
	}
	if err != nil {
		return fmt.Errorf("get vmi %s/%s: %w", ns, name, err)
	}
	if u.GetAnnotations()[vmopRestartFromAnnotation] != string(vmi.UID) {
		ann := u.GetAnnotations()
		if ann == nil {
			ann = map[string]string{}
		}
		ann[vmopRestartFromAnnotation] = string(vmi.UID)
		u.SetAnnotations(ann)
		updated, err := c.kv.dyn.Resource(vmopGVR).Namespace(ns).Update(ctx, u, metav1.UpdateOptions{})
		if err != nil {
			return fmt.Errorf("record restart of vmi %s/%s: %w", ns, name, err)
		}
		u.Object = updated.Object
	}
	if err := c.power.StartDeckhouseVM(ctx, ns, name); err != nil {
		return err
	}
	opts := []ctrlclient.DeleteOption{ctrlclient.Preconditions{UID: &vmi.UID}}
	if ptr.Deref(spec.Force, false) {
		opts = append(opts, ctrlclient.GracePeriodSeconds(0))
	}
	if err := c.kv.c.Delete(ctx, vmi, opts...); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete vmi %s/%s: %w", ns, name, err)
	}
	return nil
}

// powerDone: Start is done when the VM runs, Stop when it is stopped, Restart when a new VMI
// runs.
func (c *vmopController) powerDone(ctx context.Context, u *unstructured.Unstructured, spec *vmopSpec, vmPhase string) (bool, error) {
	switch spec.Type {
	case VMOPTypeStart:
		return vmPhase == "Running", nil
	case VMOPTypeStop:
		return vmPhase == "Stopped", nil
	}
	if vmPhase != "Running" {
		return false, nil
	}
	vmi := c.sim.getVMI(u.GetNamespace() + "/" + spec.VirtualMachineName)
	if vmi == nil {
		return false, nil
	}
	return string(vmi.UID) != u.GetAnnotations()[vmopRestartFromAnnotation] && vmi.Status.Phase == virtv1.Running, nil
}

// createMigration creates "vmop-<name>", controlled by the vmop, for the VM's backing VMI.
func (c *vmopController) createMigration(ctx context.Context, u *unstructured.Unstructured, spec *vmopSpec) (*virtv1.VirtualMachineInstanceMigration, error) {
	mig := &virtv1.VirtualMachineInstanceMigration{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: u.GetNamespace(),
			Name:      vmopMigrationPrefix + u.GetName(),
			Labels: map[string]string{
				virtv1.MigrationSelectorLabel: spec.VirtualMachineName,
				vmopMigrationLabel:            u.GetName(),
			},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion:         vmopGVR.GroupVersion().String(),
				Kind:               "VirtualMachineOperation",
				Name:               u.GetName(),
				UID:                u.GetUID(),
				Controller:         ptr.To(true),
				BlockOwnerDeletion: ptr.To(true),
			}},
		},
		Spec: virtv1.VirtualMachineInstanceMigrationSpec{VMIName: spec.VirtualMachineName},
	}
	if spec.Migrate != nil && len(spec.Migrate.NodeSelector) > 0 {
		mig.Spec.AddedNodeSelector = spec.Migrate.NodeSelector
	}
	err := c.kv.c.Create(ctx, mig)
	if apierrors.IsAlreadyExists(err) {
		// Made by an earlier round, not in the cache yet.
		err = c.kv.c.Get(ctx, ctrlclient.ObjectKeyFromObject(mig), mig)
		if err == nil && !metav1.IsControlledBy(mig, u) {
			err = fmt.Errorf("migration %s/%s exists and is not the operation's", mig.Namespace, mig.Name)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("create migration %s/%s: %w", mig.Namespace, mig.Name, err)
	}
	return mig, nil
}

// getMigration returns the vmop's migration, nil if there is none (or one that is not the
// vmop's, which the operation must not adopt). It reads the cache, and the API when the cache
// has none although the operation created it (the cache may not show it yet).
func (c *vmopController) getMigration(ctx context.Context, u *unstructured.Unstructured) (*virtv1.VirtualMachineInstanceMigration, error) {
	key := u.GetNamespace() + "/" + vmopMigrationPrefix + u.GetName()
	mig := c.sim.getVMIM(key)
	if mig == nil {
		var st vmopStatus
		if err := fromUnstructuredField(u, "status", &st); err != nil || !meta.IsStatusConditionTrue(st.Conditions, VMOPConditionSignalSent) {
			return nil, nil
		}
		mig = &virtv1.VirtualMachineInstanceMigration{}
		err := c.kv.c.Get(ctx, ctrlclient.ObjectKey{Namespace: u.GetNamespace(), Name: vmopMigrationPrefix + u.GetName()}, mig)
		if apierrors.IsNotFound(err) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("get migration %s: %w", key, err)
		}
	}
	if !metav1.IsControlledBy(mig, u) {
		return nil, nil
	}
	return mig, nil
}

// mirror copies the migration's state into the vmop (Deckhouse's syncOperationComplete).
func (c *vmopController) mirror(ctx context.Context, u *unstructured.Unstructured, st *vmopStatus, mig *virtv1.VirtualMachineInstanceMigration) error {
	state, err := c.migrationState(ctx, mig)
	if err != nil {
		return err
	}
	switch mig.Status.Phase {
	case virtv1.MigrationSucceeded:
		st.Phase = VMOPPhaseCompleted
		st.Progress = ptr.To(int32(vmopProgressCompleted))
		c.setCondition(st, u, VMOPConditionCompleted, metav1.ConditionTrue, VMOPReasonMigrationCompleted, "")
		return nil
	case virtv1.MigrationFailed:
		reason := vmopFailedReason(mig, state)
		st.Phase = VMOPPhaseFailed
		c.setCondition(st, u, VMOPConditionCompleted, metav1.ConditionFalse, reason, vmopFailedMessage(reason, mig, state))
		return nil
	}

	reason, msg := VMOPReasonSyncing, "Source and target are being synchronized"
	progress := int32(vmopProgressSyncFrom)
	switch mig.Status.Phase {
	case virtv1.MigrationPhaseUnset, virtv1.MigrationPending:
		reason, msg, progress = VMOPReasonMigrationPending,
			"The VirtualMachineOperation for migrating the virtual machine has been queued. Waiting for the queue to be processed and for this operation to be executed.",
			vmopProgressPending
	case virtv1.MigrationScheduling:
		reason, msg, progress = VMOPReasonTargetScheduling, "Scheduling the migration target", vmopProgressScheduling
	case virtv1.MigrationScheduled, virtv1.MigrationPreparingTarget:
		reason, msg, progress = VMOPReasonTargetPreparing, "Preparing the migration target", vmopProgressPreparing
	default:
		progress = c.syncProgress(ctx, mig, state)
	}
	if pending, unschedulable := c.targetUnschedulable(ctx, mig, state); unschedulable {
		reason, msg, progress = VMOPReasonTargetUnschedulable, pending, vmopProgressScheduling
	}
	// The hand-off: the source is suspended once the transfer completed, and the guest resumed
	// on the target once the target's domain is ready after that (Deckhouse reads the same two
	// fields; a target domain reported ready before the transfer ends is not a resumed guest).
	if state != nil && state.Completed && !state.Failed {
		reason, msg, progress = VMOPReasonSourceSuspended, "The virtual machine has been suspended on the source", vmopProgressSourceSuspended
		if state.TargetNodeDomainReadyTimestamp != nil && state.EndTimestamp != nil && !state.TargetNodeDomainReadyTimestamp.Before(state.EndTimestamp) {
			reason, msg, progress = VMOPReasonTargetResumed, "The virtual machine has resumed on the target", vmopProgressTargetResumed
		}
	}
	st.Phase = VMOPPhaseInProgress
	if reason == VMOPReasonMigrationPending {
		st.Phase = VMOPPhasePending
	}
	if st.Progress == nil || *st.Progress < progress {
		st.Progress = ptr.To(progress)
	}
	c.setCondition(st, u, VMOPConditionCompleted, metav1.ConditionFalse, reason, msg)
	return nil
}

// migrationState is the migration's state: the one on the migration object once it has ended
// (until then it holds only the source pod), else the VMI's when it describes this migration.
func (c *vmopController) migrationState(ctx context.Context, mig *virtv1.VirtualMachineInstanceMigration) (*virtv1.VirtualMachineInstanceMigrationState, error) {
	if mig.IsFinal() && mig.Status.MigrationState != nil {
		return mig.Status.MigrationState, nil
	}
	vmi := c.sim.getVMI(mig.Namespace + "/" + mig.Spec.VMIName)
	if vmi == nil {
		return nil, nil
	}
	if s := vmi.Status.MigrationState; s != nil && s.MigrationUID == mig.UID {
		return s, nil
	}
	return nil, nil
}

// syncProgress estimates the share of memory copied so far: elapsed time against the expected
// transfer time, mapped onto Deckhouse's 10-90 % syncing range.
func (c *vmopController) syncProgress(ctx context.Context, mig *virtv1.VirtualMachineInstanceMigration, state *virtv1.VirtualMachineInstanceMigrationState) int32 {
	if state == nil || state.StartTimestamp == nil {
		return vmopProgressSyncFrom
	}
	vmi := c.sim.getVMI(mig.Namespace + "/" + mig.Spec.VMIName)
	if vmi == nil {
		return vmopProgressSyncFrom
	}
	expected := c.expected(vmi)
	if expected <= 0 {
		return vmopProgressSyncTo
	}
	elapsed := time.Duration(float64(c.now().Sub(state.StartTimestamp.Time)) * c.timeScale)
	frac := min(max(float64(elapsed)/float64(expected), 0), 1)
	return int32(vmopProgressSyncFrom + frac*(vmopProgressSyncTo-vmopProgressSyncFrom))
}

// vmopGuestMemory is the VMI's guest memory in bytes (spec.domain.memory.guest, else the memory
// request).
func vmopGuestMemory(vmi *virtv1.VirtualMachineInstance) int64 {
	if m := vmi.Spec.Domain.Memory; m != nil && m.Guest != nil {
		return m.Guest.Value()
	}
	if q, ok := vmi.Spec.Domain.Resources.Requests[corev1.ResourceMemory]; ok {
		return q.Value()
	}
	return 0
}

// targetUnschedulable reports a migration target pod the scheduler could not place.
func (c *vmopController) targetUnschedulable(ctx context.Context, mig *virtv1.VirtualMachineInstanceMigration, state *virtv1.VirtualMachineInstanceMigrationState) (string, bool) {
	for _, p := range c.sim.podsBy(byVMI, mig.Namespace+"/"+mig.Spec.VMIName) {
		if p.Labels[virtv1.MigrationJobLabel] != string(mig.UID) {
			continue
		}
		if state != nil && state.TargetPod != "" && p.Name != state.TargetPod {
			continue
		}
		if p.Spec.NodeName != "" || p.Status.Phase != corev1.PodPending {
			continue
		}
		for _, cond := range p.Status.Conditions {
			if cond.Type == corev1.PodScheduled && cond.Status == corev1.ConditionFalse && cond.Reason == corev1.PodReasonUnschedulable {
				return fmt.Sprintf("Target pod %q is unschedulable: %s", p.Name, cond.Message), true
			}
		}
	}
	return "", false
}

// vmopFailedReason is Deckhouse's getFailedReason.
func vmopFailedReason(mig *virtv1.VirtualMachineInstanceMigration, state *virtv1.VirtualMachineInstanceMigrationState) string {
	if state != nil {
		if state.AbortRequested || state.AbortStatus == virtv1.MigrationAbortSucceeded {
			return VMOPReasonAborted
		}
		if reason := vmopReasonFromText(state.FailureReason); reason != "" {
			return reason
		}
	}
	for _, cond := range mig.Status.Conditions {
		if cond.Type != vmopMigrationFailedCondition || cond.Status != corev1.ConditionTrue {
			continue
		}
		if reason := vmopReasonFromText(cond.Reason + " " + cond.Message); reason != "" {
			return reason
		}
	}
	return VMOPReasonFailed
}

// vmopReasonFromText classifies a migration failure message as Deckhouse does (keywords), and
// also recognises KubeVirt's timeout messages ("Live migration stuck for 150 seconds", "is not
// completed after ... seconds") as a migration that does not converge.
func vmopReasonFromText(text string) string {
	t := strings.ToLower(text)
	switch {
	case strings.Contains(t, "converg"), strings.Contains(t, "progress"), strings.Contains(t, "stuck"), strings.Contains(t, "not completed after"):
		return VMOPReasonNotConverging
	case strings.Contains(t, "schedul"):
		return VMOPReasonTargetUnschedulable
	case strings.Contains(t, "csi"), strings.Contains(t, "attach"), strings.Contains(t, "volume"), strings.Contains(t, "disk"):
		return VMOPReasonTargetDiskError
	}
	return ""
}

// vmopFailedMessage is Deckhouse's getFailedMessage.
func vmopFailedMessage(reason string, mig *virtv1.VirtualMachineInstanceMigration, state *virtv1.VirtualMachineInstanceMigrationState) string {
	base := "Migration failed"
	switch reason {
	case VMOPReasonAborted:
		base = "Migration aborted"
	case VMOPReasonNotConverging:
		base = "Migration did not converge"
	case VMOPReasonTargetUnschedulable:
		base = "Migration failed: target pod is unschedulable"
	case VMOPReasonTargetDiskError:
		base = "Migration failed: target disk attach error"
	}
	if state != nil && state.FailureReason != "" {
		return base + ": " + state.FailureReason
	}
	for _, cond := range mig.Status.Conditions {
		if cond.Type == vmopMigrationFailedCondition && cond.Status == corev1.ConditionTrue && cond.Message != "" {
			return base + ": " + cond.Message
		}
	}
	return base
}

// finalize handles a vmop being deleted: delete its migration (which aborts it when it has not
// finished), wait until the migration is gone, then release the finalizer.
func (c *vmopController) finalize(ctx context.Context, u *unstructured.Unstructured, st *vmopStatus, orig vmopStatus) error {
	ref := u.GetNamespace() + "/" + u.GetName()
	if !hasString(u.GetFinalizers(), vmopFinalizerCleanup) {
		return nil
	}
	if st.Phase != VMOPPhaseCompleted && st.Phase != VMOPPhaseFailed && st.Phase != VMOPPhaseTerminating {
		st.Phase = VMOPPhaseTerminating
		if err := c.writeStatus(ctx, u, st, orig); err != nil {
			return err
		}
	}
	mig, err := c.getMigration(ctx, u)
	if err != nil {
		return fmt.Errorf("vmop %s: %w", ref, err)
	}
	if mig != nil {
		if mig.DeletionTimestamp == nil {
			err := c.kv.c.Delete(ctx, mig, ctrlclient.Preconditions{UID: &mig.UID})
			if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
				return fmt.Errorf("vmop %s: delete migration %s: %w", ref, mig.Name, err)
			}
			c.log.Info().Str("vmop", ref).Str("migration", mig.Name).Str("phase", string(mig.Status.Phase)).Msg("vmop deleted; deleted its migration")
		}
		// Wait for the migration to be gone (its controller may hold it while it aborts).
		if still, err := c.getMigration(ctx, u); err != nil || still != nil {
			return err
		}
	}
	cur, err := c.kv.dyn.Resource(vmopGVR).Namespace(u.GetNamespace()).Get(ctx, u.GetName(), metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vmop %s: get: %w", ref, err)
	}
	var keep []string
	for _, f := range cur.GetFinalizers() {
		if f != vmopFinalizerCleanup {
			keep = append(keep, f)
		}
	}
	cur.SetFinalizers(keep)
	_, err = c.kv.dyn.Resource(vmopGVR).Namespace(u.GetNamespace()).Update(ctx, cur, metav1.UpdateOptions{})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("vmop %s: remove finalizer: %w", ref, err)
	}
	return nil
}

// fail sets the Failed phase with the Completed condition's reason and message.
func (c *vmopController) fail(st *vmopStatus, u *unstructured.Unstructured, reason, msg string) {
	st.Phase = VMOPPhaseFailed
	c.setCondition(st, u, VMOPConditionCompleted, metav1.ConditionFalse, reason, msg)
}

func (c *vmopController) setCondition(st *vmopStatus, u *unstructured.Unstructured, typ string, status metav1.ConditionStatus, reason, msg string) {
	meta.SetStatusCondition(&st.Conditions, metav1.Condition{
		Type:               typ,
		Status:             status,
		Reason:             reason,
		Message:            msg,
		ObservedGeneration: u.GetGeneration(),
		LastTransitionTime: metav1.NewTime(c.now().Truncate(time.Second)),
	})
}

// writeStatus writes the status when it changed.
func (c *vmopController) writeStatus(ctx context.Context, u *unstructured.Unstructured, st *vmopStatus, orig vmopStatus) error {
	if st.equal(orig) {
		return nil
	}
	obj, err := runtime.DefaultUnstructuredConverter.ToUnstructured(st)
	if err != nil {
		return fmt.Errorf("vmop %s/%s: encode status: %w", u.GetNamespace(), u.GetName(), err)
	}
	out := u.DeepCopy()
	if err := unstructured.SetNestedField(out.Object, obj, "status"); err != nil {
		return fmt.Errorf("vmop %s/%s: set status: %w", u.GetNamespace(), u.GetName(), err)
	}
	_, err = c.kv.dyn.Resource(vmopGVR).Namespace(u.GetNamespace()).UpdateStatus(ctx, out, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) || apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vmop %s/%s: update status: %w", u.GetNamespace(), u.GetName(), err)
	}
	if orig.Phase != st.Phase {
		c.log.Info().Str("vmop", u.GetNamespace()+"/"+u.GetName()).Str("from", orig.Phase).Str("to", st.Phase).Msg("vmop phase")
	}
	return nil
}

// DeepCopyForCompare copies the status for change detection.
func (s *vmopStatus) DeepCopyForCompare() vmopStatus {
	out := *s
	out.Conditions = append([]metav1.Condition(nil), s.Conditions...)
	if s.Progress != nil {
		out.Progress = ptr.To(*s.Progress)
	}
	return out
}

func (s *vmopStatus) equal(o vmopStatus) bool {
	if s.Phase != o.Phase || s.ObservedGeneration != o.ObservedGeneration || len(s.Conditions) != len(o.Conditions) {
		return false
	}
	if (s.Progress == nil) != (o.Progress == nil) || (s.Progress != nil && *s.Progress != *o.Progress) {
		return false
	}
	return conditionsEqual(s.Conditions, o.Conditions)
}

// conditionsEqual compares conditions but for their transition times.
func conditionsEqual(x, y []metav1.Condition) bool {
	if len(x) != len(y) {
		return false
	}
	for i := range x {
		a, b := x[i], y[i]
		if a.Type != b.Type || a.Status != b.Status || a.Reason != b.Reason || a.Message != b.Message || a.ObservedGeneration != b.ObservedGeneration {
			return false
		}
	}
	return true
}

// fromUnstructuredField decodes u.Object[field] into out; a missing field leaves out as is.
func fromUnstructuredField(u *unstructured.Unstructured, field string, out any) error {
	m, ok, err := unstructured.NestedMap(u.Object, field)
	if err != nil || !ok {
		return err
	}
	return runtime.DefaultUnstructuredConverter.FromUnstructured(m, out)
}

func hasString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
