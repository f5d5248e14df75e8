package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

// Deckhouse run policies.
const (
	RunPolicyAlwaysOn                      = "AlwaysOn"
	RunPolicyAlwaysOff                     = "AlwaysOff"
	RunPolicyManual                        = "Manual"
	RunPolicyAlwaysOnUnlessStoppedManually = "AlwaysOnUnlessStoppedManually"

	deckhouseFinalizer = "virtualization.deckhouse.io/vm-controller"
)

var deckhouseAPIVersion = DeckhouseVMGVR.GroupVersion().String()

// deckhouseVMSpec is the part of a Deckhouse VirtualMachine's spec the
// simulator reads.
type deckhouseVMSpec struct {
	RunPolicy string `json:"runPolicy"`
	CPU       struct {
		Cores        int    `json:"cores"`
		CoreFraction string `json:"coreFraction"`
	} `json:"cpu"`
	Memory struct {
		Size string `json:"size"`
	} `json:"memory"`
	BlockDeviceRefs []struct {
		Kind string `json:"kind"`
		Name string `json:"name"`
	} `json:"blockDeviceRefs"`
	NodeSelector                  map[string]string   `json:"nodeSelector"`
	Tolerations                   []corev1.Toleration `json:"tolerations"`
	Affinity                      *corev1.Affinity    `json:"affinity"`
	TerminationGracePeriodSeconds *int64              `json:"terminationGracePeriodSeconds"`
	PriorityClassName             string              `json:"priorityClassName"`
}

func (s *Simulator) runDeckhouseVMs(ctx context.Context) error {
	return s.runWorkers(ctx, "deckhouse-vm", s.dvmQueue, 2, s.syncDeckhouseVM)
}

// syncDeckhouseVM plays Deckhouse virtualization's VirtualMachine controller:
// it backs each VirtualMachine with an internal kubevirt.io/v1 VMI of the
// same name, started and restarted per spec.runPolicy and the power state
// the user last asked for (AnnotationPower), and mirrors status.phase and
// status.nodeName.
func (s *Simulator) syncDeckhouseVM(ctx context.Context, key string) error {
	ns, name := splitKey(key)
	dvm := s.getDVM(key)
	vmi := s.getVMI(key)
	if vmi != nil && controlledBy(vmi, deckhouseAPIVersion, "VirtualMachine") == nil {
		vmi = nil
	}
	if dvm == nil || (vmi != nil && metav1.GetControllerOf(vmi).UID != dvm.GetUID()) {
		if vmi != nil && vmi.DeletionTimestamp == nil {
			return s.deleteVMI(ctx, vmi)
		}
		return nil
	}
	if dvm.GetDeletionTimestamp() != nil {
		if vmi != nil {
			if vmi.DeletionTimestamp == nil {
				if err := s.deleteVMI(ctx, vmi); err != nil {
					return err
				}
			}
			return s.updateDeckhouseStatus(ctx, dvm, vmi)
		}
		return s.mutateDVM(ctx, ns, name, false, func(u *unstructured.Unstructured) bool { return removeFinalizer(u, deckhouseFinalizer) })
	}
	if !hasFinalizer(dvm, deckhouseFinalizer) {
		if err := s.mutateDVM(ctx, ns, name, false, func(u *unstructured.Unstructured) bool { return addFinalizer(u, deckhouseFinalizer) }); err != nil {
			return fmt.Errorf("deckhouse vm %s: add finalizer: %w", key, err)
		}
	}
	var spec deckhouseVMSpec
	if raw, ok := dvm.Object["spec"].(map[string]any); ok {
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(raw, &spec); err != nil {
			return fmt.Errorf("deckhouse vm %s: read spec: %w", key, err)
		}
	}
	policy := spec.RunPolicy
	if policy == "" {
		policy = RunPolicyAlwaysOnUnlessStoppedManually
	}
	power := dvm.GetAnnotations()[AnnotationPower]
	phase, _, _ := unstructured.NestedString(dvm.Object, "status", "phase")

	var wantRunning bool
	switch policy {
	case RunPolicyAlwaysOn:
		wantRunning = true
	case RunPolicyAlwaysOff:
		wantRunning = false
	case RunPolicyManual:
		if power == "" && phase == "" {
			// a new VM is started once, as if its owner had asked
			if err := s.setPower(ctx, ns, name, PowerOn); err != nil {
				return err
			}
			power = PowerOn
		}
		wantRunning = power == PowerOn
	default: // AlwaysOnUnlessStoppedManually
		wantRunning = power != PowerOff
	}

	if !s.virtControllerActive() {
		// The internal VM's VMI is virt-controller's to create and delete.
		return s.updateDeckhouseStatus(ctx, dvm, vmi)
	}
	switch {
	case !wantRunning:
		if vmi != nil && vmi.DeletionTimestamp == nil {
			if err := s.deleteVMI(ctx, vmi); err != nil {
				return err
			}
		}
	case vmi == nil:
		created, err := s.createVMIFromDeckhouse(ctx, dvm, spec)
		if err != nil {
			return err
		}
		if created != nil {
			vmi = created
		}
	case vmiFinal(vmi) && vmi.DeletionTimestamp == nil:
		restart := policy == RunPolicyAlwaysOn ||
			(policy == RunPolicyAlwaysOnUnlessStoppedManually && vmi.Status.Phase == kvv1.Failed)
		if restart {
			s.log.Info().Str("vm", key).Str("runPolicy", policy).Str("vmiPhase", string(vmi.Status.Phase)).Msg("deckhouse vm: restarting")
			if err := s.deleteVMI(ctx, vmi); err != nil {
				return err
			}
		}
	}
	return s.updateDeckhouseStatus(ctx, dvm, vmi)
}

func (s *Simulator) mutateDVM(ctx context.Context, ns, name string, status bool, f func(*unstructured.Unstructured) bool) error {
	c := s.Dynamic.Resource(DeckhouseVMGVR).Namespace(ns)
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		u, err := c.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if !f(u) {
			return nil
		}
		if status {
			_, err = c.UpdateStatus(ctx, u, metav1.UpdateOptions{})
		} else {
			_, err = c.Update(ctx, u, metav1.UpdateOptions{})
		}
		return err
	})
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

func (s *Simulator) createVMIFromDeckhouse(ctx context.Context, dvm *unstructured.Unstructured, spec deckhouseVMSpec) (*kvv1.VirtualMachineInstance, error) {
	cores := max(spec.CPU.Cores, 1)
	fraction := 100
	if f := strings.TrimSuffix(spec.CPU.CoreFraction, "%"); f != "" && f != "Auto" {
		if v, err := strconv.Atoi(f); err == nil && v > 0 {
			fraction = v
		}
	}
	mem, err := resource.ParseQuantity(spec.Memory.Size)
	if err != nil {
		return nil, fmt.Errorf("deckhouse vm %s: memory.size %q: %w", keyOf(dvm), spec.Memory.Size, err)
	}
	// Deckhouse propagates the VM's own labels and annotations to the VMI
	// (controller/vm/internal/sync_metadata.go); AnnotationDirtyRate travels that way.
	labels := map[string]string{}
	for k, v := range dvm.GetLabels() {
		if k != LabelManaged {
			labels[k] = v
		}
	}
	labels[deckhouseVMLabel] = dvm.GetName()
	var annotations map[string]string
	for k, v := range dvm.GetAnnotations() {
		if k != AnnotationPower && k != corev1.LastAppliedConfigAnnotation {
			if annotations == nil {
				annotations = map[string]string{}
			}
			annotations[k] = v
		}
	}
	vmi := &kvv1.VirtualMachineInstance{
		ObjectMeta: metav1.ObjectMeta{
			Name: dvm.GetName(), Namespace: dvm.GetNamespace(),
			Labels: labels, Annotations: annotations,
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: deckhouseAPIVersion, Kind: "VirtualMachine", Name: dvm.GetName(), UID: dvm.GetUID(),
				Controller: ptr.To(true), BlockOwnerDeletion: ptr.To(true),
			}},
		},
		Spec: kvv1.VirtualMachineInstanceSpec{
			Domain: kvv1.DomainSpec{
				CPU:    &kvv1.CPU{Cores: uint32(cores)},
				Memory: &kvv1.Memory{Guest: &mem},
				Resources: kvv1.ResourceRequirements{Requests: corev1.ResourceList{
					corev1.ResourceCPU:    *resource.NewMilliQuantity(int64(cores*fraction*10), resource.DecimalSI),
					corev1.ResourceMemory: mem,
				}},
				Devices: kvv1.Devices{Interfaces: []kvv1.Interface{{Name: "default", InterfaceBindingMethod: kvv1.InterfaceBindingMethod{Masquerade: &kvv1.InterfaceMasquerade{}}}}},
			},
			Networks:                      []kvv1.Network{{Name: "default", NetworkSource: kvv1.NetworkSource{Pod: &kvv1.PodNetwork{}}}},
			NodeSelector:                  spec.NodeSelector,
			Tolerations:                   spec.Tolerations,
			Affinity:                      spec.Affinity,
			TerminationGracePeriodSeconds: spec.TerminationGracePeriodSeconds,
			PriorityClassName:             spec.PriorityClassName,
			EvictionStrategy:              ptr.To(kvv1.EvictionStrategyLiveMigrate),
		},
	}
	for _, ref := range spec.BlockDeviceRefs {
		if ref.Kind != "VirtualDisk" {
			continue
		}
		// Deckhouse names a VirtualDisk's claim vd-<name>-<uid>; the
		// simulator has no VirtualDisk objects and uses a claim named as the disk.
		vname := "vd-" + ref.Name
		vmi.Spec.Volumes = append(vmi.Spec.Volumes, kvv1.Volume{Name: vname, VolumeSource: kvv1.VolumeSource{
			PersistentVolumeClaim: &kvv1.PersistentVolumeClaimVolumeSource{PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: ref.Name}},
		}})
		vmi.Spec.Domain.Devices.Disks = append(vmi.Spec.Domain.Devices.Disks, kvv1.Disk{Name: vname, DiskDevice: kvv1.DiskDevice{Disk: &kvv1.DiskTarget{Bus: kvv1.DiskBusVirtio}}})
	}
	created, err := s.kv.VirtualMachineInstances(vmi.Namespace).Create(ctx, vmi, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil, nil // our cache lags behind an earlier create
	}
	if err != nil {
		return nil, fmt.Errorf("deckhouse vm %s: create vmi: %w", keyOf(dvm), err)
	}
	s.log.Info().Str("vm", keyOf(dvm)).Msg("deckhouse vm: started")
	return created, nil
}

// deckhousePhase maps the internal VMI onto the Deckhouse VM's status.phase.
func deckhousePhase(dvm *unstructured.Unstructured, vmi *kvv1.VirtualMachineInstance) string {
	switch {
	case dvm.GetDeletionTimestamp() != nil:
		return "Terminating"
	case vmi == nil:
		return "Stopped"
	case vmi.DeletionTimestamp != nil:
		return "Stopping"
	}
	switch vmi.Status.Phase {
	case kvv1.VmPhaseUnset, kvv1.Pending:
		return "Pending"
	case kvv1.Scheduling, kvv1.Scheduled:
		return "Starting"
	case kvv1.Running:
		if ms := vmi.Status.MigrationState; ms != nil && !ms.Completed {
			return "Migrating"
		}
		return "Running"
	}
	return "Stopped"
}

func (s *Simulator) updateDeckhouseStatus(ctx context.Context, dvm *unstructured.Unstructured, vmi *kvv1.VirtualMachineInstance) error {
	phase := deckhousePhase(dvm, vmi)
	node := ""
	var ms map[string]any
	var pods []any
	if vmi != nil && !vmiFinal(vmi) {
		node = vmi.Status.NodeName
		mine, _ := s.launcherPods(vmi)
		act := activePod(vmi, mine)
		for _, p := range mine {
			if isTerminal(p) {
				continue
			}
			pods = append(pods, map[string]any{"name": p.Name, "active": act != nil && act.UID == p.UID})
		}
	}
	if vmi != nil && vmi.Status.MigrationState != nil {
		m := vmi.Status.MigrationState
		result := ""
		if m.Completed {
			result = "Succeeded"
			if m.Failed {
				result = "Failed"
			}
		}
		ms = map[string]any{
			"result": result,
			"source": map[string]any{"node": m.SourceNode, "pod": m.SourcePod},
			"target": map[string]any{"node": m.TargetNode, "pod": m.TargetPod},
		}
		if m.StartTimestamp != nil {
			ms["startTimestamp"] = m.StartTimestamp.UTC().Format("2006-01-02T15:04:05Z")
		}
		if m.EndTimestamp != nil {
			ms["endTimestamp"] = m.EndTimestamp.UTC().Format("2006-01-02T15:04:05Z")
		}
	}
	ip := ""
	if vmi != nil && len(vmi.Status.Interfaces) > 0 && !vmiFinal(vmi) {
		ip = vmi.Status.Interfaces[0].IP
	}
	want := map[string]any{"phase": phase, "nodeName": node, "ipAddress": ip, "observedGeneration": dvm.GetGeneration()}
	conds, err := s.deckhouseConditions(dvm, vmi)
	if err != nil {
		return err
	}
	want["conditions"] = conds
	if ms != nil {
		want["migrationState"] = ms
	}
	want["virtualMachinePods"] = pods
	cur, _, _ := unstructured.NestedMap(dvm.Object, "status")
	if statusMatches(cur, want) {
		return nil
	}
	return s.mutateDVM(ctx, dvm.GetNamespace(), dvm.GetName(), true, func(u *unstructured.Unstructured) bool {
		st, _, _ := unstructured.NestedMap(u.Object, "status")
		if st == nil {
			st = map[string]any{}
		}
		if statusMatches(st, want) {
			return false
		}
		for k, v := range want {
			if v == nil || v == "" || (k == "virtualMachinePods" && len(pods) == 0) || (k == "conditions" && len(conds) == 0) {
				delete(st, k)
				continue
			}
			st[k] = v
		}
		u.Object["status"] = st
		return true
	})
}

// statusMatches compares the fields of want with cur as JSON.
func statusMatches(cur, want map[string]any) bool {
	for k, v := range want {
		a, _ := json.Marshal(cur[k])
		b, _ := json.Marshal(v)
		if (v == "" || v == nil || ((k == "virtualMachinePods" || k == "conditions") && (string(b) == "null" || string(b) == "[]"))) && cur[k] == nil {
			continue
		}
		if k == "observedGeneration" {
			if fmt.Sprint(cur[k]) != fmt.Sprint(v) {
				return false
			}
			continue
		}
		if string(a) != string(b) {
			return false
		}
	}
	return true
}

// StartDeckhouseVM asks for Deckhouse VM ns/name to run (a Start
// VirtualMachineOperation): it records AnnotationPower=on and removes a
// VMI that has ended, so that the controller starts a new one.
func (s *Simulator) StartDeckhouseVM(ctx context.Context, ns, name string) error {
	if err := s.setPower(ctx, ns, name, PowerOn); err != nil {
		return err
	}
	vmi, err := s.KubeVirt.VirtualMachineInstances(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("start deckhouse vm %s/%s: %w", ns, name, err)
	}
	if vmiFinal(vmi) {
		return s.deleteVMI(ctx, vmi)
	}
	return nil
}

// StopDeckhouseVM asks for Deckhouse VM ns/name to stop (a Stop
// VirtualMachineOperation): it records AnnotationPower=off; with force the
// VMI's pods are deleted without a grace period.
func (s *Simulator) StopDeckhouseVM(ctx context.Context, ns, name string, force bool) error {
	if err := s.setPower(ctx, ns, name, PowerOff); err != nil {
		return err
	}
	if !force {
		return nil
	}
	vmi, err := s.KubeVirt.VirtualMachineInstances(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stop deckhouse vm %s/%s: %w", ns, name, err)
	}
	for _, p := range s.podsBy(byVMI, ns+"/"+name) {
		if p.Labels[kvv1.CreatedByLabel] == string(vmi.UID) {
			s.forceDeletePod(ctx, p, "deckhouse vm: forced stop")
		}
	}
	return s.deleteVMI(ctx, vmi)
}

func (s *Simulator) setPower(ctx context.Context, ns, name, power string) error {
	patch := []byte(fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}}}`, AnnotationPower, power))
	if _, err := s.Dynamic.Resource(DeckhouseVMGVR).Namespace(ns).Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("set power %s on deckhouse vm %s/%s: %w", power, ns, name, err)
	}
	return nil
}

// Deckhouse VirtualMachine conditions the simulator keeps (api/core/v1alpha2/vmcondition).
const (
	DeckhouseConditionEvictionRequired = "EvictionRequired"
	DeckhouseConditionMigrating        = "Migrating"
	deckhouseReasonEvictionRequired    = "EvictionRequired"
	deckhouseReasonMigratingInProgress = "InProgress"
)

// deckhouseConditions returns the VM's status.conditions with EvictionRequired and Migrating
// brought up to date, in their unstructured form:
//   - EvictionRequired while the VMI runs and is marked for evacuation (the eviction webhook of
//     Deckhouse's KubeVirt fork set status.evacuationNodeName), as controller/vm/internal/evict.go;
//   - Migrating True while a live migration has started and not ended (migrating.go's
//     liveMigrationInProgress); its Pending states, read from the operations, are left out.
func (s *Simulator) deckhouseConditions(dvm *unstructured.Unstructured, vmi *kvv1.VirtualMachineInstance) ([]any, error) {
	var conds []metav1.Condition
	if raw, ok, _ := unstructured.NestedSlice(dvm.Object, "status", "conditions"); ok {
		for _, c := range raw {
			m, ok := c.(map[string]any)
			if !ok {
				continue
			}
			var cond metav1.Condition
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(m, &cond); err != nil {
				return nil, fmt.Errorf("deckhouse vm %s: read condition: %w", keyOf(dvm), err)
			}
			conds = append(conds, cond)
		}
	}
	now, gen := s.now(), dvm.GetGeneration()
	if vmi != nil && vmi.Status.Phase == kvv1.Running && vmi.Status.EvacuationNodeName != "" {
		meta.SetStatusCondition(&conds, metav1.Condition{
			Type: DeckhouseConditionEvictionRequired, Status: metav1.ConditionTrue, Reason: deckhouseReasonEvictionRequired,
			Message: "VirtualMachine should be evicted from current node or restarted.", ObservedGeneration: gen, LastTransitionTime: now,
		})
	} else {
		meta.RemoveStatusCondition(&conds, DeckhouseConditionEvictionRequired)
	}
	if ms := vmiMigrationState(vmi); ms != nil && ms.StartTimestamp != nil && ms.EndTimestamp == nil {
		meta.SetStatusCondition(&conds, metav1.Condition{
			Type: DeckhouseConditionMigrating, Status: metav1.ConditionTrue, Reason: deckhouseReasonMigratingInProgress,
			ObservedGeneration: gen, LastTransitionTime: now,
		})
	} else {
		meta.RemoveStatusCondition(&conds, DeckhouseConditionMigrating)
	}
	out := make([]any, 0, len(conds))
	for i := range conds {
		m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&conds[i])
		if err != nil {
			return nil, fmt.Errorf("deckhouse vm %s: write condition: %w", keyOf(dvm), err)
		}
		out = append(out, m)
	}
	return out, nil
}

func vmiMigrationState(vmi *kvv1.VirtualMachineInstance) *kvv1.VirtualMachineInstanceMigrationState {
	if vmi == nil {
		return nil
	}
	return vmi.Status.MigrationState
}
