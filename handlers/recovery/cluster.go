package recovery

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

// This file reads the cluster and makes the recovery's idempotent changes:
// NotFound is an outcome, not an error.

// Resources the recovery reads.
var (
	VMIResource         = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstances"}
	VMResource          = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachines"}
	MigrationResource   = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstancemigrations"}
	DeckhouseVMResource = schema.GroupVersionResource{Group: "virtualization.deckhouse.io", Version: "v1alpha2", Resource: "virtualmachines"}
)

// Labels of KubeVirt's pods (kubevirt.io=<component>) and of Deckhouse's
// virt-launcher pods.
const (
	labelKubeVirt       = "kubevirt.io"
	labelDeckhouseVM    = "vm.kubevirt.internal.virtualization.deckhouse.io/name"
	componentLauncher   = "virt-launcher"
	componentAPI        = "virt-api"
	componentController = "virt-controller"
)

// cluster reads and changes the cluster for one recovery.
type cluster struct {
	kube kubernetes.Interface
	dyn  dynamic.Interface
}

func (c cluster) node(ctx context.Context, name string) (*corev1.Node, *coordinationv1.Lease, error) {
	node, err := c.kube.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read node %s: %w", name, err)
	}
	lease, err := c.kube.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return node, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("read kubelet lease of node %s: %w", name, err)
	}
	return node, lease, nil
}

// view is the cluster's nodes, their leases and the pods bound to them.
type view struct {
	nodes  []corev1.Node
	leases map[string]*coordinationv1.Lease
	pods   map[string][]corev1.Pod // by node, not finished
}

func (c cluster) view(ctx context.Context, withPods bool) (*view, error) {
	nodes, err := c.kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	leases, err := c.kube.CoordinationV1().Leases(corev1.NamespaceNodeLease).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("list kubelet leases: %w", err)
	}
	v := &view{nodes: nodes.Items, leases: map[string]*coordinationv1.Lease{}, pods: map[string][]corev1.Pod{}}
	for i := range leases.Items {
		v.leases[leases.Items[i].Name] = &leases.Items[i]
	}
	if withPods {
		pods, err := c.kube.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{
			FieldSelector: "status.phase!=Succeeded,status.phase!=Failed"})
		if err != nil {
			return nil, fmt.Errorf("list pods: %w", err)
		}
		for _, p := range pods.Items {
			if p.Spec.NodeName != "" {
				v.pods[p.Spec.NodeName] = append(v.pods[p.Spec.NodeName], p)
			}
		}
	}
	return v, nil
}

// health judges every node that is not excluded from recovery.
func (v *view) health(now time.Time, leaseTimeout time.Duration) map[string]NodeHealth {
	out := map[string]NodeHealth{}
	for i := range v.nodes {
		n := &v.nodes[i]
		if excluded(n) {
			continue
		}
		out[n.Name] = Health(n, v.leases[n.Name], now, leaseTimeout)
	}
	return out
}

// rooms are the healthy, schedulable nodes other than failed and what they
// have left.
func (v *view) rooms(now time.Time, leaseTimeout time.Duration, failed string) []NodeLoad {
	var out []NodeLoad
	for i := range v.nodes {
		n := &v.nodes[i]
		if n.Name == failed || n.Spec.Unschedulable || n.Labels[kvv1.NodeSchedulable] == "false" ||
			!Health(n, v.leases[n.Name], now, leaseTimeout).Healthy {
			continue
		}
		cpu, mem := n.Status.Allocatable.Cpu().MilliValue(), n.Status.Allocatable.Memory().Value()
		load := NodeLoad{Allocatable: mem}
		for _, p := range v.pods[n.Name] {
			c, m := podRequests(&p)
			cpu -= c
			mem -= m
		}
		load.Room = NodeRoom{Name: n.Name, CPU: cpu, Memory: mem, Labels: n.Labels, Taints: n.Spec.Taints}
		out = append(out, load)
	}
	return out
}

func excluded(n *corev1.Node) bool { return n.Labels[LabelExclude] == "true" }

// droverTainted: drover left one of its taints on n.
func droverTainted(n *corev1.Node) bool {
	return n.Annotations[AnnotationTaintedBy] != "" || hasTaint(n, TaintRecovering)
}

// DroverTainted reports whether drover left one of its taints on n (the node
// watcher publishes node.ready for such a node once it is Ready).
func DroverTainted(n *corev1.Node) bool { return droverTainted(n) }

func hasTaint(n *corev1.Node, key string) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == key {
			return true
		}
	}
	return false
}

// deckhouseFencing: Deckhouse's watchdog fencing is armed on n.
func deckhouseFencing(n *corev1.Node) bool {
	if _, ok := n.Labels[DeckhouseFencingLabel]; !ok {
		return false
	}
	for _, a := range deckhouseMaintenance {
		if _, ok := n.Annotations[a]; ok {
			return false
		}
	}
	return true
}

func podRequests(p *corev1.Pod) (cpu, mem int64) {
	for _, c := range p.Spec.Containers {
		cpu += c.Resources.Requests.Cpu().MilliValue()
		mem += c.Resources.Requests.Memory().Value()
	}
	if p.Spec.Overhead != nil {
		cpu += p.Spec.Overhead.Cpu().MilliValue()
		mem += p.Spec.Overhead.Memory().Value()
	}
	return cpu, mem
}

func isLauncher(p *corev1.Pod) bool {
	_, deckhouse := p.Labels[labelDeckhouseVM]
	return p.Labels[labelKubeVirt] == componentLauncher || deckhouse
}

func isControlPlane(p *corev1.Pod) bool {
	c := p.Labels[labelKubeVirt]
	return c == componentAPI || c == componentController
}

// podsOn lists the pods bound to node that have not finished.
func (c cluster) podsOn(ctx context.Context, node string) ([]corev1.Pod, error) {
	l, err := c.kube.CoreV1().Pods(metav1.NamespaceAll).List(ctx, metav1.ListOptions{
		FieldSelector: fields.AndSelectors(fields.OneTermEqualSelector("spec.nodeName", node),
			fields.OneTermNotEqualSelector("status.phase", string(corev1.PodSucceeded)),
			fields.OneTermNotEqualSelector("status.phase", string(corev1.PodFailed))).String()})
	if err != nil {
		return nil, fmt.Errorf("list pods on node %s: %w", node, err)
	}
	return l.Items, nil
}

// list lists a custom resource in every namespace; a resource the cluster
// does not serve (no KubeVirt, no Deckhouse) lists nothing.
func (c cluster) list(ctx context.Context, gvr schema.GroupVersionResource) ([]unstructured.Unstructured, error) {
	l, err := c.dyn.Resource(gvr).Namespace(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if apierrors.IsNotFound(err) || meta.IsNoMatchError(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", gvr.Resource, err)
	}
	return l.Items, nil
}

func (c cluster) vmi(ctx context.Context, ns, name string) (*kvv1.VirtualMachineInstance, error) {
	u, err := c.dyn.Resource(VMIResource).Namespace(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read vmi %s/%s: %w", ns, name, err)
	}
	var vmi kvv1.VirtualMachineInstance
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &vmi); err != nil {
		return nil, fmt.Errorf("decode vmi %s/%s: %w", ns, name, err)
	}
	return &vmi, nil
}

// vmsOn lists the VMs whose instance runs on node (KubeVirt VMIs, and
// Deckhouse VirtualMachines), with their run policy, restart priority and
// the resources their launcher pod requests.
func (c cluster) vmsOn(ctx context.Context, node string) ([]VM, error) {
	pods, err := c.podsOn(ctx, node)
	if err != nil {
		return nil, err
	}
	all, err := c.vms(ctx, map[string][]corev1.Pod{node: pods}, node)
	return all[node], err
}

// vms lists the VMs that run on a node, by node: on every node when only
// is "", else on that one. pods are the pods of the nodes concerned.
func (c cluster) vms(ctx context.Context, pods map[string][]corev1.Pod, only string) (map[string][]VM, error) {
	byVMI, byDeckhouse := map[string]*corev1.Pod{}, map[string]*corev1.Pod{}
	for _, list := range pods {
		for i := range list {
			p := &list[i]
			if uid := p.Labels[kvv1.CreatedByLabel]; uid != "" && p.Labels[labelKubeVirt] == componentLauncher {
				byVMI[uid] = p
			}
			if name := p.Labels[labelDeckhouseVM]; name != "" {
				byDeckhouse[p.Namespace+"/"+name] = p
			}
		}
	}
	out := map[string][]VM{}
	vmis, err := c.list(ctx, VMIResource)
	if err != nil {
		return nil, err
	}
	kvms, err := c.list(ctx, VMResource)
	if err != nil {
		return nil, err
	}
	vmByKey := map[string]*unstructured.Unstructured{}
	for i := range kvms {
		vmByKey[kvms[i].GetNamespace()+"/"+kvms[i].GetName()] = &kvms[i]
	}
	for _, u := range vmis {
		var vmi kvv1.VirtualMachineInstance
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &vmi); err != nil {
			return nil, fmt.Errorf("decode vmi %s/%s: %w", u.GetNamespace(), u.GetName(), err)
		}
		node := vmi.Status.NodeName
		if node == "" || (only != "" && node != only) || vmi.IsFinal() {
			continue
		}
		owner := metav1.GetControllerOf(&vmi)
		if owner != nil && owner.APIVersion == DeckhouseVMResource.GroupVersion().String() {
			continue // listed with the Deckhouse VirtualMachines below
		}
		v := VM{Namespace: vmi.Namespace, Name: vmi.Name, Platform: PlatformKubeVirt, UID: string(vmi.UID), RunPolicy: "none (no VirtualMachine)"}
		if owner != nil && owner.Kind == "VirtualMachine" {
			if vm := vmByKey[vmi.Namespace+"/"+owner.Name]; vm != nil {
				v.Name = owner.Name
				v.RunPolicy = runStrategy(vm)
				v.Priority = priority(vm)
			}
		}
		v.Restarts = Restarts(PlatformKubeVirt, v.RunPolicy)
		if p := byVMI[string(vmi.UID)]; p != nil {
			v.CPU, v.Memory = podRequests(p)
			v.NodeSelector, v.Tolerations = p.Spec.NodeSelector, p.Spec.Tolerations
		} else {
			v.CPU = vmi.Spec.Domain.Resources.Requests.Cpu().MilliValue()
			v.Memory = vmi.Spec.Domain.Resources.Requests.Memory().Value()
			v.NodeSelector, v.Tolerations = vmi.Spec.NodeSelector, vmi.Spec.Tolerations
		}
		out[node] = append(out[node], v)
	}
	dvms, err := c.list(ctx, DeckhouseVMResource)
	if err != nil {
		return nil, err
	}
	for i := range dvms {
		u := &dvms[i]
		node, _, _ := unstructured.NestedString(u.Object, "status", "nodeName")
		if node == "" || (only != "" && node != only) {
			continue
		}
		policy, _, _ := unstructured.NestedString(u.Object, "spec", "runPolicy")
		if policy == "" {
			policy = "AlwaysOnUnlessStoppedManually"
		}
		v := VM{Namespace: u.GetNamespace(), Name: u.GetName(), Platform: PlatformDeckhouse, UID: string(u.GetUID()),
			RunPolicy: policy, Restarts: Restarts(PlatformDeckhouse, policy), Priority: priority(u)}
		if p := byDeckhouse[v.Key()]; p != nil {
			v.CPU, v.Memory = podRequests(p)
			v.NodeSelector, v.Tolerations = p.Spec.NodeSelector, p.Spec.Tolerations
		} else {
			if s, _, _ := unstructured.NestedString(u.Object, "spec", "memory", "size"); s != "" {
				if q, err := resource.ParseQuantity(s); err == nil {
					v.Memory = q.Value()
				}
			}
			if cores, ok, _ := unstructured.NestedInt64(u.Object, "spec", "cpu", "cores"); ok {
				v.CPU = cores * 1000
			}
		}
		out[node] = append(out[node], v)
	}
	return out, nil
}

func runStrategy(vm *unstructured.Unstructured) string {
	if s, ok, _ := unstructured.NestedString(vm.Object, "spec", "runStrategy"); ok && s != "" {
		return s
	}
	if running, ok, _ := unstructured.NestedBool(vm.Object, "spec", "running"); ok {
		if running {
			return string(kvv1.RunStrategyAlways)
		}
		return string(kvv1.RunStrategyHalted)
	}
	return string(kvv1.RunStrategyHalted)
}

func priority(obj metav1.Object) int {
	s, ok := obj.GetLabels()[LabelRestartPriority]
	if !ok {
		s = obj.GetAnnotations()[LabelRestartPriority]
	}
	n, _ := strconv.Atoi(s)
	return n
}

// running reports whether v runs again on a node other than failed.
func (c cluster) running(ctx context.Context, v VM, failed string) (bool, string, error) {
	if v.Platform == PlatformDeckhouse {
		u, err := c.dyn.Resource(DeckhouseVMResource).Namespace(v.Namespace).Get(ctx, v.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return false, "", nil
		}
		if err != nil {
			return false, "", fmt.Errorf("read deckhouse vm %s: %w", v.Key(), err)
		}
		phase, _, _ := unstructured.NestedString(u.Object, "status", "phase")
		node, _, _ := unstructured.NestedString(u.Object, "status", "nodeName")
		return phase == "Running" && node != "" && node != failed, node, nil
	}
	vmi, err := c.vmi(ctx, v.Namespace, v.Name)
	if err != nil || vmi == nil {
		return false, "", err
	}
	return vmi.Status.Phase == kvv1.Running && vmi.Status.NodeName != "" && vmi.Status.NodeName != failed &&
		string(vmi.UID) != v.UID, vmi.Status.NodeName, nil
}

// forceDelete deletes pod at once (grace 0), if it is still the same pod.
func (c cluster) forceDelete(ctx context.Context, p *corev1.Pod) error {
	err := c.kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{
		GracePeriodSeconds: ptr.To(int64(0)), Preconditions: &metav1.Preconditions{UID: &p.UID}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("force-delete pod %s/%s on %s: %w", p.Namespace, p.Name, p.Spec.NodeName, err)
	}
	return nil
}

// deleteFailure is a pod forceDeleteAll could not delete.
type deleteFailure struct {
	pod corev1.Pod
	err error
}

// forceDeleteAll force-deletes pods, a few at a time, and returns the ones
// it could not delete.
func (c cluster) forceDeleteAll(ctx context.Context, pods []corev1.Pod) []deleteFailure {
	var (
		mu     sync.Mutex
		failed []deleteFailure
		wg     sync.WaitGroup
	)
	sem := make(chan struct{}, 16)
	for i := range pods {
		wg.Add(1)
		sem <- struct{}{}
		go func(p *corev1.Pod) {
			defer wg.Done()
			defer func() { <-sem }()
			if err := c.forceDelete(ctx, p); err != nil {
				mu.Lock()
				failed = append(failed, deleteFailure{*p, err})
				mu.Unlock()
			}
		}(&pods[i])
	}
	wg.Wait()
	return failed
}

// migrationsFrom lists the unfinished migrations whose source is node.
func (c cluster) migrationsFrom(ctx context.Context, node string) ([]unstructured.Unstructured, error) {
	all, err := c.list(ctx, MigrationResource)
	if err != nil {
		return nil, err
	}
	var out []unstructured.Unstructured
	for _, m := range all {
		phase, _, _ := unstructured.NestedString(m.Object, "status", "phase")
		if phase == string(kvv1.MigrationSucceeded) || phase == string(kvv1.MigrationFailed) || m.GetDeletionTimestamp() != nil {
			continue
		}
		vmiName, _, _ := unstructured.NestedString(m.Object, "spec", "vmiName")
		vmi, err := c.vmi(ctx, m.GetNamespace(), vmiName)
		if err != nil {
			return nil, err
		}
		if vmi == nil {
			continue
		}
		source := vmi.Status.NodeName
		if ms := vmi.Status.MigrationState; ms != nil && !ms.Completed && ms.SourceNode != "" {
			source = ms.SourceNode
		}
		if source == node {
			out = append(out, m)
		}
	}
	return out, nil
}

func (c cluster) deleteMigration(ctx context.Context, m *unstructured.Unstructured) error {
	uid := m.GetUID()
	err := c.dyn.Resource(MigrationResource).Namespace(m.GetNamespace()).Delete(ctx, m.GetName(), metav1.DeleteOptions{
		Preconditions: &metav1.Preconditions{UID: &uid}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("delete migration %s/%s: %w", m.GetNamespace(), m.GetName(), err)
	}
	return nil
}

// detach deletes the VolumeAttachments of node whose volume no pod left
// on node uses (keep: PV names still needed); all of them when keep is nil.
func (c cluster) detach(ctx context.Context, node string, keep map[string]bool) (int, error) {
	l, err := c.kube.StorageV1().VolumeAttachments().List(ctx, metav1.ListOptions{})
	if err != nil {
		return 0, fmt.Errorf("list volume attachments: %w", err)
	}
	n := 0
	for _, va := range l.Items {
		if va.Spec.NodeName != node || va.DeletionTimestamp != nil {
			continue
		}
		if pv := va.Spec.Source.PersistentVolumeName; pv != nil && keep[*pv] {
			continue
		}
		err := c.kube.StorageV1().VolumeAttachments().Delete(ctx, va.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &va.UID}})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return n, fmt.Errorf("delete volume attachment %s of node %s: %w", va.Name, node, err)
		}
		n++
	}
	return n, nil
}

// volumesOf lists the PersistentVolumes the pods use.
func (c cluster) volumesOf(ctx context.Context, pods []corev1.Pod) (map[string]bool, error) {
	out := map[string]bool{}
	for _, p := range pods {
		for _, v := range p.Spec.Volumes {
			if v.PersistentVolumeClaim == nil {
				continue
			}
			pvc, err := c.kube.CoreV1().PersistentVolumeClaims(p.Namespace).Get(ctx, v.PersistentVolumeClaim.ClaimName, metav1.GetOptions{})
			if apierrors.IsNotFound(err) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("read claim %s/%s: %w", p.Namespace, v.PersistentVolumeClaim.ClaimName, err)
			}
			if pvc.Spec.VolumeName != "" {
				out[pvc.Spec.VolumeName] = true
			}
		}
	}
	return out, nil
}

// taint puts t on node. The out-of-service taint also names the operation
// that added it (AnnotationTaintedBy); one already there (a person's, a
// fencing agent's) is left as it is, and not claimed.
func (c cluster) taint(ctx context.Context, node string, t corev1.Taint, op string) (added bool, err error) {
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := c.kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if hasTaint(n, t.Key) {
			added = t.Key == TaintOutOfService && n.Annotations[AnnotationTaintedBy] != ""
			return nil
		}
		now := metav1.Now()
		if t.Effect == corev1.TaintEffectNoExecute {
			t.TimeAdded = &now
		}
		n.Spec.Taints = append(n.Spec.Taints, t)
		if t.Key == TaintOutOfService {
			if n.Annotations == nil {
				n.Annotations = map[string]string{}
			}
			n.Annotations[AnnotationTaintedBy] = op
		}
		_, err = c.kube.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		added = err == nil
		return err
	})
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("taint node %s %s: %w", node, t.Key, err)
	}
	return added, nil
}

// untaint removes the taints drover added from node: the out-of-service
// taint if it was drover's, and TaintRecovering.
func (c cluster) untaint(ctx context.Context, node string) (removed bool, err error) {
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := c.kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if !droverTainted(n) {
			return nil
		}
		var keep []corev1.Taint
		for _, t := range n.Spec.Taints {
			if t.Key == TaintRecovering || (t.Key == TaintOutOfService && n.Annotations[AnnotationTaintedBy] != "") {
				continue
			}
			keep = append(keep, t)
		}
		n.Spec.Taints = keep
		delete(n.Annotations, AnnotationTaintedBy)
		_, err = c.kube.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		removed = err == nil
		return err
	})
	if apierrors.IsNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("remove the out-of-service taint from node %s: %w", node, err)
	}
	return removed, nil
}
