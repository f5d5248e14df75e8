package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

// nodeSim is the ground truth of one node.
type nodeSim struct {
	phase      NodeState
	since      time.Time
	bootID     int
	rebootDone bool // a FaultReboot was carried out; waiting for the annotation to go
}

type nodeStates struct {
	mu    sync.Mutex
	m     map[string]*nodeSim
	locks sync.Map // node name -> *sync.Mutex
}

func newNodeStates() *nodeStates { return &nodeStates{m: map[string]*nodeSim{}} }

// lock serialises what happens on one node: its hardware changing state
// and its kubelet acting, so a kubelet never acts on a node that went down
// halfway through its sync. It returns the unlock func.
func (n *nodeStates) lock(name string) func() {
	l, _ := n.locks.LoadOrStore(name, &sync.Mutex{})
	mu := l.(*sync.Mutex)
	mu.Lock()
	return mu.Unlock
}

func (n *nodeStates) get(name string) nodeSim {
	n.mu.Lock()
	defer n.mu.Unlock()
	if st, ok := n.m[name]; ok {
		return *st
	}
	return nodeSim{phase: NodeHealthy}
}

func (n *nodeStates) snapshot() map[string]NodeState {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := make(map[string]NodeState, len(n.m))
	for k, v := range n.m {
		out[k] = v.phase
	}
	return out
}

// kubeletAlive: the node's kubelet (and virt-handler) can act through the API.
func (n *nodeStates) kubeletAlive(name string) bool {
	p := n.get(name).phase
	return p == NodeHealthy || p == NodeBooting
}

// NodeState returns the ground truth of node name (NodeHealthy for a node
// the simulator has not seen yet).
func (s *Simulator) NodeState(name string) NodeState { return s.nodes.get(name).phase }

func (s *Simulator) runNodes(ctx context.Context) error {
	return s.runWorkers(ctx, "node", s.nodeQueue, 2, s.syncNode)
}

func watchdogTimeout(n *corev1.Node) time.Duration {
	v := n.Labels[LabelWatchdogTimeout]
	if v == "" {
		return 0
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0
	}
	return d
}

// syncNode runs a node's fault state machine (the node's hardware and its
// watchdog) and, while the kubelet is alive, posts its Ready condition.
func (s *Simulator) syncNode(ctx context.Context, name string) error {
	defer s.nodes.lock(name)()
	node := s.getNode(name)
	if node == nil {
		s.nodes.mu.Lock()
		delete(s.nodes.m, name)
		s.nodes.mu.Unlock()
		return nil
	}
	now := s.clock.Now()
	fault := node.Annotations[AnnotationFault]
	log := s.log.With().Str("node", name).Logger()

	s.nodes.mu.Lock()
	st, seen := s.nodes.m[name]
	if !seen {
		st = &nodeSim{phase: NodeHealthy, since: now}
		s.nodes.m[name] = st
	}
	prev := st.phase
	set := func(p NodeState) {
		st.phase = p
		st.since = now
	}
	boot := func() {
		st.bootID++
		set(NodeBooting)
	}
	var kill, removeRebootAnnotation bool
	var after time.Duration
	elapsed := now.Sub(st.since)
	if fault == FaultReboot && st.rebootDone {
		fault = ""
	}
	if fault != FaultReboot {
		st.rebootDone = false
	}
	switch fault {
	case FaultDown:
		if st.phase != NodeDown {
			kill = true
			set(NodeDown)
		}
	case FaultPartitioned:
		wd := watchdogTimeout(node)
		switch st.phase {
		case NodeHealthy, NodeBooting:
			set(NodePartitioned)
			if wd > 0 {
				after = s.scaled(wd)
			}
		case NodeDown, NodeRebooting:
			set(NodeFenced)
		case NodePartitioned:
			if wd > 0 {
				if s.scaled(wd) <= elapsed {
					kill = true
					set(NodeFenced)
					log.Info().Dur("watchdog", wd).Msg("watchdog fired: node fenced itself by rebooting")
				} else {
					after = s.scaled(wd) - elapsed
				}
			}
		}
	case FaultReboot:
		if st.phase == NodeRebooting {
			if s.scaled(s.opts.RebootDuration) <= elapsed {
				boot()
				st.rebootDone = true
				removeRebootAnnotation = true
				after = s.scaled(s.opts.KubeletStartupDuration)
			} else {
				after = s.scaled(s.opts.RebootDuration) - elapsed
			}
		} else {
			kill = true
			set(NodeRebooting)
			after = s.scaled(s.opts.RebootDuration)
		}
	default:
		if fault != "" {
			log.Warn().Str("fault", fault).Msg("unknown fault annotation, treating the node as healthy")
		}
		switch st.phase {
		case NodeDown, NodeFenced, NodeRebooting:
			boot()
			after = s.scaled(s.opts.KubeletStartupDuration)
		case NodePartitioned:
			set(NodeHealthy)
		case NodeBooting:
			if s.scaled(s.opts.KubeletStartupDuration) <= elapsed {
				set(NodeHealthy)
			} else {
				after = s.scaled(s.opts.KubeletStartupDuration) - elapsed
			}
		}
	}
	phase := st.phase
	s.nodes.mu.Unlock()

	if kill {
		n := s.truth.killNode(name)
		log.Info().Int("guests", n).Str("state", string(phase)).Msg("node lost its guests")
	}
	if phase != prev {
		log.Info().Str("from", string(prev)).Str("to", string(phase)).Msg("node state changed")
		s.kubeletQueue.Add(name)
		s.enqueueMigrationsAll()
		for _, obj := range s.vmisOnNode(name) {
			s.vmiQueue.Add(keyOf(obj))
		}
	}
	if after > 0 {
		s.nodeQueue.AddAfter(name, after)
	}
	if removeRebootAnnotation {
		patch := []byte(fmt.Sprintf(`{"metadata":{"annotations":{%q:null}}}`, AnnotationFault))
		if _, err := s.Kube.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("node %s: remove reboot annotation: %w", name, err)
		}
	}
	if node.Annotations[AnnotationNodeState] != string(phase) {
		patch := []byte(fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}}}`, AnnotationNodeState, phase))
		if _, err := s.Kube.CoreV1().Nodes().Patch(ctx, name, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("node %s: annotate state: %w", name, err)
		}
	}
	if phase == NodeHealthy || phase == NodeBooting {
		if phase != prev || !seen { // a kubelet that (re)starts renews its lease at once
			if err := s.renewLease(ctx, name); err != nil {
				return err
			}
		}
		return s.postNodeReady(ctx, node, phase == NodeHealthy)
	}
	return nil
}

// postNodeReady is the kubelet posting its Ready condition when it changed.
func (s *Simulator) postNodeReady(ctx context.Context, node *corev1.Node, ready bool) error {
	want := corev1.NodeCondition{
		Type:    corev1.NodeReady,
		Status:  corev1.ConditionTrue,
		Reason:  "KubeletReady",
		Message: "kubelet is posting ready status",
	}
	if !ready {
		want.Status = corev1.ConditionFalse
		want.Reason = "KubeletNotReady"
		want.Message = "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady"
	}
	if c := nodeCondition(node, corev1.NodeReady); c != nil && c.Status == want.Status && c.Reason == want.Reason {
		return nil
	}
	now := s.now()
	want.LastHeartbeatTime = now
	want.LastTransitionTime = now
	conds := []corev1.NodeCondition{want}
	for _, t := range []corev1.NodeConditionType{corev1.NodeMemoryPressure, corev1.NodeDiskPressure, corev1.NodePIDPressure} {
		conds = append(conds, corev1.NodeCondition{Type: t, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficient" + string(t)[:len(t)-len("Pressure")], LastHeartbeatTime: now, LastTransitionTime: now})
	}
	return s.patchNodeConditions(ctx, node.Name, conds)
}

func (s *Simulator) patchNodeConditions(ctx context.Context, name string, conds []corev1.NodeCondition) error {
	body, err := json.Marshal(map[string]any{"status": map[string]any{"conditions": conds}})
	if err != nil {
		return err
	}
	if _, err := s.Kube.CoreV1().Nodes().PatchStatus(ctx, name, body); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("node %s: patch conditions: %w", name, err)
	}
	return nil
}

func nodeCondition(n *corev1.Node, t corev1.NodeConditionType) *corev1.NodeCondition {
	for i := range n.Status.Conditions {
		if n.Status.Conditions[i].Type == t {
			return &n.Status.Conditions[i]
		}
	}
	return nil
}

// runHeartbeats renews the Lease of every node whose kubelet is alive.
func (s *Simulator) runHeartbeats(ctx context.Context) error {
	t := s.clock.NewTicker(s.scaled(s.opts.HeartbeatInterval))
	defer t.Stop()
	for {
		// every kubelet beats on its own: one slow call must not delay the others
		var wg sync.WaitGroup
		for _, name := range s.nodeNames() {
			if !s.nodes.kubeletAlive(name) {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := s.renewLease(ctx, name); err != nil && ctx.Err() == nil {
					s.log.Debug().Err(err).Str("node", name).Msg("renew lease")
				}
			}()
		}
		wg.Wait()
		select {
		case <-ctx.Done():
			return nil
		case <-t.C():
		}
	}
}

func (s *Simulator) renewLease(ctx context.Context, name string) error {
	now := metav1.NewMicroTime(s.clock.Now())
	leases := s.Kube.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	if cached := s.getLease(name); cached != nil {
		// the common case: one write, no read
		l := cached.DeepCopy()
		l.Spec.RenewTime = &now
		if _, err := leases.Update(ctx, l, metav1.UpdateOptions{}); err == nil {
			return nil
		}
	}
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		l, err := leases.Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			node := s.getNode(name)
			l = &coordinationv1.Lease{
				ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: corev1.NamespaceNodeLease},
				Spec: coordinationv1.LeaseSpec{
					HolderIdentity:       ptr.To(name),
					LeaseDurationSeconds: ptr.To(int32(40)), // the kubelet's nodeLeaseDurationSeconds
					RenewTime:            &now,
				},
			}
			if node != nil {
				l.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: name, UID: node.UID}}
			}
			_, err = leases.Create(ctx, l, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				return apierrors.NewConflict(coordinationv1.Resource("leases"), name, err)
			}
			return err
		}
		if err != nil {
			return err
		}
		l.Spec.RenewTime = &now
		_, err = leases.Update(ctx, l, metav1.UpdateOptions{})
		return err
	})
}

// lifecycleProbe is what the node lifecycle controller last saw of a node's
// heartbeat, and when (by its own clock, as the real one does).
type lifecycleProbe struct {
	renew    time.Time
	observed time.Time
}

// runNodeLifecycle plays kube-controller-manager's node lifecycle controller
// (Ready=Unknown and the unreachable/not-ready taints after the grace
// period, pods marked not ready), its taint-based eviction, and pod GC
// (pods of out-of-service or deleted nodes).
func (s *Simulator) runNodeLifecycle(ctx context.Context) error {
	t := s.clock.NewTicker(s.scaled(s.opts.NodeMonitorPeriod))
	defer t.Stop()
	probes := map[string]*lifecycleProbe{}
	for {
		s.monitorNodes(ctx, probes)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C():
		}
	}
}

func (s *Simulator) monitorNodes(ctx context.Context, probes map[string]*lifecycleProbe) {
	now := s.clock.Now()
	grace := s.scaled(s.opts.NodeMonitorGracePeriod)
	names := map[string]bool{}
	for _, obj := range s.nodeInformer.GetStore().List() {
		node := obj.(*corev1.Node)
		names[node.Name] = true
		p := probes[node.Name]
		if p == nil {
			p = &lifecycleProbe{observed: now}
			probes[node.Name] = p
		}
		if l := s.getLease(node.Name); l != nil && l.Spec.RenewTime != nil && !l.Spec.RenewTime.Time.Equal(p.renew) {
			p.renew = l.Spec.RenewTime.Time
			p.observed = now
		}
		if err := s.monitorNode(ctx, node, now.Sub(p.observed) > grace); err != nil && ctx.Err() == nil {
			s.log.Debug().Err(err).Str("node", node.Name).Msg("node lifecycle")
		}
	}
	for name := range probes {
		if !names[name] {
			delete(probes, name)
		}
	}
	// pod GC: pods bound to nodes that no longer exist
	for _, key := range s.podInformer.GetIndexer().ListIndexFuncValues(byNode) {
		if names[key] {
			continue
		}
		for _, p := range s.podsBy(byNode, key) {
			s.forceDeletePod(ctx, p, "pod GC: node deleted")
		}
	}
}

func (s *Simulator) monitorNode(ctx context.Context, node *corev1.Node, stale bool) error {
	ready := nodeCondition(node, corev1.NodeReady)
	if stale && (ready == nil || ready.Status != corev1.ConditionUnknown) {
		now := s.now()
		var conds []corev1.NodeCondition
		for _, c := range node.Status.Conditions {
			c.Status = corev1.ConditionUnknown
			c.Reason = "NodeStatusUnknown"
			c.Message = "Kubelet stopped posting node status."
			c.LastTransitionTime = now
			conds = append(conds, c)
		}
		if len(conds) == 0 {
			conds = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionUnknown, Reason: "NodeStatusNeverUpdated", Message: "Kubelet never posted node status.", LastTransitionTime: now}}
		}
		if err := s.patchNodeConditions(ctx, node.Name, conds); err != nil {
			return err
		}
		s.log.Info().Str("node", node.Name).Msg("node lifecycle: no heartbeat within the grace period, Ready=Unknown")
		// taint in the same pass, as the real controller does, so the
		// scheduler stops placing pods there at once
		if err := s.syncConditionTaints(ctx, node, corev1.ConditionUnknown); err != nil {
			return err
		}
		for _, p := range s.podsBy(byNode, node.Name) {
			s.markPodNotReady(ctx, p)
		}
		return nil
	}
	status := corev1.ConditionUnknown
	if ready != nil {
		status = ready.Status
	}
	if err := s.syncConditionTaints(ctx, node, status); err != nil {
		return err
	}
	if status != corev1.ConditionTrue {
		// Pods on a node that is not Ready are not Ready either (MarkPodsNotReady, on the
		// node's transition and for every pod that shows up there); endpoints drop them.
		for _, p := range s.podsBy(byNode, node.Name) {
			s.markPodNotReady(ctx, p)
		}
	}
	s.evictNoExecute(ctx, node)
	if hasTaint(node, taintOutOfService, "") && status != corev1.ConditionTrue {
		for _, p := range s.podsBy(byNode, node.Name) {
			if !toleratesTaint(p, corev1.Taint{Key: taintOutOfService, Effect: corev1.TaintEffectNoExecute}) {
				s.forceDeletePod(ctx, p, "pod GC: node out of service")
			}
		}
		s.volumeQueue.Add(volumeNodeKey(node.Name))
	}
	return nil
}

// syncConditionTaints keeps the not-ready/unreachable taints in line with
// the Ready condition, as TaintNodesByCondition and taint-based eviction do.
func (s *Simulator) syncConditionTaints(ctx context.Context, node *corev1.Node, status corev1.ConditionStatus) error {
	want := map[string]bool{}
	switch status {
	case corev1.ConditionUnknown:
		want[taintUnreachable] = true
	case corev1.ConditionFalse:
		want[taintNotReady] = true
	}
	ok := true
	for _, key := range []string{taintUnreachable, taintNotReady} {
		for _, eff := range []corev1.TaintEffect{corev1.TaintEffectNoSchedule, corev1.TaintEffectNoExecute} {
			if hasTaint(node, key, eff) != want[key] {
				ok = false
			}
		}
	}
	if ok {
		return nil
	}
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := s.Kube.CoreV1().Nodes().Get(ctx, node.Name, metav1.GetOptions{})
		if err != nil {
			if apierrors.IsNotFound(err) {
				return nil
			}
			return err
		}
		var taints []corev1.Taint
		for _, t := range n.Spec.Taints {
			if t.Key == taintUnreachable || t.Key == taintNotReady {
				if want[t.Key] {
					taints = append(taints, t)
				}
				continue
			}
			taints = append(taints, t)
		}
		now := metav1.NewTime(s.clock.Now())
		for key := range want {
			for _, eff := range []corev1.TaintEffect{corev1.TaintEffectNoSchedule, corev1.TaintEffectNoExecute} {
				if !hasTaint(n, key, eff) {
					t := corev1.Taint{Key: key, Effect: eff}
					if eff == corev1.TaintEffectNoExecute {
						t.TimeAdded = &now
					}
					taints = append(taints, t)
				}
			}
		}
		n.Spec.Taints = taints
		_, err = s.Kube.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		return err
	})
}

func hasTaint(n *corev1.Node, key string, eff corev1.TaintEffect) bool {
	for _, t := range n.Spec.Taints {
		if t.Key == key && (eff == "" || t.Effect == eff) {
			return true
		}
	}
	return false
}

func toleratesTaint(p *corev1.Pod, t corev1.Taint) bool {
	for i := range p.Spec.Tolerations {
		if p.Spec.Tolerations[i].ToleratesTaint(&t) {
			return true
		}
	}
	return false
}

// evictNoExecute deletes (gracefully) the pods on node that do not tolerate
// one of its NoExecute taints, at once or after their tolerationSeconds.
func (s *Simulator) evictNoExecute(ctx context.Context, node *corev1.Node) {
	var noExec []corev1.Taint
	for _, t := range node.Spec.Taints {
		if t.Effect == corev1.TaintEffectNoExecute {
			noExec = append(noExec, t)
		}
	}
	if len(noExec) == 0 {
		return
	}
	now := s.clock.Now()
	for _, p := range s.podsBy(byNode, node.Name) {
		if p.DeletionTimestamp != nil || isTerminal(p) {
			continue
		}
		evictAt := time.Time{}
		evict := false
		for _, t := range noExec {
			var tol *corev1.Toleration
			for i := range p.Spec.Tolerations {
				if p.Spec.Tolerations[i].ToleratesTaint(&t) {
					tol = &p.Spec.Tolerations[i]
					break
				}
			}
			if tol == nil {
				evict, evictAt = true, now
				break
			}
			if tol.TolerationSeconds != nil {
				added := now
				if t.TimeAdded != nil {
					added = t.TimeAdded.Time
				}
				at := added.Add(s.scaled(time.Duration(*tol.TolerationSeconds) * time.Second))
				if !evict || at.Before(evictAt) {
					evict, evictAt = true, at
				}
			}
		}
		if !evict || evictAt.After(now) {
			continue
		}
		s.log.Info().Str("pod", keyOf(p)).Str("node", node.Name).Msg("taint eviction: deleting pod")
		err := s.Kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &p.UID}})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			s.log.Debug().Err(err).Str("pod", keyOf(p)).Msg("taint eviction")
		}
	}
}

func (s *Simulator) forceDeletePod(ctx context.Context, p *corev1.Pod, why string) {
	s.log.Info().Str("pod", keyOf(p)).Str("node", p.Spec.NodeName).Msg(why)
	err := s.Kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0)), Preconditions: &metav1.Preconditions{UID: &p.UID}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		s.log.Debug().Err(err).Str("pod", keyOf(p)).Msg("force delete")
	}
}

func (s *Simulator) markPodNotReady(ctx context.Context, p *corev1.Pod) {
	if isTerminal(p) {
		return
	}
	changed := false
	conds := append([]corev1.PodCondition(nil), p.Status.Conditions...)
	for i := range conds {
		if (conds[i].Type == corev1.PodReady || conds[i].Type == corev1.ContainersReady) && conds[i].Status == corev1.ConditionTrue {
			conds[i].Status = corev1.ConditionFalse
			conds[i].LastTransitionTime = s.now()
			changed = true
		}
	}
	if !changed {
		return
	}
	body, _ := json.Marshal(map[string]any{"status": map[string]any{"conditions": conds}})
	if _, err := s.Kube.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.StrategicMergePatchType, body, metav1.PatchOptions{}, "status"); err != nil && !apierrors.IsNotFound(err) {
		s.log.Debug().Err(err).Str("pod", keyOf(p)).Msg("mark pod not ready")
	}
}

// runVirtHandlerHeartbeats plays virt-handler's node heartbeat (the
// kubevirt.io/heartbeat annotation and kubevirt.io/schedulable=true on a
// live node) and virt-controller's node controller
// (pkg/virt-controller/watch/node/node.go), while virt-controller runs: once
// the heartbeat is older than VirtHandlerUnresponsiveAfter it marks the node
// schedulable=false and fails the VMIs there that have no live launcher pod
// (reason NodeUnresponsive).
func (s *Simulator) runVirtHandlerHeartbeats(ctx context.Context) error {
	t := s.clock.NewTicker(s.scaled(s.opts.VirtHandlerHeartbeatInterval))
	defer t.Stop()
	check := s.clock.NewTicker(s.scaled(s.opts.NodeMonitorPeriod))
	defer check.Stop()
	beat := true
	for {
		now := s.clock.Now()
		ctrl := s.virtControllerActive()
		for _, obj := range s.nodeInformer.GetStore().List() {
			node := obj.(*corev1.Node)
			var labels, annotations map[string]any
			_, started := node.Annotations[kvv1.VirtHandlerHeartbeat]
			unresponsive := false
			if (beat || !started) && s.nodes.kubeletAlive(node.Name) { // a new virt-handler beats at once
				annotations = map[string]any{kvv1.VirtHandlerHeartbeat: now.UTC().Format(time.RFC3339)}
				if node.Labels[kvv1.NodeSchedulable] != "true" {
					labels = map[string]any{kvv1.NodeSchedulable: "true"}
				}
			} else if hb, err := time.Parse(time.RFC3339, node.Annotations[kvv1.VirtHandlerHeartbeat]); err == nil && ctrl &&
				now.Sub(hb) > s.scaled(s.opts.VirtHandlerUnresponsiveAfter) {
				unresponsive = true
				if node.Labels[kvv1.NodeSchedulable] == "true" {
					labels = map[string]any{kvv1.NodeSchedulable: "false"}
					s.log.Info().Str("node", node.Name).Msg("virt-controller: virt-handler heartbeat stale, node unschedulable for VMIs")
				}
			}
			if unresponsive {
				s.failUnresponsiveNodeVMIs(ctx, node.Name)
			}
			if labels == nil && annotations == nil {
				continue
			}
			meta := map[string]any{}
			if labels != nil {
				meta["labels"] = labels
			}
			if annotations != nil {
				meta["annotations"] = annotations
			}
			body, _ := json.Marshal(map[string]any{"metadata": meta})
			if _, err := s.Kube.CoreV1().Nodes().Patch(ctx, node.Name, types.MergePatchType, body, metav1.PatchOptions{}); err != nil && !apierrors.IsNotFound(err) && ctx.Err() == nil {
				s.log.Debug().Err(err).Str("node", node.Name).Msg("virt-handler heartbeat")
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C():
			beat = true
		case <-check.C():
			beat = false
		}
	}
}

// failUnresponsiveNodeVMIs is the node controller's checkNodeForOrphanedAndErroredVMIs: the
// VMIs on a node whose virt-handler stopped answering, that have no live launcher pod there
// (none, or only finished ones), are Failed with reason NodeUnresponsive.
func (s *Simulator) failUnresponsiveNodeVMIs(ctx context.Context, node string) {
	alive := map[string]bool{} // VMI UIDs with a live launcher pod on node
	for _, p := range s.podsBy(byNode, node) {
		if isLauncher(p) && !isTerminal(p) && !allContainersTerminated(p) {
			alive[p.Labels[kvv1.CreatedByLabel]] = true
		}
	}
	for _, vmi := range s.vmisOnNode(node) {
		if vmiFinal(vmi) || alive[string(vmi.UID)] {
			continue
		}
		uid, phase := vmi.UID, vmi.Status.Phase
		now := s.now()
		_, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, func(v *kvv1.VirtualMachineInstance) bool {
			if v.UID != uid || v.Status.Phase != phase || v.Status.NodeName != node {
				return false
			}
			setVMIPhase(v, kvv1.Failed, now)
			v.Status.Reason = nodeUnresponsiveReason
			return true
		})
		if err != nil {
			s.log.Debug().Err(err).Str("vmi", keyOf(vmi)).Msg("node controller: fail vmi of unresponsive node")
			continue
		}
		s.log.Info().Str("vmi", keyOf(vmi)).Str("node", node).Msg("virt-controller: virt-handler is not responsive, VMI Failed (NodeUnresponsive)")
	}
}

// allContainersTerminated: a pod stuck terminating whose containers all ended is not alive
// for virt-controller's node controller.
func allContainersTerminated(p *corev1.Pod) bool {
	if len(p.Status.ContainerStatuses) == 0 {
		return false
	}
	for _, c := range p.Status.ContainerStatuses {
		if c.State.Terminated == nil {
			return false
		}
	}
	return true
}

func (s *Simulator) vmisOnNode(node string) []*kvv1.VirtualMachineInstance {
	objs, _ := s.vmiInformer.GetIndexer().ByIndex(byVMINode, node)
	out := make([]*kvv1.VirtualMachineInstance, 0, len(objs))
	for _, o := range objs {
		out = append(out, o.(*kvv1.VirtualMachineInstance))
	}
	return out
}
