package sim

// kube-controller-manager's ReplicaSet controller for user ReplicaSets
// (k8s.io/kubernetes pkg/controller/replicaset/replica_set.go, v1.34): it keeps
// spec.replicas active pods, creating them from the template (GenerateName "<rs>-", the
// template's labels and annotations, a controller reference) and deleting the surplus, and
// writes status. A pod that is being deleted or has finished is not active, so an evicted pod
// is replaced at once, and the simulator's scheduler places the replacement (on another node
// when the drained one is cordoned). KubeVirt's own virt-api and virt-controller ReplicaSets are
// left to controlplane.go. Orphan adoption, minReadySeconds and burst limits are left out.

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
)

// rsExpectTimeout bounds how long a created pod the cache has not shown yet, or a deleted pod
// it still shows as active, is remembered (the real controller's expectations time out after 5
// minutes; the simulator's cache catches up far sooner).
const rsExpectTimeout = 30 * time.Second

// rsExpectations remembers, per ReplicaSet, the pods created and deleted that the cache may not
// show yet, so that a lagging cache never makes the controller create or delete twice.
type rsExpectations struct {
	mu       sync.Mutex
	creating map[string]map[string]time.Time // rs key -> pod name -> when
	deleting map[string]map[string]time.Time
}

func newRSExpectations() *rsExpectations {
	return &rsExpectations{creating: map[string]map[string]time.Time{}, deleting: map[string]map[string]time.Time{}}
}

func (e *rsExpectations) expect(m map[string]map[string]time.Time, rs, pod string, at time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if m[rs] == nil {
		m[rs] = map[string]time.Time{}
	}
	m[rs][pod] = at
}

// pending returns how many created pods are not in the cache yet and which pods being deleted
// the cache still shows as active; it forgets what the cache has caught up with.
func (e *rsExpectations) pending(rs string, cached map[string]*corev1.Pod, now time.Time) (creating int, deleting map[string]bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for name, at := range e.creating[rs] {
		if _, seen := cached[name]; seen || now.Sub(at) > rsExpectTimeout {
			delete(e.creating[rs], name)
			continue
		}
		creating++
	}
	deleting = map[string]bool{}
	for name, at := range e.deleting[rs] {
		p, seen := cached[name]
		if !seen || p.DeletionTimestamp != nil || isTerminal(p) || now.Sub(at) > rsExpectTimeout {
			delete(e.deleting[rs], name)
			continue
		}
		deleting[name] = true
	}
	return creating, deleting
}

func (e *rsExpectations) forget(rs string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.creating, rs)
	delete(e.deleting, rs)
}

// runReplicaSets runs the ReplicaSet controller until ctx ends.
func (s *Simulator) runReplicaSets(ctx context.Context) error {
	if !cache.WaitForCacheSync(ctx.Done(), s.workloads.rsInformer.HasSynced) {
		return nil
	}
	return s.runWorkers(ctx, "replicaset", s.workloads.rsQueue, 2, s.syncReplicaSet)
}

// isKubeVirtReplicaSet reports the ReplicaSets of KubeVirt's own pods, which controlplane.go
// keeps.
func (s *Simulator) isKubeVirtReplicaSet(rs *appsv1.ReplicaSet) bool {
	return rs.Namespace == s.opts.KubeVirtNamespace && kubevirtReplicaSets[rs.Name] > 0
}

// syncReplicaSet is syncReplicaSet and manageReplicas for one ReplicaSet.
func (s *Simulator) syncReplicaSet(ctx context.Context, key string) error {
	w := s.workloads
	obj, ok, _ := w.rsInformer.GetIndexer().GetByKey(key)
	if !ok {
		w.rsExpect.forget(key)
		return nil
	}
	rs := obj.(*appsv1.ReplicaSet)
	if s.isKubeVirtReplicaSet(rs) || rs.DeletionTimestamp != nil {
		return nil
	}
	sel, err := metav1.LabelSelectorAsSelector(rs.Spec.Selector)
	if err != nil {
		return nil // invalid selector: the real controller gives up on it too
	}
	owned := map[string]*corev1.Pod{}
	for _, p := range s.podsBy(cache.NamespaceIndex, rs.Namespace) {
		if ref := metav1.GetControllerOf(p); ref != nil && ref.UID == rs.UID && sel.Matches(labels.Set(p.Labels)) {
			owned[p.Name] = p
		}
	}
	creating, deleting := w.rsExpect.pending(key, owned, s.clock.Now())
	var active []*corev1.Pod
	for name, p := range owned {
		if p.DeletionTimestamp == nil && !isTerminal(p) && !deleting[name] {
			active = append(active, p)
		}
	}
	want := int(ptrOr(rs.Spec.Replicas, 1))
	var errs []error
	switch diff := len(active) + creating - want; {
	case diff < 0:
		if err := s.ensureServiceAccount(ctx, rs.Namespace); err != nil {
			return err
		}
		for i := 0; i < -diff; i++ {
			name, err := s.createReplicaSetPod(ctx, rs)
			if err != nil {
				errs = append(errs, err)
				break
			}
			w.rsExpect.expect(w.rsExpect.creating, key, name, s.clock.Now())
		}
	case diff > 0 && len(active) > 0:
		for _, p := range podsToDelete(active, min(diff, len(active))) {
			w.rsExpect.expect(w.rsExpect.deleting, key, p.Name, s.clock.Now())
			err := s.Kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &p.UID}})
			if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
				errs = append(errs, fmt.Errorf("replicaset %s: delete pod %s: %w", key, p.Name, err))
			}
		}
	}
	errs = append(errs, s.updateReplicaSetStatus(ctx, rs, active))
	return errors.Join(errs...)
}

// createReplicaSetPod creates one pod from rs's template (controller.GetPodFromTemplate).
func (s *Simulator) createReplicaSetPod(ctx context.Context, rs *appsv1.ReplicaSet) (string, error) {
	t := rs.Spec.Template
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: rs.Name + "-", Namespace: rs.Namespace,
			Labels: t.Labels, Annotations: t.Annotations, Finalizers: t.Finalizers,
			OwnerReferences: []metav1.OwnerReference{*metav1.NewControllerRef(rs, appsv1.SchemeGroupVersion.WithKind("ReplicaSet"))},
		},
		Spec: *t.Spec.DeepCopy(),
	}
	created, err := s.Kube.CoreV1().Pods(rs.Namespace).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		s.event(ctx, rs, corev1.EventTypeWarning, "FailedCreate", fmt.Sprintf("Error creating: %v", err))
		return "", fmt.Errorf("replicaset %s: create pod: %w", keyOf(rs), err)
	}
	s.log.Debug().Str("replicaset", keyOf(rs)).Str("pod", created.Name).Msg("replicaset: created pod")
	s.event(ctx, rs, corev1.EventTypeNormal, "SuccessfulCreate", "Created pod: "+created.Name)
	return created.Name, nil
}

// podsToDelete picks n pods to delete, the least established first (getPodsToDelete's
// ranking, simplified: unscheduled, then not ready, then the youngest).
func podsToDelete(active []*corev1.Pod, n int) []*corev1.Pod {
	ranked := append([]*corev1.Pod(nil), active...)
	rank := func(p *corev1.Pod) int {
		switch {
		case p.Spec.NodeName == "":
			return 0
		case !podReady(p):
			return 1
		}
		return 2
	}
	sort.SliceStable(ranked, func(i, j int) bool {
		if ri, rj := rank(ranked[i]), rank(ranked[j]); ri != rj {
			return ri < rj
		}
		return ranked[j].CreationTimestamp.Before(&ranked[i].CreationTimestamp)
	})
	return ranked[:n]
}

// updateReplicaSetStatus writes calculateStatus's counts when they changed.
func (s *Simulator) updateReplicaSetStatus(ctx context.Context, rs *appsv1.ReplicaSet, active []*corev1.Pod) error {
	st := rs.Status
	st.Replicas = int32(len(active))
	st.FullyLabeledReplicas, st.ReadyReplicas, st.AvailableReplicas = 0, 0, 0
	tmpl := labels.SelectorFromSet(rs.Spec.Template.Labels)
	for _, p := range active {
		if tmpl.Matches(labels.Set(p.Labels)) {
			st.FullyLabeledReplicas++
		}
		if podReady(p) {
			st.ReadyReplicas++
			st.AvailableReplicas++
		}
	}
	st.ObservedGeneration = rs.Generation
	if st.Replicas == rs.Status.Replicas && st.FullyLabeledReplicas == rs.Status.FullyLabeledReplicas &&
		st.ReadyReplicas == rs.Status.ReadyReplicas && st.AvailableReplicas == rs.Status.AvailableReplicas &&
		st.ObservedGeneration == rs.Status.ObservedGeneration {
		return nil
	}
	upd := rs.DeepCopy()
	upd.Status = st
	_, err := s.Kube.AppsV1().ReplicaSets(rs.Namespace).UpdateStatus(ctx, upd, metav1.UpdateOptions{})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("replicaset %s: update status: %w", keyOf(rs), err)
	}
	if apierrors.IsConflict(err) {
		s.workloads.rsQueue.Add(keyOf(rs))
	}
	return nil
}
