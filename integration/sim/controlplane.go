package sim

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/rand"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

// KubeVirt's own pods: virt-handler on every node (a DaemonSet), virt-api
// and virt-controller (two replicas each). They do nothing, but they are
// there, as on a real cluster: they get stuck on a dead node, drain has to
// skip or evict them, and a recovery has to clean them up.
const controlPlaneKey = "kubevirt-control-plane"

var kubevirtReplicaSets = map[string]int{"virt-api": 2, "virt-controller": 2}

func (s *Simulator) runControlPlane(ctx context.Context) error {
	if s.opts.NoKubeVirtPods {
		<-ctx.Done()
		return nil
	}
	s.controlPlaneQueue.Add(controlPlaneKey)
	return s.runWorkers(ctx, "kubevirt-control-plane", s.controlPlaneQueue, 1, func(ctx context.Context, _ string) error {
		return s.syncControlPlane(ctx)
	})
}

func (s *Simulator) syncControlPlane(ctx context.Context) error {
	ns := s.opts.KubeVirtNamespace
	if err := s.ensureNamespace(ctx, ns); err != nil {
		return err
	}
	if err := s.ensureServiceAccount(ctx, ns); err != nil {
		return err
	}
	var errs []error
	// virt-handler: the DaemonSet controller's part
	ds, err := s.ensureDaemonSet(ctx, ns, "virt-handler")
	if err != nil {
		return err
	}
	// failed daemon pods are replaced, as the DaemonSet controller does
	for _, comp := range []string{"virt-handler", "virt-api", "virt-controller"} {
		for _, p := range s.podsOf(ns, comp) {
			if isTerminal(p) && p.DeletionTimestamp == nil {
				s.deletePod(ctx, p, nil)
			}
		}
	}
	have := map[string]bool{}
	for _, p := range s.podsOf(ns, "virt-handler") {
		if p.DeletionTimestamp == nil && !isTerminal(p) {
			have[daemonNode(p)] = true
		}
	}
	for _, node := range s.nodeNames() {
		if have[node] {
			continue
		}
		pod := controlPlanePod(ns, "virt-handler", ds.UID, "DaemonSet", ds.Name)
		pod.Name = launcherPodName("x", node)[len("virt-launcher-x-"):] // stable per node: a lagging cache cannot double it
		pod.Name = "virt-handler-" + pod.Name
		pod.Spec.Affinity = &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{
			NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchFields: []corev1.NodeSelectorRequirement{{Key: "metadata.name", Operator: corev1.NodeSelectorOpIn, Values: []string{node}}}}},
		}}}
		pod.Spec.Tolerations = daemonSetTolerations()
		if _, err := s.Kube.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			errs = append(errs, fmt.Errorf("create virt-handler pod for %s: %w", node, err))
		}
	}
	// virt-api and virt-controller: the ReplicaSet controller's part
	for name, replicas := range kubevirtReplicaSets {
		rs, err := s.ensureReplicaSet(ctx, ns, name, replicas)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		active := 0
		seen := map[string]bool{}
		for _, p := range s.podsOf(ns, name) {
			seen[p.Name] = true
			if p.DeletionTimestamp == nil && !isTerminal(p) {
				active++
			}
		}
		// expectations: pods created but not in the cache yet count too
		now := s.clock.Now()
		for pod, at := range s.cpExpect {
			if seen[pod] || now.Sub(at) > 30*time.Second {
				delete(s.cpExpect, pod)
			} else if strings.HasPrefix(pod, name+"-") {
				active++
			}
		}
		for ; active < replicas; active++ {
			pod := controlPlanePod(ns, name, rs.UID, "ReplicaSet", rs.Name)
			pod.Name = name + "-" + rand.String(5)
			if _, err := s.Kube.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
				errs = append(errs, fmt.Errorf("create %s pod: %w", name, err))
				continue
			}
			s.cpExpect[pod.Name] = now
		}
	}
	return errors.Join(errs...)
}

func daemonNode(p *corev1.Pod) string {
	if p.Spec.NodeName != "" {
		return p.Spec.NodeName
	}
	if a := p.Spec.Affinity; a != nil && a.NodeAffinity != nil && a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution != nil {
		for _, t := range a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution.NodeSelectorTerms {
			for _, f := range t.MatchFields {
				if f.Key == "metadata.name" && len(f.Values) == 1 {
					return f.Values[0]
				}
			}
		}
	}
	return ""
}

// daemonSetTolerations are the ones the DaemonSet controller adds.
func daemonSetTolerations() []corev1.Toleration {
	var out []corev1.Toleration
	for _, k := range []string{taintNotReady, taintUnreachable} {
		out = append(out, corev1.Toleration{Key: k, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute})
	}
	for _, k := range []string{"node.kubernetes.io/disk-pressure", "node.kubernetes.io/memory-pressure", "node.kubernetes.io/pid-pressure", taintUnschedulable} {
		out = append(out, corev1.Toleration{Key: k, Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoSchedule})
	}
	return out
}

func (s *Simulator) podsOf(ns, component string) []*corev1.Pod {
	var out []*corev1.Pod
	objs, _ := s.podInformer.GetIndexer().ByIndex(cache.NamespaceIndex, ns)
	for _, o := range objs {
		p := o.(*corev1.Pod)
		if p.Labels[kvv1.AppLabel] == component {
			out = append(out, p)
		}
	}
	return out
}

func controlPlanePod(ns, component string, ownerUID types.UID, kind, owner string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: ns,
			Labels:    map[string]string{kvv1.AppLabel: component, "app.kubernetes.io/component": "kubevirt", "app.kubernetes.io/managed-by": "virt-operator"},
			OwnerReferences: []metav1.OwnerReference{{
				APIVersion: "apps/v1", Kind: kind, Name: owner, UID: ownerUID, Controller: ptr.To(true), BlockOwnerDeletion: ptr.To(true),
			}},
		},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{Name: component, Image: "quay.io/kubevirt/" + component + ":v1.8.0",
				Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("64Mi")}}}},
			PriorityClassName:            "",
			AutomountServiceAccountToken: ptr.To(false),
		},
	}
}

func (s *Simulator) ensureDaemonSet(ctx context.Context, ns, name string) (*appsv1.DaemonSet, error) {
	ds, err := s.Kube.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
	if err == nil {
		return ds, nil
	}
	if !apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("get daemonset %s/%s: %w", ns, name, err)
	}
	labels := map[string]string{kvv1.AppLabel: name}
	ds = &appsv1.DaemonSet{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: appsv1.DaemonSetSpec{
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: name, Image: "quay.io/kubevirt/" + name + ":v1.8.0"}}}},
		},
	}
	ds, err = s.Kube.AppsV1().DaemonSets(ns).Create(ctx, ds, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return s.Kube.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("create daemonset %s/%s: %w", ns, name, err)
	}
	return ds, nil
}

func (s *Simulator) ensureReplicaSet(ctx context.Context, ns, name string, replicas int) (*appsv1.ReplicaSet, error) {
	rs, err := s.Kube.AppsV1().ReplicaSets(ns).Get(ctx, name, metav1.GetOptions{})
	if err == nil {
		return rs, nil
	}
	if !apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("get replicaset %s/%s: %w", ns, name, err)
	}
	labels := map[string]string{kvv1.AppLabel: name}
	rs = &appsv1.ReplicaSet{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: appsv1.ReplicaSetSpec{
			Replicas: ptr.To(int32(replicas)),
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: name, Image: "quay.io/kubevirt/" + name + ":v1.8.0"}}}},
		},
	}
	rs, err = s.Kube.AppsV1().ReplicaSets(ns).Create(ctx, rs, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return s.Kube.AppsV1().ReplicaSets(ns).Get(ctx, name, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("create replicaset %s/%s: %w", ns, name, err)
	}
	return rs, nil
}
