package sim

import (
	"context"
	"fmt"
	"hash/fnv"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

const (
	// nodeUnresponsiveReason is KubeVirt's VMI status.reason for a VMI
	// failed because virt-handler on its node stopped answering
	// (pkg/virt-controller/watch/node/node.go).
	nodeUnresponsiveReason = "NodeUnresponsive"
	launcherImage          = "quay.io/kubevirt/virt-launcher:v1.8.0"
	// allowPodBridgeMigration is KubeVirt's opt-in for migrating a VMI with
	// a bridge binding on the pod network.
	allowPodBridgeMigration = "kubevirt.io/allow-pod-bridge-network-live-migration"
)

func (s *Simulator) runVMIs(ctx context.Context) error {
	return s.runWorkers(ctx, "vmi", s.vmiQueue, 4, s.syncVMI)
}

// launcherPods returns the virt-launcher pods of vmi (this incarnation
// only) and those of an earlier VMI of the same name. A pod of another VMI
// that is not older than vmi belongs to a newer VMI the cache has not shown
// yet: it is neither.
func (s *Simulator) launcherPods(vmi *kvv1.VirtualMachineInstance) (mine, stale []*corev1.Pod) {
	for _, p := range s.podsBy(byVMI, keyOf(vmi)) {
		switch {
		case p.Labels[kvv1.CreatedByLabel] == string(vmi.UID):
			mine = append(mine, p)
		case p.CreationTimestamp.Before(&vmi.CreationTimestamp):
			stale = append(stale, p)
		}
	}
	return mine, stale
}

// activePod is the launcher pod that hosts the VMI now: the one on
// status.nodeName (a completed migration moves it there; a migration target
// is always on another node until then), else the first non-target pod.
func activePod(vmi *kvv1.VirtualMachineInstance, pods []*corev1.Pod) *corev1.Pod {
	var best *corev1.Pod
	for _, p := range pods {
		if vmi.Status.NodeName != "" {
			if p.Spec.NodeName != vmi.Status.NodeName {
				continue
			}
		} else if p.Labels[kvv1.MigrationJobLabel] != "" {
			continue
		}
		if best == nil || (isTerminal(best) && !isTerminal(p)) {
			best = p
		}
	}
	return best
}

func launcherPodName(vmi string, seed string) string {
	h := fnv.New32a()
	_, _ = h.Write([]byte(seed))
	const alphabet = "bcdfghjklmnpqrstvwxz2456789"
	v := h.Sum32()
	b := make([]byte, 5)
	for i := range b {
		b[i] = alphabet[v%uint32(len(alphabet))]
		v /= uint32(len(alphabet))
	}
	return "virt-launcher-" + vmi + "-" + string(b)
}

// vmiResources returns the pod requests for a VMI: its resource requests,
// else one tenth of a CPU per vCPU (KubeVirt's cpuAllocationRatio 10) and
// the guest memory.
func vmiResources(vmi *kvv1.VirtualMachineInstance) corev1.ResourceList {
	out := corev1.ResourceList{}
	d := vmi.Spec.Domain
	if q, ok := d.Resources.Requests[corev1.ResourceCPU]; ok {
		out[corev1.ResourceCPU] = q
	} else {
		vcpus := int64(1)
		if d.CPU != nil {
			c, so, t := int64(max(d.CPU.Cores, 1)), int64(max(d.CPU.Sockets, 1)), int64(max(d.CPU.Threads, 1))
			vcpus = c * so * t
		}
		out[corev1.ResourceCPU] = *resource.NewMilliQuantity(100*vcpus, resource.DecimalSI)
	}
	if mem := vmiGuestMemory(vmi); mem > 0 {
		out[corev1.ResourceMemory] = *resource.NewQuantity(mem, resource.BinarySI)
	}
	return out
}

// vmiGuestMemory is the guest's memory in bytes.
func vmiGuestMemory(vmi *kvv1.VirtualMachineInstance) int64 {
	d := vmi.Spec.Domain
	if d.Memory != nil && d.Memory.Guest != nil {
		return d.Memory.Guest.Value()
	}
	if q, ok := d.Resources.Requests[corev1.ResourceMemory]; ok {
		return q.Value()
	}
	return 0
}

// newLauncherPod builds the virt-launcher pod for vmi; for a migration
// target, m is the migration and source the node to avoid.
func newLauncherPod(vmi *kvv1.VirtualMachineInstance, m *kvv1.VirtualMachineInstanceMigration, source string) *corev1.Pod {
	labels := map[string]string{}
	for k, v := range vmi.Labels {
		if k == kvv1.NodeNameLabel || k == kvv1.MigrationTargetNodeNameLabel {
			continue
		}
		labels[k] = v
	}
	labels[kvv1.AppLabel] = launcherLabelValue
	labels[kvv1.CreatedByLabel] = string(vmi.UID)
	labels["vm.kubevirt.io/name"] = vmi.Name
	annotations := map[string]string{kvv1.DomainAnnotation: vmi.Name}
	seed := string(vmi.UID)
	if m != nil {
		labels[kvv1.MigrationJobLabel] = string(m.UID)
		annotations[kvv1.MigrationJobNameAnnotation] = m.Name
		seed += "/" + string(m.UID)
	}
	nodeSelector := map[string]string{kvv1.NodeSchedulable: "true"}
	for k, v := range vmi.Spec.NodeSelector {
		nodeSelector[k] = v
	}
	if m != nil {
		for k, v := range m.Spec.AddedNodeSelector {
			if _, ok := nodeSelector[k]; !ok { // cannot override the VMI's own
				nodeSelector[k] = v
			}
		}
	}
	affinity := vmi.Spec.Affinity.DeepCopy()
	if source != "" {
		// the target must land on another node
		avoid := corev1.NodeSelectorRequirement{Key: "metadata.name", Operator: corev1.NodeSelectorOpNotIn, Values: []string{source}}
		if affinity == nil {
			affinity = &corev1.Affinity{}
		}
		if affinity.NodeAffinity == nil {
			affinity.NodeAffinity = &corev1.NodeAffinity{}
		}
		req := affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution
		if req == nil || len(req.NodeSelectorTerms) == 0 {
			req = &corev1.NodeSelector{NodeSelectorTerms: []corev1.NodeSelectorTerm{{}}}
		}
		for i := range req.NodeSelectorTerms {
			req.NodeSelectorTerms[i].MatchFields = append(req.NodeSelectorTerms[i].MatchFields, avoid)
		}
		affinity.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution = req
	}
	grace := int64(30)
	if vmi.Spec.TerminationGracePeriodSeconds != nil {
		grace = *vmi.Spec.TerminationGracePeriodSeconds
	}
	var volumes []corev1.Volume
	for _, v := range vmi.Spec.Volumes {
		claim := vmiVolumeClaim(v)
		if claim == "" {
			continue
		}
		volumes = append(volumes, corev1.Volume{Name: v.Name, VolumeSource: corev1.VolumeSource{
			PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: claim},
		}})
	}
	req := vmiResources(vmi)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name:        launcherPodName(vmi.Name, seed),
			Namespace:   vmi.Namespace,
			Labels:      labels,
			Annotations: annotations,
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: kvv1.SchemeGroupVersion.String(), Kind: "VirtualMachineInstance",
				Name: vmi.Name, UID: vmi.UID, Controller: ptr.To(true), BlockOwnerDeletion: ptr.To(true),
			}},
		},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name: launcherContainer, Image: launcherImage,
				Command:   []string{"/usr/bin/virt-launcher-monitor"},
				Resources: corev1.ResourceRequirements{Requests: req, Limits: corev1.ResourceList{corev1.ResourceMemory: req[corev1.ResourceMemory]}},
			}},
			RestartPolicy:                 corev1.RestartPolicyNever,
			TerminationGracePeriodSeconds: ptr.To(grace + 15),
			NodeSelector:                  nodeSelector,
			Affinity:                      affinity,
			Tolerations:                   vmi.Spec.Tolerations,
			SchedulerName:                 vmi.Spec.SchedulerName,
			PriorityClassName:             vmi.Spec.PriorityClassName,
			Volumes:                       volumes,
			AutomountServiceAccountToken:  ptr.To(false),
		},
	}
}

func vmiVolumeClaim(v kvv1.Volume) string {
	switch {
	case v.PersistentVolumeClaim != nil:
		return v.PersistentVolumeClaim.ClaimName
	case v.DataVolume != nil:
		return v.DataVolume.Name
	}
	return ""
}

// migratableCondition computes LiveMigratable as KubeVirt does for the two
// causes the simulator knows: RWO claims and bridge binding on the pod network.
func (s *Simulator) migratableCondition(vmi *kvv1.VirtualMachineInstance) kvv1.VirtualMachineInstanceCondition {
	c := kvv1.VirtualMachineInstanceCondition{Type: kvv1.VirtualMachineInstanceIsMigratable, Status: corev1.ConditionTrue}
	for _, v := range vmi.Spec.Volumes {
		claim := vmiVolumeClaim(v)
		if claim == "" {
			continue
		}
		if pvc := s.getPVC(vmi.Namespace, claim); pvc != nil && isRWO(pvc) {
			c.Status = corev1.ConditionFalse
			c.Reason = kvv1.VirtualMachineInstanceReasonDisksNotMigratable
			c.Message = fmt.Sprintf("cannot migrate VMI: PVC %s is not shared, live migration requires that all PVCs must be shared (using ReadWriteMany access mode)", claim)
			return c
		}
	}
	podNets := map[string]bool{}
	for _, n := range vmi.Spec.Networks {
		if n.Pod != nil {
			podNets[n.Name] = true
		}
	}
	for _, i := range vmi.Spec.Domain.Devices.Interfaces {
		if i.Bridge != nil && podNets[i.Name] && vmi.Annotations[allowPodBridgeMigration] != "true" {
			c.Status = corev1.ConditionFalse
			c.Reason = kvv1.VirtualMachineInstanceReasonInterfaceNotMigratable
			c.Message = "cannot migrate VMI which does not use masquerade, bridge with kubevirt.io/allow-pod-bridge-network-live-migration VM annotation or a migratable plugin to connect to the pod network"
			return c
		}
	}
	return c
}

func setVMICondition(vmi *kvv1.VirtualMachineInstance, c kvv1.VirtualMachineInstanceCondition, now metav1.Time) bool {
	for i := range vmi.Status.Conditions {
		old := &vmi.Status.Conditions[i]
		if old.Type != c.Type {
			continue
		}
		if old.Status == c.Status && old.Reason == c.Reason && old.Message == c.Message {
			return false
		}
		c.LastTransitionTime = now
		c.LastProbeTime = old.LastProbeTime
		*old = c
		return true
	}
	c.LastTransitionTime = now
	vmi.Status.Conditions = append(vmi.Status.Conditions, c)
	return true
}

func removeVMICondition(vmi *kvv1.VirtualMachineInstance, t kvv1.VirtualMachineInstanceConditionType) bool {
	var out []kvv1.VirtualMachineInstanceCondition
	found := false
	for _, c := range vmi.Status.Conditions {
		if c.Type == t {
			found = true
			continue
		}
		out = append(out, c)
	}
	vmi.Status.Conditions = out
	return found
}

func vmiCondition(vmi *kvv1.VirtualMachineInstance, t kvv1.VirtualMachineInstanceConditionType) *kvv1.VirtualMachineInstanceCondition {
	for i := range vmi.Status.Conditions {
		if vmi.Status.Conditions[i].Type == t {
			return &vmi.Status.Conditions[i]
		}
	}
	return nil
}

func setVMIPhase(vmi *kvv1.VirtualMachineInstance, phase kvv1.VirtualMachineInstancePhase, now metav1.Time) bool {
	if vmi.Status.Phase == phase {
		return false
	}
	vmi.Status.Phase = phase
	vmi.Status.PhaseTransitionTimestamps = append(vmi.Status.PhaseTransitionTimestamps, kvv1.VirtualMachineInstancePhaseTransitionTimestamp{Phase: phase, PhaseTransitionTimestamp: now})
	return true
}

func vmiFinal(vmi *kvv1.VirtualMachineInstance) bool {
	return vmi.Status.Phase == kvv1.Succeeded || vmi.Status.Phase == kvv1.Failed
}

// syncVMI plays virt-controller's VMI controller (pkg/virt-controller/watch/vmi/lifecycle.go)
// while virt-controller runs (virtControllerActive), and virt-handler while the VMI's node is
// alive: the controller creates the launcher pod, follows it through Pending, Scheduling and
// Scheduled and marks the VMI Failed, without a reason, once its pod is gone; virt-handler
// starts the guest (Running) and reports a guest that ended with its pod. A VMI on a node that
// stopped answering keeps its phase until its pod is gone, or until virt-controller's node
// controller gives up on the node (failUnresponsiveNodeVMIs).
func (s *Simulator) syncVMI(ctx context.Context, key string) error {
	ns, name := splitKey(key)
	vmi := s.getVMI(key)
	ctrl := s.virtControllerActive() // a new leader resyncs every VMI
	if vmi == nil {
		if !ctrl {
			return nil
		}
		// garbage-collect launcher pods of a VMI that is gone
		for _, p := range s.podsBy(byVMI, key) {
			if p.DeletionTimestamp == nil {
				s.deletePod(ctx, p, nil)
			}
		}
		return nil
	}
	pods, stale := s.launcherPods(vmi)
	for _, p := range stale {
		if ctrl && p.DeletionTimestamp == nil {
			s.deletePod(ctx, p, nil)
		}
	}
	now := s.now()
	if vmi.DeletionTimestamp != nil {
		if !ctrl {
			return nil
		}
		live := 0
		for _, p := range pods {
			live++
			if p.DeletionTimestamp == nil {
				s.deletePod(ctx, p, vmi.Spec.TerminationGracePeriodSeconds)
			}
		}
		if live == 0 && hasFinalizer(vmi, kvv1.VirtualMachineInstanceFinalizer) {
			_, err := s.mutateVMI(ctx, ns, name, func(v *kvv1.VirtualMachineInstance) bool {
				return removeFinalizer(v, kvv1.VirtualMachineInstanceFinalizer)
			})
			if err != nil {
				return fmt.Errorf("vmi %s: remove finalizer: %w", key, err)
			}
		}
		return nil
	}

	switch vmi.Status.Phase {
	case kvv1.VmPhaseUnset:
		if !ctrl {
			return nil
		}
		if !hasFinalizer(vmi, kvv1.VirtualMachineInstanceFinalizer) {
			if _, err := s.mutateVMI(ctx, ns, name, func(v *kvv1.VirtualMachineInstance) bool {
				return addFinalizer(v, kvv1.VirtualMachineInstanceFinalizer)
			}); err != nil {
				return fmt.Errorf("vmi %s: add finalizer: %w", key, err)
			}
		}
		_, err := s.mutateVMI(ctx, ns, name, func(v *kvv1.VirtualMachineInstance) bool {
			if v.Status.Phase != kvv1.VmPhaseUnset {
				return false
			}
			setVMIPhase(v, kvv1.Pending, now)
			setVMICondition(v, s.migratableCondition(v), now)
			setVMICondition(v, kvv1.VirtualMachineInstanceCondition{Type: kvv1.VirtualMachineInstanceReady, Status: corev1.ConditionFalse, Reason: "PodNotExists", Message: "virt-launcher pod has not yet been scheduled"}, now)
			return true
		})
		if err != nil {
			return fmt.Errorf("vmi %s: set Pending: %w", key, err)
		}
		return nil

	case kvv1.Pending:
		if !ctrl {
			return nil
		}
		if err := s.ensureServiceAccount(ctx, ns); err != nil {
			return err
		}
		pod := newLauncherPod(vmi, nil, "")
		if _, err := s.Kube.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("vmi %s: create launcher pod: %w", key, err)
		}
		_, err := s.mutateVMI(ctx, ns, name, func(v *kvv1.VirtualMachineInstance) bool {
			return v.Status.Phase == kvv1.Pending && setVMIPhase(v, kvv1.Scheduling, now)
		})
		if err != nil {
			return fmt.Errorf("vmi %s: set Scheduling: %w", key, err)
		}
		return nil

	case kvv1.Scheduling, kvv1.Scheduled:
		pod := activePod(vmi, pods)
		if (pod == nil || isTerminal(pod) || vmi.Status.Phase == kvv1.Scheduling) && !ctrl {
			return nil
		}
		if pod == nil {
			// the cache may lag behind our own create: ask the API
			podName := launcherPodName(vmi.Name, string(vmi.UID))
			if _, err := s.Kube.CoreV1().Pods(ns).Get(ctx, podName, metav1.GetOptions{}); err == nil || !apierrors.IsNotFound(err) {
				return err
			}
			return s.failVMI(ctx, vmi, "", "virt-launcher pod was deleted before the VMI started")
		}
		if isTerminal(pod) {
			return s.failVMI(ctx, vmi, "", fmt.Sprintf("virt-launcher pod %s ended before the VMI started", pod.Name))
		}
		if vmi.Status.Phase == kvv1.Scheduling {
			if pod.Status.Phase != corev1.PodRunning || pod.DeletionTimestamp != nil {
				return s.copyPodScheduled(ctx, vmi, pod)
			}
			_, err := s.mutateVMI(ctx, ns, name, func(v *kvv1.VirtualMachineInstance) bool {
				if v.Status.Phase != kvv1.Scheduling {
					return false
				}
				setVMIPhase(v, kvv1.Scheduled, now)
				v.Status.NodeName = pod.Spec.NodeName
				removeVMICondition(v, kvv1.VirtualMachineInstanceConditionType(corev1.PodScheduled))
				return true
			})
			if err != nil {
				return fmt.Errorf("vmi %s: set Scheduled: %w", key, err)
			}
			return s.labelVMINode(ctx, ns, name, pod.Spec.NodeName)
		}
		// Scheduled: virt-handler on the node starts the domain
		if !s.nodes.kubeletAlive(pod.Spec.NodeName) {
			return nil
		}
		return s.updateRunningVMI(ctx, vmi, pod, now, true)

	case kvv1.Running:
		pod := activePod(vmi, pods)
		if pod == nil {
			if !ctrl {
				return nil
			}
			if ms := vmi.Status.MigrationState; ms != nil && !ms.Completed && ms.TargetNode != "" && s.getPod(ns+"/"+ms.TargetPod) != nil && s.migrationHandingOff(vmi) {
				return nil
			}
			// lifecycle.go: "setting VMI to failed while running because pod does not exist",
			// with no reason, whatever the state of its node.
			return s.failVMI(ctx, vmi, "", "virt-launcher pod is gone")
		}
		switch pod.Status.Phase {
		case corev1.PodSucceeded, corev1.PodFailed:
			// virt-handler on the pod's node reports the guest's end; a dead node's cannot.
			if !s.nodes.kubeletAlive(pod.Spec.NodeName) {
				return nil
			}
			if pod.Status.Phase == corev1.PodFailed {
				return s.failVMI(ctx, vmi, "", fmt.Sprintf("virt-launcher pod %s failed", pod.Name))
			}
			_, err := s.mutateVMI(ctx, ns, name, func(v *kvv1.VirtualMachineInstance) bool {
				// decided on a cached VMI: a migration may have moved it since
				if vmiFinal(v) || v.UID != vmi.UID || v.Status.NodeName != pod.Spec.NodeName {
					return false
				}
				setVMIPhase(v, kvv1.Succeeded, now)
				setVMICondition(v, kvv1.VirtualMachineInstanceCondition{Type: kvv1.VirtualMachineInstanceReady, Status: corev1.ConditionFalse, Reason: "PodTerminating"}, now)
				return true
			})
			return err
		}
		if !ctrl {
			return nil
		}
		// a migration source pod that has completed is cleaned up
		for _, p := range pods {
			if p.UID != pod.UID && p.Status.Phase == corev1.PodSucceeded && p.DeletionTimestamp == nil {
				s.deletePod(ctx, p, nil)
			}
		}
		return s.updateRunningVMI(ctx, vmi, pod, now, false)
	}
	return nil
}

// migrationHandingOff: a migration is about to move the VMI (its source pod
// may already be gone after a completed handoff the VMI does not show yet).
func (s *Simulator) migrationHandingOff(vmi *kvv1.VirtualMachineInstance) bool {
	for _, m := range s.migrationsForVMI(vmi.Namespace, vmi.Name) {
		if m.Status.Phase == kvv1.MigrationRunning || m.Status.Phase == kvv1.MigrationSucceeded {
			if ms := vmi.Status.MigrationState; ms != nil && ms.MigrationUID == m.UID {
				return s.truth.running(podUIDByName(s, vmi.Namespace, ms.TargetPod))
			}
		}
	}
	return false
}

func podUIDByName(s *Simulator, ns, name string) types.UID {
	if p := s.getPod(ns + "/" + name); p != nil {
		return p.UID
	}
	return ""
}

func (s *Simulator) updateRunningVMI(ctx context.Context, vmi *kvv1.VirtualMachineInstance, pod *corev1.Pod, now metav1.Time, start bool) error {
	ready := corev1.ConditionFalse
	for _, c := range pod.Status.Conditions {
		if c.Type == corev1.PodReady {
			ready = c.Status
		}
	}
	pods, _ := s.launcherPods(vmi)
	active := map[types.UID]string{}
	for _, p := range pods {
		if !isTerminal(p) && p.Spec.NodeName != "" {
			active[p.UID] = p.Spec.NodeName
		}
	}
	_, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, func(v *kvv1.VirtualMachineInstance) bool {
		if vmiFinal(v) {
			return false
		}
		changed := false
		if start {
			changed = setVMIPhase(v, kvv1.Running, now)
		}
		rc := kvv1.VirtualMachineInstanceCondition{Type: kvv1.VirtualMachineInstanceReady, Status: ready}
		if ready != corev1.ConditionTrue {
			rc.Reason = "PodNotReady"
		}
		changed = setVMICondition(v, rc, now) || changed
		changed = setVMICondition(v, s.migratableCondition(v), now) || changed
		if len(v.Status.Interfaces) == 0 && pod.Status.PodIP != "" {
			v.Status.Interfaces = []kvv1.VirtualMachineInstanceNetworkInterface{{Name: "default", IP: pod.Status.PodIP, IPs: []string{pod.Status.PodIP}, InterfaceName: "eth0"}}
			changed = true
		}
		if !equalActivePods(v.Status.ActivePods, active) {
			v.Status.ActivePods = active
			changed = true
		}
		if v.Status.MigrationMethod == "" {
			v.Status.MigrationMethod = kvv1.LiveMigration
			changed = true
		}
		return changed
	})
	if err != nil {
		return fmt.Errorf("vmi %s: update running status: %w", keyOf(vmi), err)
	}
	return nil
}

func equalActivePods(a, b map[types.UID]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func (s *Simulator) copyPodScheduled(ctx context.Context, vmi *kvv1.VirtualMachineInstance, pod *corev1.Pod) error {
	for _, c := range pod.Status.Conditions {
		if c.Type != corev1.PodScheduled || c.Status != corev1.ConditionFalse {
			continue
		}
		_, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, func(v *kvv1.VirtualMachineInstance) bool {
			return setVMICondition(v, kvv1.VirtualMachineInstanceCondition{
				Type: kvv1.VirtualMachineInstanceConditionType(corev1.PodScheduled), Status: corev1.ConditionFalse,
				Reason: c.Reason, Message: c.Message,
			}, s.now())
		})
		return err
	}
	return nil
}

func (s *Simulator) labelVMINode(ctx context.Context, ns, name, node string) error {
	_, err := s.mutateVMI(ctx, ns, name, func(v *kvv1.VirtualMachineInstance) bool {
		if v.Labels[kvv1.NodeNameLabel] == node {
			return false
		}
		if v.Labels == nil {
			v.Labels = map[string]string{}
		}
		v.Labels[kvv1.NodeNameLabel] = node
		return true
	})
	if err != nil {
		return fmt.Errorf("vmi %s/%s: label node: %w", ns, name, err)
	}
	return nil
}

// vmiShutOff is virt-handler reporting that the guest in launcher pod p
// shut down cleanly (its pod was deleted gracefully): the VMI it hosted
// is Succeeded.
func (s *Simulator) vmiShutOff(ctx context.Context, p *corev1.Pod) error {
	name := p.Annotations[kvv1.DomainAnnotation]
	vmi := s.getVMI(p.Namespace + "/" + name)
	if vmi == nil || string(vmi.UID) != p.Labels[kvv1.CreatedByLabel] || vmiFinal(vmi) || vmi.Status.NodeName != p.Spec.NodeName {
		return nil
	}
	now := s.now()
	_, err := s.mutateVMI(ctx, p.Namespace, name, func(v *kvv1.VirtualMachineInstance) bool {
		if v.UID != vmi.UID || vmiFinal(v) || v.Status.NodeName != p.Spec.NodeName {
			return false
		}
		setVMIPhase(v, kvv1.Succeeded, now)
		setVMICondition(v, kvv1.VirtualMachineInstanceCondition{Type: kvv1.VirtualMachineInstanceReady, Status: corev1.ConditionFalse, Reason: "PodTerminating"}, now)
		return true
	})
	if err != nil {
		return fmt.Errorf("vmi %s/%s: set Succeeded: %w", p.Namespace, name, err)
	}
	return nil
}

func (s *Simulator) failVMI(ctx context.Context, vmi *kvv1.VirtualMachineInstance, reason string, msg string) error {
	now := s.now()
	_, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, func(v *kvv1.VirtualMachineInstance) bool {
		// decided on a cached VMI: a migration may have moved it since
		if vmiFinal(v) || v.UID != vmi.UID || v.Status.NodeName != vmi.Status.NodeName || v.Status.Phase != vmi.Status.Phase {
			return false
		}
		setVMIPhase(v, kvv1.Failed, now)
		v.Status.Reason = reason
		setVMICondition(v, kvv1.VirtualMachineInstanceCondition{Type: kvv1.VirtualMachineInstanceReady, Status: corev1.ConditionFalse, Reason: "PodTerminating", Message: msg}, now)
		return true
	})
	if err != nil {
		return fmt.Errorf("vmi %s: set Failed: %w", keyOf(vmi), err)
	}
	s.log.Info().Str("vmi", keyOf(vmi)).Str("reason", reason).Msg("vmi: Failed: " + msg)
	return nil
}

func (s *Simulator) deletePod(ctx context.Context, p *corev1.Pod, grace *int64) {
	opts := metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &p.UID}}
	if grace != nil {
		opts.GracePeriodSeconds = ptr.To(*grace + 15)
	}
	if err := s.Kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, opts); err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		s.log.Debug().Err(err).Str("pod", keyOf(p)).Msg("delete pod")
	}
}

func splitKey(key string) (string, string) {
	for i := 0; i < len(key); i++ {
		if key[i] == '/' {
			return key[:i], key[i+1:]
		}
	}
	return "", key
}
