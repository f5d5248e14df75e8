package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
)

type assumedPod struct {
	key  string
	node string
	req  resources
}

type schedulerState struct {
	mu            sync.Mutex
	assumed       map[types.UID]assumedPod
	unschedulable map[string]bool
	placements    *placements
	usage         *nodeUsage
}

func newSchedulerState() *schedulerState {
	return &schedulerState{assumed: map[types.UID]assumedPod{}, unschedulable: map[string]bool{}, placements: newPlacements(), usage: newNodeUsage()}
}

// nodeUsage is the requests of the non-terminal pods bound to each node, kept up to date from
// the pod cache's events (as kube-scheduler's cache is), so that scheduling a pod costs the
// number of nodes, not the number of pods.
type nodeUsage struct {
	mu    sync.Mutex
	pods  map[types.UID]podUse
	nodes map[string]resources
}

type podUse struct {
	node string
	req  resources
}

func newNodeUsage() *nodeUsage {
	return &nodeUsage{pods: map[types.UID]podUse{}, nodes: map[string]resources{}}
}

// track follows the pod cache (call it once, before the informer starts); freed is called
// after a pod stopped counting, so that pods waiting for room are tried again.
func (u *nodeUsage) track(inf cache.SharedIndexInformer, freed func()) {
	observe := func(obj interface{}, deleted bool) {
		if u.observe(obj, deleted) {
			freed()
		}
	}
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj interface{}) { observe(obj, false) },
		UpdateFunc: func(_, obj interface{}) { observe(obj, false) },
		DeleteFunc: func(obj interface{}) { observe(obj, true) },
	})
}

// observe accounts for the pod obj; it reports whether a pod that counted stopped counting.
func (u *nodeUsage) observe(obj interface{}, deleted bool) (freed bool) {
	if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj, deleted = d.Obj, true
	}
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return false
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	old, counted := u.pods[p.UID]
	if counted {
		delete(u.pods, p.UID)
		u.nodes[old.node] = u.nodes[old.node].minus(old.req)
	}
	if deleted || p.Spec.NodeName == "" || isTerminal(p) {
		return counted
	}
	use := podUse{node: p.Spec.NodeName, req: podRequests(p)}
	u.pods[p.UID] = use
	u.nodes[use.node] = u.nodes[use.node].plus(use.req)
	return false
}

// nodesChanged moves every unschedulable pod back to the active queue, as
// kube-scheduler does on cluster events that may make them fit.
func (st *schedulerState) nodesChanged(s *Simulator) {
	st.mu.Lock()
	keys := make([]string, 0, len(st.unschedulable))
	for k := range st.unschedulable {
		keys = append(keys, k)
	}
	st.mu.Unlock()
	for _, k := range keys {
		s.schedulerQueue.Add(k)
	}
}

type resources struct {
	cpu, mem int64 // millicores, bytes
	pods     int64
}

func (r resources) plus(o resources) resources {
	return resources{cpu: r.cpu + o.cpu, mem: r.mem + o.mem, pods: r.pods + o.pods}
}

func (r resources) minus(o resources) resources {
	return resources{cpu: r.cpu - o.cpu, mem: r.mem - o.mem, pods: r.pods - o.pods}
}

func podRequests(p *corev1.Pod) resources {
	var r resources
	for _, c := range p.Spec.Containers {
		r.cpu += c.Resources.Requests.Cpu().MilliValue()
		r.mem += c.Resources.Requests.Memory().Value()
	}
	r.pods = 1
	return r
}

func nodeAllocatable(n *corev1.Node) resources {
	a := n.Status.Allocatable
	if a == nil {
		a = n.Status.Capacity
	}
	pods := a.Pods().Value()
	if _, ok := a[corev1.ResourcePods]; !ok {
		pods = 110
	}
	return resources{cpu: a.Cpu().MilliValue(), mem: a.Memory().Value(), pods: pods}
}

// runScheduler plays kube-scheduler for pods whose schedulerName is empty or
// default-scheduler: one pod at a time, honouring spec.unschedulable,
// taints and tolerations, nodeSelector, required node affinity and
// capacity (requests against allocatable). A pod that fits nowhere stays
// Pending with PodScheduled=False, reason Unschedulable.
func (s *Simulator) runScheduler(ctx context.Context) error {
	flushed := make(chan struct{})
	defer func() { <-flushed }()
	go func() {
		defer close(flushed)
		t := s.clock.NewTicker(s.scaled(s.opts.HeartbeatInterval))
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C():
				s.scheduler.nodesChanged(s)
			}
		}
	}()
	return s.runWorkers(ctx, "scheduler", s.schedulerQueue, 1, s.schedule)
}

// nodeUsage returns the requests of the non-terminal pods bound to each node,
// as the scheduler counts them: the cache's, and those of the pods it bound
// that the cache does not show bound yet (its assumed pods).
func (s *Simulator) nodeUsage() map[string]resources {
	st := s.scheduler
	st.mu.Lock()
	defer st.mu.Unlock()
	u := st.usage
	u.mu.Lock()
	defer u.mu.Unlock()
	used := make(map[string]resources, len(u.nodes))
	for n, r := range u.nodes {
		used[n] = r
	}
	for uid, a := range st.assumed {
		if _, seen := u.pods[uid]; seen {
			delete(st.assumed, uid) // the cache caught up
			continue
		}
		if cur := s.getPod(a.key); cur == nil || cur.UID != uid || isTerminal(cur) {
			delete(st.assumed, uid) // gone before the cache showed it bound
			continue
		}
		used[a.node] = used[a.node].plus(a.req)
	}
	return used
}

func (s *Simulator) schedule(ctx context.Context, key string) error {
	p := s.getPod(key)
	forget := func() {
		s.scheduler.mu.Lock()
		delete(s.scheduler.unschedulable, key)
		s.scheduler.mu.Unlock()
	}
	if p == nil || p.Spec.NodeName != "" || p.DeletionTimestamp != nil || isTerminal(p) {
		forget()
		return nil
	}
	if p.Spec.SchedulerName != "" && p.Spec.SchedulerName != schedulerName {
		return nil
	}
	s.scheduler.mu.Lock()
	for uid := range s.scheduler.assumed {
		if uid == p.UID {
			s.scheduler.mu.Unlock()
			return nil // bound, the cache has not caught up yet
		}
	}
	s.scheduler.mu.Unlock()

	used := s.nodeUsage()
	req := podRequests(p)
	reasons := map[string]int{}
	type cand struct {
		name  string
		score float64
	}
	var cands []cand
	nodes := s.nodeInformer.GetStore().List()
	pinned := s.scheduler.placements.pinned(p)
	for _, obj := range nodes {
		n := obj.(*corev1.Node)
		if pinned != "" && n.Name != pinned {
			reasons["node(s) didn't match Pod's node affinity/selector"]++ // a scenario placed it elsewhere
			continue
		}
		if why := fitsNode(p, n, req, used[n.Name]); why != "" {
			reasons[why]++
			continue
		}
		alloc := nodeAllocatable(n)
		u := used[n.Name]
		score := 0.0
		if alloc.cpu > 0 {
			score += float64(alloc.cpu-u.cpu-req.cpu) / float64(alloc.cpu)
		}
		if alloc.mem > 0 {
			score += float64(alloc.mem-u.mem-req.mem) / float64(alloc.mem)
		}
		cands = append(cands, cand{n.Name, score})
	}
	if len(cands) == 0 {
		msg := unschedulableMessage(len(nodes), reasons)
		s.scheduler.mu.Lock()
		s.scheduler.unschedulable[key] = true
		s.scheduler.mu.Unlock()
		return s.markUnschedulable(ctx, p, msg)
	}
	sort.Slice(cands, func(i, j int) bool {
		if cands[i].score != cands[j].score {
			return cands[i].score > cands[j].score
		}
		return cands[i].name < cands[j].name
	})
	target := cands[0].name
	err := s.Kube.CoreV1().Pods(p.Namespace).Bind(ctx, &corev1.Binding{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID},
		Target:     corev1.ObjectReference{Kind: "Node", Name: target},
	}, metav1.CreateOptions{})
	if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
		forget()
		return nil
	}
	if err != nil {
		return fmt.Errorf("bind pod %s to %s: %w", key, target, err)
	}
	if pinned != "" {
		s.scheduler.placements.bound(p, target)
	}
	s.scheduler.mu.Lock()
	s.scheduler.assumed[p.UID] = assumedPod{key: key, node: target, req: req}
	delete(s.scheduler.unschedulable, key)
	s.scheduler.mu.Unlock()
	s.log.Debug().Str("pod", key).Str("node", target).Msg("scheduler: bound")
	s.eventOnce(ctx, p, corev1.EventTypeNormal, "Scheduled", fmt.Sprintf("Successfully assigned %s to %s", key, target))
	return nil
}

func (s *Simulator) markUnschedulable(ctx context.Context, p *corev1.Pod, msg string) error {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable && c.Message == msg {
			return nil
		}
	}
	cond := corev1.PodCondition{Type: corev1.PodScheduled, Status: corev1.ConditionFalse, Reason: corev1.PodReasonUnschedulable, Message: msg, LastTransitionTime: s.now()}
	body, _ := json.Marshal(map[string]any{
		"metadata": map[string]any{"uid": p.UID},
		"status":   map[string]any{"phase": corev1.PodPending, "conditions": []corev1.PodCondition{cond}},
	})
	_, err := s.Kube.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.StrategicMergePatchType, body, metav1.PatchOptions{}, "status")
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("mark pod %s unschedulable: %w", keyOf(p), err)
	}
	s.eventOnce(ctx, p, corev1.EventTypeWarning, "FailedScheduling", msg)
	return nil
}

func unschedulableMessage(total int, reasons map[string]int) string {
	parts := make([]string, 0, len(reasons))
	for r, n := range reasons {
		parts = append(parts, fmt.Sprintf("%d %s", n, r))
	}
	sort.Strings(parts)
	msg := fmt.Sprintf("0/%d nodes are available", total)
	if len(parts) > 0 {
		msg += ": " + strings.Join(parts, ", ")
	}
	return msg + "."
}

// fitsNode returns why p cannot go to n, or "" when it fits.
func fitsNode(p *corev1.Pod, n *corev1.Node, req, used resources) string {
	if n.DeletionTimestamp != nil {
		return "node(s) were being deleted"
	}
	if n.Spec.Unschedulable && !toleratesTaint(p, corev1.Taint{Key: taintUnschedulable, Effect: corev1.TaintEffectNoSchedule}) {
		return "node(s) were unschedulable"
	}
	for _, t := range n.Spec.Taints {
		if t.Effect != corev1.TaintEffectNoSchedule && t.Effect != corev1.TaintEffectNoExecute {
			continue
		}
		if !toleratesTaint(p, t) {
			return fmt.Sprintf("node(s) had untolerated taint {%s: %s}", t.Key, t.Value)
		}
	}
	for k, v := range p.Spec.NodeSelector {
		if n.Labels[k] != v {
			return "node(s) didn't match Pod's node affinity/selector"
		}
	}
	if a := p.Spec.Affinity; a != nil && a.NodeAffinity != nil && a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution != nil {
		if !nodeSelectorMatches(a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution, n) {
			return "node(s) didn't match Pod's node affinity/selector"
		}
	}
	alloc := nodeAllocatable(n)
	switch {
	case used.pods+req.pods > alloc.pods:
		return "Too many pods"
	case used.cpu+req.cpu > alloc.cpu:
		return "Insufficient cpu"
	case used.mem+req.mem > alloc.mem:
		return "Insufficient memory"
	}
	return ""
}

// nodeSelectorMatches: the terms are ORed, the requirements of a term ANDed.
func nodeSelectorMatches(sel *corev1.NodeSelector, n *corev1.Node) bool {
	for _, term := range sel.NodeSelectorTerms {
		if len(term.MatchExpressions) == 0 && len(term.MatchFields) == 0 {
			continue // an empty term matches nothing
		}
		ok := true
		for _, r := range term.MatchExpressions {
			v, has := n.Labels[r.Key]
			if !requirementMatches(r, v, has) {
				ok = false
				break
			}
		}
		for _, r := range term.MatchFields {
			if r.Key != "metadata.name" || !requirementMatches(r, n.Name, true) {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}

func requirementMatches(r corev1.NodeSelectorRequirement, v string, has bool) bool {
	in := func() bool {
		for _, x := range r.Values {
			if x == v {
				return true
			}
		}
		return false
	}
	switch r.Operator {
	case corev1.NodeSelectorOpIn:
		return has && in()
	case corev1.NodeSelectorOpNotIn:
		return !has || !in()
	case corev1.NodeSelectorOpExists:
		return has
	case corev1.NodeSelectorOpDoesNotExist:
		return !has
	case corev1.NodeSelectorOpGt, corev1.NodeSelectorOpLt:
		if !has || len(r.Values) != 1 {
			return false
		}
		a, err1 := strconv.ParseInt(v, 10, 64)
		b, err2 := strconv.ParseInt(r.Values[0], 10, 64)
		if err1 != nil || err2 != nil {
			return false
		}
		if r.Operator == corev1.NodeSelectorOpGt {
			return a > b
		}
		return a < b
	}
	return false
}
