package sim

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
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
// and virt-controller (two replicas each), as on a real cluster: they get
// stuck on a dead node, drain has to skip or evict them, and a recovery has
// to clean them up. KubeVirt works only while they run: virt-api's webhooks
// answer only while a virt-api pod is Ready on a live node
// (virtAPIAvailable), and virt-controller's controllers act only while the
// virt-controller pod holding the leader lease runs on a live node
// (virtControllerActive). A pod on a node that died keeps its place in its
// ReplicaSet (it still looks Running) until someone force-deletes it.
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
			node, placed, wait := s.placeControlPlanePod(name)
			if wait {
				break // its node does not exist yet; a node event brings us back
			}
			pod := controlPlanePod(ns, name, rs.UID, "ReplicaSet", rs.Name)
			pod.Name = name + "-" + rand.String(5)
			pod.Spec.NodeName = node
			if _, err := s.Kube.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
				if placed >= 0 {
					s.cpPlaced[name][placed] = false
				}
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

// KubeVirtPods says on which nodes the replicas of virt-api and virt-controller first start:
// one node name per replica, in order (a name may repeat); missing entries are left to the
// scheduler. A replica waits for its node to exist. Replacements of these pods, once they are
// deleted, are scheduled as usual.
type KubeVirtPods struct {
	VirtAPI        []string `json:"virtAPI,omitempty"`
	VirtController []string `json:"virtController,omitempty"`
}

func (k KubeVirtPods) of(component string) []string {
	switch component {
	case "virt-api":
		return k.VirtAPI
	case "virt-controller":
		return k.VirtController
	}
	return nil
}

// placeControlPlanePod picks the node of the next replica of component: the first placement of
// Options.KubeVirtPods not used yet (marked used, its index returned), "" for the scheduler
// (index -1), or wait when that placement's node does not exist yet.
func (s *Simulator) placeControlPlanePod(component string) (node string, index int, wait bool) {
	want := s.opts.KubeVirtPods.of(component)
	used := s.cpPlaced[component]
	if len(used) != len(want) {
		used = make([]bool, len(want))
		s.cpPlaced[component] = used
	}
	for i, n := range want {
		if used[i] {
			continue
		}
		if s.getNode(n) == nil {
			return "", -1, true
		}
		used[i] = true
		return n, i, false
	}
	return "", -1, false
}

// podRunsOnLiveNode: pod p's containers run now on a node whose kubelet can reach the API (not
// down, partitioned or rebooting, and started in the node's current boot).
func (s *Simulator) podRunsOnLiveNode(p *corev1.Pod) bool {
	node := p.Spec.NodeName
	if node == "" || p.Status.Phase != corev1.PodRunning || !s.nodes.kubeletAlive(node) {
		return false
	}
	k, ok := s.kubelet.get(p.UID)
	return ok && k.bootID == s.nodes.get(node).bootID
}

// virtAPIAvailable says whether the API server reaches virt-api now: through the virt-api
// Service, whose endpoints are the Ready virt-api pods, to one that runs. When it does not, it
// says what the API server meets instead. Without KubeVirt's pods (Options.NoKubeVirtPods)
// virt-api always answers.
func (s *Simulator) virtAPIAvailable() (bool, string) {
	if s.opts.NoKubeVirtPods {
		return true, ""
	}
	endpoint := ""
	for _, p := range s.podsOf(s.opts.KubeVirtNamespace, "virt-api") {
		if p.DeletionTimestamp != nil || !podReady(p) {
			continue
		}
		if s.podRunsOnLiveNode(p) {
			return true, ""
		}
		endpoint = p.Status.PodIP
	}
	if endpoint == "" {
		return false, `no endpoints available for service "virt-api"`
	}
	// The Ready endpoints are on nodes that died before the node lifecycle controller marked
	// them not ready.
	return false, fmt.Sprintf("Post \"https://virt-api.%s.svc:443\": dial tcp %s:8443: i/o timeout", s.opts.KubeVirtNamespace, endpoint)
}

// virt-controller's leader election (pkg/virt-controller/leaderelectionconfig/config.go): a
// lease of 15 s, renewed every 2 s by the replica that holds it.
const (
	virtControllerLeaseDuration = 15 * time.Second
	virtControllerRetryPeriod   = 2 * time.Second
)

// virtControllerLeader is the leader lease of virt-controller, kept in memory: the pod holding
// it, and when that pod last renewed it.
type virtControllerLeader struct {
	mu      sync.Mutex
	holder  string // namespace/name of the virt-controller pod
	renewed time.Time
	acting  bool // whether the holder acted at the last election
}

// runVirtControllerLeader plays the election among the virt-controller replicas every retry
// period until ctx ends.
func (s *Simulator) runVirtControllerLeader(ctx context.Context) error {
	if s.opts.NoKubeVirtPods {
		<-ctx.Done()
		return nil
	}
	t := s.clock.NewTicker(s.scaled(virtControllerRetryPeriod))
	defer t.Stop()
	for {
		s.electVirtController()
		select {
		case <-ctx.Done():
			return nil
		case <-t.C():
		}
	}
}

// electVirtController renews the lease while its holder runs on a live node; once the lease
// has expired (its holder died with its node, or was deleted), a replica that runs on a live
// node takes it over. A new leader resyncs every controller.
func (s *Simulator) electVirtController() {
	now := s.clock.Now()
	l := s.leader
	l.mu.Lock()
	var acting bool
	if p := s.getPod(l.holder); l.holder != "" && p != nil && s.podRunsOnLiveNode(p) {
		l.renewed, acting = now, true
	} else if l.holder == "" || now.Sub(l.renewed) >= s.scaled(virtControllerLeaseDuration) {
		if c := s.virtControllerCandidate(); c != nil {
			if l.holder != keyOf(c) {
				s.log.Info().Str("pod", keyOf(c)).Str("node", c.Spec.NodeName).Str("previous", l.holder).Msg("virt-controller: new leader")
			}
			l.holder, l.renewed, acting = keyOf(c), now, true
		}
	}
	was := l.acting
	l.acting = acting
	holder := l.holder
	l.mu.Unlock()
	switch {
	case acting && !was:
		s.resyncKubeVirtControllers()
	case !acting && was:
		s.log.Warn().Str("leader", holder).Msg("virt-controller: the leader does not run on a live node; KubeVirt's controllers stand still")
	}
}

// virtControllerCandidate is a virt-controller pod that could lead: running on a live node, not
// being deleted (the first by name).
func (s *Simulator) virtControllerCandidate() *corev1.Pod {
	var best *corev1.Pod
	for _, p := range s.podsOf(s.opts.KubeVirtNamespace, "virt-controller") {
		if p.DeletionTimestamp == nil && s.podRunsOnLiveNode(p) && (best == nil || p.Name < best.Name) {
			best = p
		}
	}
	return best
}

// virtControllerActive says whether virt-controller's controllers (VM, VMI, migration,
// evacuation, node) act now: the pod holding the leader lease runs on a live node. Without
// KubeVirt's pods (Options.NoKubeVirtPods) they always act.
func (s *Simulator) virtControllerActive() bool {
	if s.opts.NoKubeVirtPods {
		return true
	}
	s.leader.mu.Lock()
	holder := s.leader.holder
	s.leader.mu.Unlock()
	p := s.getPod(holder)
	return holder != "" && p != nil && s.podRunsOnLiveNode(p)
}

// resyncKubeVirtControllers queues every object of virt-controller's controllers, as a new
// leader's informers do when it starts.
func (s *Simulator) resyncKubeVirtControllers() {
	for _, o := range s.vmInformer.GetStore().List() {
		s.vmQueue.Add(keyOf(o.(metav1.Object)))
	}
	for _, o := range s.vmiInformer.GetStore().List() {
		s.vmiQueue.Add(keyOf(o.(metav1.Object)))
	}
	for _, o := range s.vmimInformer.GetStore().List() {
		s.migrationQueue.Add(keyOf(o.(metav1.Object)))
	}
	for _, o := range s.dvmInformer.GetStore().List() {
		s.dvmQueue.Add(keyOf(o.(metav1.Object)))
	}
}
