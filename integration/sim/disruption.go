package sim

// kube-controller-manager's disruption controller, the part the Eviction API relies on
// (k8s.io/kubernetes pkg/controller/disruption/disruption.go, v1.34): it writes a
// PodDisruptionBudget's status (currentHealthy, desiredHealthy, expectedPods,
// disruptionsAllowed, disruptedPods, observedGeneration and the DisruptionAllowed condition).
// The API server's eviction handler answers 429 while observedGeneration lags the generation or
// disruptionsAllowed is 0, and takes one disruption per eviction it lets through
// (pkg/registry/core/pod/storage/eviction.go): without this controller every budget blocks
// every eviction forever.
//
// Left out: the scale subresource of arbitrary controllers (a pod controlled by anything but a
// ReplicaSet, Deployment, StatefulSet or ReplicationController makes a percentage or
// maxUnavailable budget fail safe, as a controller without a scale subresource does), events,
// and the clean-up of stale DisruptionTarget pod conditions.

import (
	"context"
	"fmt"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// pdbDeletionTimeout is how long a pod the API server let go (status.disruptedPods) is expected
// to take to be deleted; until then it does not count as healthy (disruption.DeletionTimeout).
const pdbDeletionTimeout = 2 * time.Minute

// workloads holds the informers and queues of the disruption controller and of the ReplicaSet
// controller (replicaset.go).
type workloads struct {
	pdbInformer cache.SharedIndexInformer
	rsInformer  cache.SharedIndexInformer
	pdbQueue    workqueue.TypedRateLimitingInterface[string]
	rsQueue     workqueue.TypedRateLimitingInterface[string]
	rsExpect    *rsExpectations
}

// setupWorkloads registers the informers of the disruption and ReplicaSet controllers with the
// shared factory (before Run starts it) and routes pod events to them.
func (s *Simulator) setupWorkloads() {
	w := &workloads{
		pdbInformer: s.kubeInformers.Policy().V1().PodDisruptionBudgets().Informer(),
		rsInformer:  s.kubeInformers.Apps().V1().ReplicaSets().Informer(),
		pdbQueue:    s.newQueue("sim-disruption"),
		rsQueue:     s.newQueue("sim-replicaset"),
		rsExpect:    newRSExpectations(),
	}
	s.workloads = w
	_, _ = w.pdbInformer.AddEventHandler(handler(func(obj interface{}) {
		if pdb, ok := obj.(*policyv1.PodDisruptionBudget); ok {
			w.pdbQueue.Add(keyOf(pdb))
		}
	}))
	_, _ = w.rsInformer.AddEventHandler(handler(func(obj interface{}) {
		if rs, ok := obj.(*appsv1.ReplicaSet); ok {
			w.rsQueue.Add(keyOf(rs))
		}
	}))
	_, _ = s.podInformer.AddEventHandler(handler(func(obj interface{}) {
		p, ok := obj.(*corev1.Pod)
		if !ok {
			return
		}
		for _, pdb := range s.pdbsForPod(p) {
			w.pdbQueue.Add(keyOf(pdb))
		}
		if ref := metav1.GetControllerOf(p); ref != nil && ref.Kind == "ReplicaSet" {
			w.rsQueue.Add(p.Namespace + "/" + ref.Name)
		}
	}))
}

// pdbsForPod returns the budgets of p's namespace whose selector selects it
// (disruption.go getPdbForPod, without its one-budget limit: every match is resynced).
func (s *Simulator) pdbsForPod(p *corev1.Pod) []*policyv1.PodDisruptionBudget {
	objs, _ := s.workloads.pdbInformer.GetIndexer().ByIndex(cache.NamespaceIndex, p.Namespace)
	var out []*policyv1.PodDisruptionBudget
	for _, o := range objs {
		pdb := o.(*policyv1.PodDisruptionBudget)
		// policy/v1: a nil selector selects nothing, an empty one every pod of the namespace
		sel, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
		if err == nil && sel.Matches(labels.Set(p.Labels)) {
			out = append(out, pdb)
		}
	}
	return out
}

// runDisruption runs the disruption controller until ctx ends.
func (s *Simulator) runDisruption(ctx context.Context) error {
	if !cache.WaitForCacheSync(ctx.Done(), s.workloads.pdbInformer.HasSynced, s.workloads.rsInformer.HasSynced) {
		return nil
	}
	return s.runWorkers(ctx, "disruption", s.workloads.pdbQueue, 2, s.syncPDB)
}

// syncPDB is disruption.go's sync and trySync for one budget.
func (s *Simulator) syncPDB(ctx context.Context, key string) error {
	obj, ok, _ := s.workloads.pdbInformer.GetIndexer().GetByKey(key)
	if !ok {
		return nil
	}
	pdb := obj.(*policyv1.PodDisruptionBudget)
	pods, err := s.podsForPDB(pdb)
	var st policyv1.PodDisruptionBudgetStatus
	var recheck time.Duration
	if err == nil {
		st, recheck, err = pdbStatus(pdb, pods, s.controllerScale(ctx), s.clock.Now(), s.scaled(pdbDeletionTimeout))
	}
	if err != nil {
		// failSafe: at least stop the API server from approving evictions.
		s.log.Warn().Err(err).Str("pdb", key).Msg("disruption: sync failed, no disruption allowed")
		st = *pdb.Status.DeepCopy()
		st.DisruptionsAllowed = 0
		apimeta.SetStatusCondition(&st.Conditions, metav1.Condition{
			Type: policyv1.DisruptionAllowedCondition, Status: metav1.ConditionFalse,
			Reason: policyv1.SyncFailedReason, Message: err.Error(), ObservedGeneration: st.ObservedGeneration,
		})
	}
	if recheck > 0 {
		s.workloads.pdbQueue.AddAfter(key, recheck)
	}
	if pdbStatusEqual(pdb.Status, st) {
		return nil
	}
	upd := pdb.DeepCopy()
	upd.Status = st
	_, uerr := s.Kube.PolicyV1().PodDisruptionBudgets(pdb.Namespace).UpdateStatus(ctx, upd, metav1.UpdateOptions{})
	if apierrors.IsNotFound(uerr) {
		return nil
	}
	if uerr != nil {
		return fmt.Errorf("disruption: update status of pdb %s: %w", key, uerr)
	}
	s.log.Debug().Str("pdb", key).Int32("currentHealthy", st.CurrentHealthy).Int32("desiredHealthy", st.DesiredHealthy).
		Int32("expectedPods", st.ExpectedPods).Int32("disruptionsAllowed", st.DisruptionsAllowed).Msg("disruption: status")
	return nil
}

func (s *Simulator) podsForPDB(pdb *policyv1.PodDisruptionBudget) ([]*corev1.Pod, error) {
	sel, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
	if err != nil {
		return nil, fmt.Errorf("pdb %s: selector: %w", keyOf(pdb), err)
	}
	var out []*corev1.Pod
	for _, p := range s.podsBy(cache.NamespaceIndex, pdb.Namespace) {
		if sel.Matches(labels.Set(p.Labels)) {
			out = append(out, p)
		}
	}
	return out, nil
}

// scaleOf returns the replicas of the controller ref names (in namespace ns) and its UID, ok
// false when there is no such controller.
type scaleOf func(ns string, ref *metav1.OwnerReference) (uid types.UID, replicas int32, ok bool, err error)

// controllerScale finds a pod's controller as disruption.go's finders do: a ReplicaSet (from the
// cache), the Deployment of a ReplicaSet it controls, a StatefulSet, a ReplicationController.
func (s *Simulator) controllerScale(ctx context.Context) scaleOf {
	return func(ns string, ref *metav1.OwnerReference) (types.UID, int32, bool, error) {
		get := func(err error, uid types.UID, replicas *int32) (types.UID, int32, bool, error) {
			if apierrors.IsNotFound(err) || (err == nil && uid != ref.UID) {
				return "", 0, false, nil
			}
			if err != nil {
				return "", 0, false, fmt.Errorf("get %s %s/%s: %w", ref.Kind, ns, ref.Name, err)
			}
			return uid, ptrOr(replicas, 1), true, nil
		}
		switch ref.Kind {
		case "ReplicaSet":
			obj, ok, _ := s.workloads.rsInformer.GetIndexer().GetByKey(ns + "/" + ref.Name)
			if !ok {
				return "", 0, false, nil
			}
			rs := obj.(*appsv1.ReplicaSet)
			if rs.UID != ref.UID {
				return "", 0, false, nil
			}
			if dref := metav1.GetControllerOf(rs); dref != nil && dref.Kind == "Deployment" {
				d, err := s.Kube.AppsV1().Deployments(ns).Get(ctx, dref.Name, metav1.GetOptions{})
				if err != nil {
					return get(err, "", nil)
				}
				if d.UID != dref.UID {
					return "", 0, false, nil
				}
				return d.UID, ptrOr(d.Spec.Replicas, 1), true, nil
			}
			return rs.UID, ptrOr(rs.Spec.Replicas, 1), true, nil
		case "StatefulSet":
			ss, err := s.Kube.AppsV1().StatefulSets(ns).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				return get(err, "", nil)
			}
			return get(nil, ss.UID, ss.Spec.Replicas)
		case "ReplicationController":
			rc, err := s.Kube.CoreV1().ReplicationControllers(ns).Get(ctx, ref.Name, metav1.GetOptions{})
			if err != nil {
				return get(err, "", nil)
			}
			return get(nil, rc.UID, rc.Spec.Replicas)
		}
		return "", 0, false, nil
	}
}

func ptrOr(p *int32, def int32) int32 {
	if p == nil {
		return def
	}
	return *p
}

// pdbStatus computes a budget's status from the pods its selector selects, as trySync does
// (getExpectedPodCount, buildDisruptedPodMap, countHealthyPods, updatePdbStatus). It also
// returns when to look again (a disrupted pod's deletion deadline), 0 for never. An error
// (a pod whose controller cannot be found) means the caller must fail safe.
func pdbStatus(pdb *policyv1.PodDisruptionBudget, pods []*corev1.Pod, scale scaleOf, now time.Time, deletionTimeout time.Duration) (policyv1.PodDisruptionBudgetStatus, time.Duration, error) {
	expected, desired, err := pdbExpectedPods(pdb, pods, scale)
	if err != nil {
		return policyv1.PodDisruptionBudgetStatus{}, 0, err
	}
	// buildDisruptedPodMap: keep the pods the API server let go that are neither deleted nor
	// overdue.
	disrupted := map[string]metav1.Time{}
	var recheck time.Duration
	for _, p := range pods {
		at, found := pdb.Status.DisruptedPods[p.Name]
		if p.DeletionTimestamp != nil || !found {
			continue
		}
		deadline := at.Add(deletionTimeout)
		if deadline.Before(now) {
			continue // expected to be deleted but was not: healthy again
		}
		disrupted[p.Name] = at
		if wait := deadline.Sub(now); recheck == 0 || wait < recheck {
			recheck = wait
		}
	}
	// countHealthyPods
	var healthy int32
	for _, p := range pods {
		if p.DeletionTimestamp != nil {
			continue
		}
		if at, found := disrupted[p.Name]; found && at.Add(deletionTimeout).After(now) {
			continue
		}
		if podReady(p) {
			healthy++
		}
	}
	// updatePdbStatus: no disruption while no pod is expected, so that a budget whose pods
	// have not appeared yet is safe.
	allowed := healthy - desired
	if expected <= 0 || allowed <= 0 {
		allowed = 0
	}
	st := policyv1.PodDisruptionBudgetStatus{
		CurrentHealthy: healthy, DesiredHealthy: desired, ExpectedPods: expected, DisruptionsAllowed: allowed,
		ObservedGeneration: pdb.Generation, Conditions: append([]metav1.Condition(nil), pdb.Status.Conditions...),
	}
	if len(disrupted) > 0 {
		st.DisruptedPods = disrupted
	}
	// poddisruptionbudget.UpdateDisruptionAllowedCondition (k8s.io/component-helpers)
	cond := metav1.Condition{Type: policyv1.DisruptionAllowedCondition, Status: metav1.ConditionFalse,
		Reason: policyv1.InsufficientPodsReason, ObservedGeneration: st.ObservedGeneration}
	if allowed > 0 {
		cond.Status, cond.Reason = metav1.ConditionTrue, policyv1.SufficientPodsReason
	}
	apimeta.SetStatusCondition(&st.Conditions, cond)
	return st, recheck, nil
}

// pdbExpectedPods is getExpectedPodCount: an integer minAvailable counts the selected pods; a
// percentage, or maxUnavailable, counts the scale of their controllers (pods without one are
// left out, as the unmanaged pods the real controller warns about).
func pdbExpectedPods(pdb *policyv1.PodDisruptionBudget, pods []*corev1.Pod, scale scaleOf) (expected, desired int32, err error) {
	switch {
	case pdb.Spec.MaxUnavailable != nil:
		if expected, err = pdbExpectedScale(pods, scale); err != nil {
			return 0, 0, err
		}
		maxUnavailable, err := intstr.GetScaledValueFromIntOrPercent(pdb.Spec.MaxUnavailable, int(expected), true)
		if err != nil {
			return 0, 0, fmt.Errorf("pdb %s: maxUnavailable: %w", keyOf(pdb), err)
		}
		return expected, max(expected-int32(maxUnavailable), 0), nil
	case pdb.Spec.MinAvailable != nil && pdb.Spec.MinAvailable.Type == intstr.Int:
		return int32(len(pods)), pdb.Spec.MinAvailable.IntVal, nil
	case pdb.Spec.MinAvailable != nil:
		if expected, err = pdbExpectedScale(pods, scale); err != nil {
			return 0, 0, err
		}
		minAvailable, err := intstr.GetScaledValueFromIntOrPercent(pdb.Spec.MinAvailable, int(expected), true)
		if err != nil {
			return 0, 0, fmt.Errorf("pdb %s: minAvailable: %w", keyOf(pdb), err)
		}
		return expected, int32(minAvailable), nil
	}
	return 0, 0, nil
}

// pdbExpectedScale is getExpectedScale: the sum of the replicas of the pods' controllers.
func pdbExpectedScale(pods []*corev1.Pod, scale scaleOf) (int32, error) {
	seen := map[types.UID]int32{}
	for _, p := range pods {
		ref := metav1.GetControllerOf(p)
		if ref == nil {
			continue
		}
		if _, ok := seen[ref.UID]; ok {
			continue
		}
		uid, replicas, ok, err := scale(p.Namespace, ref)
		if err != nil {
			return 0, err
		}
		if !ok {
			return 0, fmt.Errorf("found no controllers for pod %q", p.Name)
		}
		seen[uid] = replicas
	}
	var sum int32
	for _, r := range seen {
		sum += r
	}
	return sum, nil
}

func pdbStatusEqual(a, b policyv1.PodDisruptionBudgetStatus) bool {
	if a.CurrentHealthy != b.CurrentHealthy || a.DesiredHealthy != b.DesiredHealthy || a.ExpectedPods != b.ExpectedPods ||
		a.DisruptionsAllowed != b.DisruptionsAllowed || a.ObservedGeneration != b.ObservedGeneration || len(a.DisruptedPods) != len(b.DisruptedPods) {
		return false
	}
	for k, v := range a.DisruptedPods {
		if w, ok := b.DisruptedPods[k]; !ok || !v.Equal(&w) {
			return false
		}
	}
	return conditionsEqual(a.Conditions, b.Conditions)
}
