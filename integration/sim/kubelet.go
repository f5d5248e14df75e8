package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"hash/fnv"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

// kubeletPod is what a kubelet remembers of a pod in memory; a reboot
// forgets it.
type kubeletPod struct {
	bootID        int
	creatingSince time.Time
	stopSince     time.Time
	ip            string
	node          string
}

type kubeletState struct {
	mu     sync.Mutex
	pods   map[types.UID]*kubeletPod
	byNode map[string]map[types.UID]bool
	nextIP uint32
}

func newKubeletState() *kubeletState {
	return &kubeletState{pods: map[types.UID]*kubeletPod{}, byNode: map[string]map[types.UID]bool{}}
}

func (k *kubeletState) get(uid types.UID) (kubeletPod, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	p, ok := k.pods[uid]
	if !ok {
		return kubeletPod{}, false
	}
	return *p, true
}

func (k *kubeletState) set(uid types.UID, p kubeletPod) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.forgetLocked(uid)
	k.pods[uid] = &p
	if k.byNode[p.node] == nil {
		k.byNode[p.node] = map[types.UID]bool{}
	}
	k.byNode[p.node][uid] = true
}

// prune forgets the pods of node that the API no longer has.
func (k *kubeletState) prune(node string, present map[types.UID]bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for uid := range k.byNode[node] {
		if !present[uid] {
			k.forgetLocked(uid)
		}
	}
}

func (k *kubeletState) forget(uid types.UID) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.forgetLocked(uid)
}

func (k *kubeletState) forgetLocked(uid types.UID) {
	p, ok := k.pods[uid]
	if !ok {
		return
	}
	delete(k.pods, uid)
	delete(k.byNode[p.node], uid)
	if len(k.byNode[p.node]) == 0 {
		delete(k.byNode, p.node)
	}
}

func (k *kubeletState) ip(node string) string {
	k.mu.Lock()
	k.nextIP++
	n := k.nextIP
	k.mu.Unlock()
	h := fnv.New32a()
	_, _ = h.Write([]byte(node))
	return fmt.Sprintf("10.%d.%d.%d", 64+h.Sum32()%64, (n/250)%250, 1+n%250)
}

func (s *Simulator) runKubelet(ctx context.Context) error {
	return s.runWorkers(ctx, "kubelet", s.kubeletQueue, 4, s.syncKubelet)
}

// syncKubelet is the kubelet of node: it starts the pods bound to it, stops
// and removes the pods being deleted, fails the pods a reboot killed, and
// kills the guests whose pods the API no longer has. A kubelet that is not
// alive (node down, partitioned, rebooting) does nothing.
func (s *Simulator) syncKubelet(ctx context.Context, node string) error {
	defer s.nodes.lock(node)()
	if s.getNode(node) == nil || !s.nodes.kubeletAlive(node) {
		return nil
	}
	bootID := s.nodes.get(node).bootID
	pods := s.podsBy(byNode, node)
	present := map[types.UID]bool{}
	for _, p := range pods {
		present[p.UID] = true
	}
	for _, g := range s.truth.guestsOn(node) {
		if !present[g.PodUID] {
			// The API lost the pod (force-deleted while the node was cut
			// off): the kubelet kills what it finds running.
			if s.truth.stop(g.PodUID) {
				s.log.Info().Str("node", node).Str("pod", g.Pod).Str("vmi", g.VMI).Msg("kubelet: pod gone from the API, killed its guest")
			}
		}
	}
	s.kubelet.prune(node, present)
	var after time.Duration
	var errs []error
	for _, p := range pods {
		d, err := s.kubeletSyncPod(ctx, node, bootID, p)
		if err != nil {
			errs = append(errs, err)
		}
		if d > 0 && (after == 0 || d < after) {
			after = d
		}
	}
	if after > 0 {
		s.kubeletQueue.AddAfter(node, after)
	}
	if len(errs) > 0 {
		return fmt.Errorf("kubelet %s: %w", node, errs[0])
	}
	return nil
}

func (s *Simulator) kubeletSyncPod(ctx context.Context, node string, bootID int, p *corev1.Pod) (time.Duration, error) {
	now := s.clock.Now()
	k, known := s.kubelet.get(p.UID)
	if !known || k.bootID != bootID {
		switch {
		case isTerminal(p):
		case bootID == 0 && p.Status.Phase == corev1.PodRunning:
			// The simulator itself just started: adopt what runs.
			k = kubeletPod{bootID: bootID, node: node}
			s.kubelet.set(p.UID, k)
			if isLauncher(p) && p.Labels[kvv1.MigrationJobLabel] == "" && p.DeletionTimestamp == nil {
				s.truth.start(s.guestFor(p))
			}
			known = true
		case p.Status.Phase == corev1.PodRunning:
			// It ran before this boot: its containers are gone.
			if err := s.postPodStatus(ctx, p, podFailedStatus(p, s.now())); err != nil {
				return 0, err
			}
			s.log.Info().Str("pod", keyOf(p)).Str("node", node).Msg("kubelet: pod did not survive the node's restart, Failed")
			return 0, nil
		default:
			k = kubeletPod{bootID: bootID, node: node}
			s.kubelet.set(p.UID, k)
		}
	}
	if p.DeletionTimestamp != nil {
		if s.truth.running(p.UID) {
			if k.stopSince.IsZero() {
				k.stopSince = now
				s.kubelet.set(p.UID, k)
			}
			stop := s.scaled(s.opts.PodStopDuration)
			if grace := p.DeletionGracePeriodSeconds; grace != nil && s.scaled(time.Duration(*grace)*time.Second) < stop {
				stop = s.scaled(time.Duration(*grace) * time.Second)
			}
			if left := stop - now.Sub(k.stopSince); left > 0 {
				return left, nil
			}
			s.truth.stop(p.UID)
			s.log.Info().Str("pod", keyOf(p)).Str("node", node).Msg("kubelet: stopped pod being deleted")
			if isLauncher(p) {
				// virt-handler on this node sees the domain shut off
				if err := s.vmiShutOff(ctx, p); err != nil {
					return 0, err
				}
			}
		}
		if !isTerminal(p) && p.Status.Phase == corev1.PodRunning {
			// virt-launcher shuts the guest down and exits 0 on SIGTERM.
			if err := s.postPodStatus(ctx, p, podCompletedStatus(p, s.now())); err != nil {
				return 0, err
			}
		}
		err := s.Kube.CoreV1().Pods(p.Namespace).Delete(ctx, p.Name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To(int64(0)), Preconditions: &metav1.Preconditions{UID: &p.UID}})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return 0, fmt.Errorf("remove pod %s: %w", keyOf(p), err)
		}
		s.kubelet.forget(p.UID)
		return 0, nil
	}
	if isTerminal(p) {
		s.truth.stop(p.UID)
		return 0, nil
	}
	switch p.Status.Phase {
	case corev1.PodRunning:
		if isLauncher(p) && s.truth.ran(p.UID) && !s.truth.running(p.UID) {
			// The guest left (migrated away or shut down): virt-launcher exits.
			if err := s.postPodStatus(ctx, p, podCompletedStatus(p, s.now())); err != nil {
				return 0, err
			}
			s.log.Info().Str("pod", keyOf(p)).Str("node", node).Msg("kubelet: guest gone, launcher pod Completed")
			return 0, nil
		}
		if !podReady(p) {
			// the node lifecycle controller marked it not ready while the
			// node was silent; the kubelet's status manager puts it right
			st := podRunningStatus(p, s.now(), p.Status.HostIP, p.Status.PodIP)
			st.StartTime = p.Status.StartTime
			return 0, s.postPodStatus(ctx, p, st)
		}
		return 0, nil
	default: // Pending
		if ok, why := s.volumesReady(p, node); !ok {
			if k.creatingSince.IsZero() || !podWaiting(p) {
				k.creatingSince = time.Time{}
				s.kubelet.set(p.UID, k)
				if !podWaiting(p) {
					return 0, s.postPodStatus(ctx, p, podCreatingStatus(p, s.now(), why))
				}
			}
			return 0, nil
		}
		if k.creatingSince.IsZero() {
			k.creatingSince = now
			s.kubelet.set(p.UID, k)
			if !podWaiting(p) {
				if err := s.postPodStatus(ctx, p, podCreatingStatus(p, s.now(), "")); err != nil {
					return 0, err
				}
			}
			return s.scaled(s.opts.PodStartDuration), nil
		}
		if left := s.scaled(s.opts.PodStartDuration) - now.Sub(k.creatingSince); left > 0 {
			return left, nil
		}
		if k.ip == "" {
			k.ip = s.kubelet.ip(node) // once: a pod's IP never changes
			s.kubelet.set(p.UID, k)
		}
		nodeObj := s.getNode(node)
		if err := s.postPodStatus(ctx, p, podRunningStatus(p, s.now(), nodeIP(nodeObj), k.ip)); err != nil {
			return 0, err
		}
		if isLauncher(p) && p.Labels[kvv1.MigrationJobLabel] == "" {
			s.truth.start(s.guestFor(p))
		}
		s.log.Debug().Str("pod", keyOf(p)).Str("node", node).Msg("kubelet: pod Running")
		return 0, nil
	}
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func isLauncher(p *corev1.Pod) bool { return p.Labels[kvv1.AppLabel] == launcherLabelValue }

func isTerminal(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

func podWaiting(p *corev1.Pod) bool {
	for _, c := range p.Status.ContainerStatuses {
		if c.State.Waiting != nil {
			return true
		}
	}
	return false
}

// guestFor describes the guest a launcher pod runs.
func (s *Simulator) guestFor(p *corev1.Pod) Guest {
	g := Guest{VMI: p.Namespace + "/" + p.Annotations[kvv1.DomainAnnotation], Node: p.Spec.NodeName, Pod: keyOf(p), PodUID: p.UID}
	for _, v := range p.Spec.Volumes {
		if v.PersistentVolumeClaim == nil {
			continue
		}
		if pvc := s.getPVC(p.Namespace, v.PersistentVolumeClaim.ClaimName); pvc != nil && isRWO(pvc) {
			g.RWOVolumes = append(g.RWOVolumes, p.Namespace+"/"+pvc.Name)
		}
	}
	return g
}

func nodeIP(n *corev1.Node) string {
	if n == nil {
		return ""
	}
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			return a.Address
		}
	}
	return ""
}

// postPodStatus writes status (phase, conditions, container statuses, IPs)
// as the kubelet does, only onto the same pod (UID precondition).
func (s *Simulator) postPodStatus(ctx context.Context, p *corev1.Pod, st corev1.PodStatus) error {
	body, err := json.Marshal(map[string]any{
		"metadata": map[string]any{"uid": p.UID},
		"status":   st,
	})
	if err != nil {
		return err
	}
	_, err = s.Kube.CoreV1().Pods(p.Namespace).Patch(ctx, p.Name, types.StrategicMergePatchType, body, metav1.PatchOptions{}, "status")
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("post status of pod %s: %w", keyOf(p), err)
	}
	return nil
}

func containerNames(p *corev1.Pod) []string {
	out := make([]string, 0, len(p.Spec.Containers))
	for _, c := range p.Spec.Containers {
		out = append(out, c.Name)
	}
	return out
}

func podConditions(now metav1.Time, ready bool) []corev1.PodCondition {
	r := corev1.ConditionFalse
	if ready {
		r = corev1.ConditionTrue
	}
	return []corev1.PodCondition{
		{Type: "PodReadyToStartContainers", Status: r, LastTransitionTime: now},
		{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: now},
		{Type: corev1.ContainersReady, Status: r, LastTransitionTime: now},
		{Type: corev1.PodReady, Status: r, LastTransitionTime: now},
		{Type: corev1.PodScheduled, Status: corev1.ConditionTrue, LastTransitionTime: now},
	}
}

func podCreatingStatus(p *corev1.Pod, now metav1.Time, msg string) corev1.PodStatus {
	st := corev1.PodStatus{Phase: corev1.PodPending, Conditions: podConditions(now, false), StartTime: &now}
	for _, c := range p.Spec.Containers {
		st.ContainerStatuses = append(st.ContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image,
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: "ContainerCreating", Message: msg}},
		})
	}
	return st
}

func podRunningStatus(p *corev1.Pod, now metav1.Time, hostIP, podIP string) corev1.PodStatus {
	st := corev1.PodStatus{
		Phase: corev1.PodRunning, Conditions: podConditions(now, true), StartTime: &now,
		HostIP: hostIP, PodIP: podIP, PodIPs: []corev1.PodIP{{IP: podIP}},
	}
	if hostIP != "" {
		st.HostIPs = []corev1.HostIP{{IP: hostIP}}
	}
	for _, c := range p.Spec.Containers {
		st.ContainerStatuses = append(st.ContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, ImageID: c.Image, Ready: true, Started: ptr.To(true),
			ContainerID: "containerd://" + string(p.UID) + "-" + c.Name,
			State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		})
	}
	return st
}

func podTerminatedStatus(p *corev1.Pod, now metav1.Time, phase corev1.PodPhase, code int32, reason, msg string) corev1.PodStatus {
	st := corev1.PodStatus{Phase: phase, Conditions: podConditions(now, false)}
	for _, name := range containerNames(p) {
		st.ContainerStatuses = append(st.ContainerStatuses, corev1.ContainerStatus{
			Name:  name,
			State: corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{ExitCode: code, Reason: reason, Message: msg, FinishedAt: now}},
		})
	}
	return st
}

func podCompletedStatus(p *corev1.Pod, now metav1.Time) corev1.PodStatus {
	return podTerminatedStatus(p, now, corev1.PodSucceeded, 0, "Completed", "")
}

func podFailedStatus(p *corev1.Pod, now metav1.Time) corev1.PodStatus {
	return podTerminatedStatus(p, now, corev1.PodFailed, 137, "ContainerStatusUnknown", "The container could not be located when the pod was terminated")
}
