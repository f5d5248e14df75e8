package sim

import (
	"context"
	"crypto/sha256"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"
)

func volumeNodeKey(node string) string      { return "node/" + node }
func volumeClaimKey(ns, name string) string { return "claim/" + ns + "/" + name }
func vaName(pv, attacher, node string) string {
	return fmt.Sprintf("csi-%x", sha256.Sum256([]byte(pv+attacher+node)))
}

func isRWO(pvc *corev1.PersistentVolumeClaim) bool {
	for _, m := range pvc.Spec.AccessModes {
		if m == corev1.ReadWriteMany || m == corev1.ReadOnlyMany {
			return false
		}
	}
	return true
}

func isRWOPV(pv *corev1.PersistentVolume) bool {
	for _, m := range pv.Spec.AccessModes {
		if m == corev1.ReadWriteMany || m == corev1.ReadOnlyMany {
			return false
		}
	}
	return true
}

// attachState remembers, per RWO PV, the attachment a worker has just made
// or is making, until the VolumeAttachment cache shows it. The workers sync
// different nodes at once and the cache lags the API, so the cache alone
// would let two nodes attach the same RWO volume.
type attachState struct {
	mu      sync.Mutex
	pending map[string]pendingAttach // PV name -> attachment made here
}

type pendingAttach struct {
	node string
	name string    // of the VolumeAttachment
	uid  types.UID // empty while the Create is in flight
}

func newAttachState() *attachState { return &attachState{pending: map[string]pendingAttach{}} }

// runVolumes plays a dynamic provisioner with its PV binder, and
// kube-controller-manager's attach/detach controller with a CSI attacher.
func (s *Simulator) runVolumes(ctx context.Context) error {
	st := newAttachState()
	return s.runWorkers(ctx, "volumes", s.volumeQueue, 2, func(ctx context.Context, key string) error {
		return s.syncVolumes(ctx, st, key)
	})
}

func (s *Simulator) syncVolumes(ctx context.Context, st *attachState, key string) error {
	switch {
	case strings.HasPrefix(key, "claim/"):
		parts := strings.SplitN(strings.TrimPrefix(key, "claim/"), "/", 2)
		return s.provision(ctx, parts[0], parts[1])
	case strings.HasPrefix(key, "node/"):
		return s.attachDetach(ctx, st, strings.TrimPrefix(key, "node/"))
	}
	return nil
}

// reserveRWO claims RWO volume pvName for an attachment (VolumeAttachment
// name) to node. It returns the nodes that hold the volume instead, if any:
// those the cache shows and the one an attachment made here but not yet in
// the cache is for. The check and the claim happen under st.mu, so two
// workers cannot both find the volume free.
func (s *Simulator) reserveRWO(ctx context.Context, st *attachState, pvName, node, name string) []string {
	st.mu.Lock()
	defer st.mu.Unlock()
	var holders []string
	// The pending attachment first, then the cache: the cache only moves
	// forward, so an attachment cleared here because the cache shows it is
	// seen in the cache below (unless it has really gone since).
	if p, ok := st.pending[pvName]; ok {
		if s.attachmentSettled(ctx, p) {
			delete(st.pending, pvName)
		} else if p.node != node {
			holders = append(holders, p.node)
		}
	}
	for _, va := range s.vasFor(byVAPV, pvName) {
		if va.Spec.NodeName != node && !slices.Contains(holders, va.Spec.NodeName) {
			holders = append(holders, va.Spec.NodeName)
		}
	}
	if len(holders) > 0 {
		sort.Strings(holders)
		return holders
	}
	st.pending[pvName] = pendingAttach{node: node, name: name}
	return nil
}

// attachmentSettled reports whether the cache can be trusted about p again:
// it shows the VolumeAttachment p made, or the API no longer has it.
func (s *Simulator) attachmentSettled(ctx context.Context, p pendingAttach) bool {
	if p.uid == "" {
		return false // being created
	}
	if obj, ok, _ := s.vaInformer.GetIndexer().GetByKey(p.name); ok && obj.(*storagev1.VolumeAttachment).UID == p.uid {
		return true
	}
	cur, err := s.Kube.StorageV1().VolumeAttachments().Get(ctx, p.name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return true // deleted before the cache showed it
	case err != nil:
		return false
	}
	return cur.UID != p.uid
}

// attached records that the attachment reserved for pvName on node exists
// in the API as uid; a zero uid drops the reservation (the Create failed).
func (st *attachState) attached(pvName, node string, uid types.UID) {
	st.mu.Lock()
	defer st.mu.Unlock()
	p, ok := st.pending[pvName]
	if !ok || p.node != node {
		return
	}
	if uid == "" {
		delete(st.pending, pvName)
		return
	}
	p.uid = uid
	st.pending[pvName] = p
}

// rwoAttachments maps every RWO volume that has VolumeAttachments in the
// cache (named by its claim, namespace/name, else by the PV) to the nodes
// they are for, sorted. A volume counts as RWO when its claim's access modes
// (the PV's when the claim is unknown) allow no sharing.
func (s *Simulator) rwoAttachments() map[string][]string {
	pvs := map[string]bool{}
	for _, obj := range s.vaInformer.GetStore().List() {
		if va := obj.(*storagev1.VolumeAttachment); va.Spec.Source.PersistentVolumeName != nil {
			pvs[*va.Spec.Source.PersistentVolumeName] = true
		}
	}
	out := s.rwoAttachmentsOf(pvs)
	for subject, nodes := range out {
		if len(nodes) == 0 {
			delete(out, subject)
		}
	}
	return out
}

// rwoAttachmentsOf is rwoAttachments for the volumes pvs only; a volume
// without attachments, or not RWO, maps to no nodes.
func (s *Simulator) rwoAttachmentsOf(pvs map[string]bool) map[string][]string {
	out := map[string][]string{}
	for pvName := range pvs {
		pv := s.getPV(pvName)
		if pv == nil {
			continue
		}
		subject, rwo := pv.Name, isRWOPV(pv)
		if ref := pv.Spec.ClaimRef; ref != nil {
			subject = ref.Namespace + "/" + ref.Name
			if pvc := s.getPVC(ref.Namespace, ref.Name); pvc != nil && (ref.UID == "" || pvc.UID == ref.UID) {
				rwo = isRWO(pvc)
			}
		}
		var nodes []string
		if rwo {
			for _, va := range s.vasFor(byVAPV, pvName) {
				if !slices.Contains(nodes, va.Spec.NodeName) {
					nodes = append(nodes, va.Spec.NodeName)
				}
			}
			sort.Strings(nodes)
		}
		out[subject] = nodes
	}
	return out
}

// nodesUsingPV returns the nodes of the pods whose claim is bound to PV
// pvName.
func (s *Simulator) nodesUsingPV(pvName string) []string {
	pv := s.getPV(pvName)
	if pv == nil || pv.Spec.ClaimRef == nil {
		return nil
	}
	var out []string
	for _, p := range s.podsBy(byClaim, pv.Spec.ClaimRef.Namespace+"/"+pv.Spec.ClaimRef.Name) {
		if n := p.Spec.NodeName; n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// provision binds a pending claim to a new PersistentVolume of the same size
// and access modes.
func (s *Simulator) provision(ctx context.Context, ns, name string) error {
	pvc := s.getPVC(ns, name)
	if pvc == nil || pvc.DeletionTimestamp != nil {
		return nil
	}
	if pvc.Spec.VolumeName != "" && pvc.Status.Phase == corev1.ClaimBound {
		return nil
	}
	pvName := pvc.Spec.VolumeName
	if pvName == "" {
		pvName = "pvc-" + string(pvc.UID)
	}
	size := pvc.Spec.Resources.Requests[corev1.ResourceStorage]
	if size.IsZero() {
		size = resource.MustParse("10Gi")
	}
	if s.getPV(pvName) == nil {
		pv := &corev1.PersistentVolume{
			ObjectMeta: metav1.ObjectMeta{Name: pvName, Annotations: map[string]string{"pv.kubernetes.io/provisioned-by": csiDriver}},
			Spec: corev1.PersistentVolumeSpec{
				Capacity:                      corev1.ResourceList{corev1.ResourceStorage: size},
				AccessModes:                   pvc.Spec.AccessModes,
				PersistentVolumeReclaimPolicy: corev1.PersistentVolumeReclaimDelete,
				ClaimRef:                      &corev1.ObjectReference{Kind: "PersistentVolumeClaim", APIVersion: "v1", Namespace: ns, Name: name, UID: pvc.UID},
				PersistentVolumeSource: corev1.PersistentVolumeSource{CSI: &corev1.CSIPersistentVolumeSource{
					Driver: csiDriver, VolumeHandle: pvName,
				}},
				VolumeMode: pvc.Spec.VolumeMode,
			},
		}
		if pvc.Spec.StorageClassName != nil {
			pv.Spec.StorageClassName = *pvc.Spec.StorageClassName
		}
		created, err := s.Kube.CoreV1().PersistentVolumes().Create(ctx, pv, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("provision %s/%s: create pv %s: %w", ns, name, pvName, err)
		}
		if err == nil {
			created.Status.Phase = corev1.VolumeBound
			if _, err := s.Kube.CoreV1().PersistentVolumes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil && !apierrors.IsConflict(err) {
				return fmt.Errorf("provision %s/%s: bind pv %s: %w", ns, name, pvName, err)
			}
		}
	}
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := s.Kube.CoreV1().PersistentVolumeClaims(ns).Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return err
		}
		if cur.Spec.VolumeName == "" {
			cur.Spec.VolumeName = pvName
			if cur.Annotations == nil {
				cur.Annotations = map[string]string{}
			}
			cur.Annotations["pv.kubernetes.io/bind-completed"] = "yes"
			cur.Annotations["pv.kubernetes.io/bound-by-controller"] = "yes"
			if cur, err = s.Kube.CoreV1().PersistentVolumeClaims(ns).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
				return err
			}
		}
		cur.Status.Phase = corev1.ClaimBound
		cur.Status.AccessModes = cur.Spec.AccessModes
		cur.Status.Capacity = corev1.ResourceList{corev1.ResourceStorage: size}
		_, err = s.Kube.CoreV1().PersistentVolumeClaims(ns).UpdateStatus(ctx, cur, metav1.UpdateOptions{})
		return err
	})
}

// pvOf returns the bound PV name of claim ns/name, or "".
func (s *Simulator) pvOf(ns, name string) string {
	pvc := s.getPVC(ns, name)
	if pvc == nil || pvc.Status.Phase != corev1.ClaimBound {
		return ""
	}
	return pvc.Spec.VolumeName
}

func (s *Simulator) vasFor(index, value string) []*storagev1.VolumeAttachment {
	objs, _ := s.vaInformer.GetIndexer().ByIndex(index, value)
	out := make([]*storagev1.VolumeAttachment, 0, len(objs))
	for _, o := range objs {
		out = append(out, o.(*storagev1.VolumeAttachment))
	}
	return out
}

// volumesReady reports whether every claim of p is bound and attached to
// node; if not, why (the kubelet keeps the pod ContainerCreating).
func (s *Simulator) volumesReady(p *corev1.Pod, node string) (bool, string) {
	for _, v := range p.Spec.Volumes {
		if v.PersistentVolumeClaim == nil {
			continue
		}
		pv := s.pvOf(p.Namespace, v.PersistentVolumeClaim.ClaimName)
		if pv == "" {
			s.volumeQueue.Add(volumeClaimKey(p.Namespace, v.PersistentVolumeClaim.ClaimName))
			return false, fmt.Sprintf("waiting for claim %s to be bound", v.PersistentVolumeClaim.ClaimName)
		}
		attached := false
		for _, va := range s.vasFor(byVAPV, pv) {
			if va.Spec.NodeName == node && va.Status.Attached && va.DeletionTimestamp == nil {
				attached = true
			}
		}
		if !attached {
			s.volumeQueue.Add(volumeNodeKey(node))
			return false, fmt.Sprintf("Unable to attach or mount volumes: unattached volumes=[%s]: timed out waiting for the condition", v.Name)
		}
	}
	return true, ""
}

// attachDetach reconciles the VolumeAttachments of node with the pods bound
// to it. An RWO volume attached elsewhere is not attached here (Multi-Attach
// error) until that attachment is gone. A volume no pod on node needs any
// more is detached only when the node's kubelet confirms the unmount (it is
// alive) or the node is tainted out-of-service; a dead node keeps its
// attachments.
func (s *Simulator) attachDetach(ctx context.Context, st *attachState, node string) error {
	// The checker learns of every RWO volume attached to two nodes, however
	// briefly the cache shows it: every VolumeAttachment event brings its
	// node here, and this node's volumes are observed.
	volumes := map[string]bool{}
	defer func() {
		s.truth.observeVolumes(func() map[string][]string { return s.rwoAttachmentsOf(volumes) })
	}()
	for _, va := range s.vasFor(byVANode, node) {
		if va.Spec.Source.PersistentVolumeName != nil {
			volumes[*va.Spec.Source.PersistentVolumeName] = true
		}
	}
	nodeObj := s.getNode(node)
	needed := map[string][]*corev1.Pod{}
	for _, p := range s.podsBy(byNode, node) {
		if isTerminal(p) {
			continue
		}
		for _, v := range p.Spec.Volumes {
			if v.PersistentVolumeClaim == nil {
				continue
			}
			if pv := s.pvOf(p.Namespace, v.PersistentVolumeClaim.ClaimName); pv != "" {
				needed[pv] = append(needed[pv], p)
				volumes[pv] = true
			}
		}
	}
	var errs []error
	for pvName, pods := range needed {
		pv := s.getPV(pvName)
		if pv == nil {
			continue
		}
		var mine *storagev1.VolumeAttachment
		for _, va := range s.vasFor(byVAPV, pvName) {
			if va.Spec.NodeName == node {
				mine = va
			}
		}
		if mine != nil {
			if !mine.Status.Attached && mine.DeletionTimestamp == nil {
				cp := mine.DeepCopy()
				cp.Status.Attached = true
				if _, err := s.Kube.StorageV1().VolumeAttachments().UpdateStatus(ctx, cp, metav1.UpdateOptions{}); err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
					errs = append(errs, err)
				}
			}
			continue
		}
		if nodeObj == nil {
			continue
		}
		name := vaName(pvName, csiDriver, node)
		rwo := isRWOPV(pv)
		if rwo {
			if elsewhere := s.reserveRWO(ctx, st, pvName, node, name); len(elsewhere) > 0 {
				for _, p := range pods {
					s.eventOnce(ctx, p, corev1.EventTypeWarning, "FailedAttachVolume",
						fmt.Sprintf("Multi-Attach error for volume %q Volume is already exclusively attached to one node (%s) and can't be attached to another", pvName, strings.Join(elsewhere, ",")))
				}
				continue
			}
		}
		va := &storagev1.VolumeAttachment{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: storagev1.VolumeAttachmentSpec{
				Attacher: csiDriver,
				NodeName: node,
				Source:   storagev1.VolumeAttachmentSource{PersistentVolumeName: &pvName},
			},
		}
		created, err := s.Kube.StorageV1().VolumeAttachments().Create(ctx, va, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			// Made by an earlier sync, not in the cache yet.
			if rwo {
				cur, gerr := s.Kube.StorageV1().VolumeAttachments().Get(ctx, name, metav1.GetOptions{})
				switch {
				case gerr == nil:
					st.attached(pvName, node, cur.UID)
				case apierrors.IsNotFound(gerr):
					st.attached(pvName, node, "")
					errs = append(errs, fmt.Errorf("attach %s to %s: attachment vanished", pvName, node))
				default:
					st.attached(pvName, node, "")
					errs = append(errs, fmt.Errorf("attach %s to %s: %w", pvName, node, gerr))
				}
			}
			continue
		}
		if err != nil {
			if rwo {
				st.attached(pvName, node, "")
				s.enqueueNodesUsing(pvName, node) // they may have been refused for this one
			}
			errs = append(errs, fmt.Errorf("attach %s to %s: %w", pvName, node, err))
			continue
		}
		if rwo {
			st.attached(pvName, node, created.UID)
		}
		created.Status.Attached = true
		if _, err := s.Kube.StorageV1().VolumeAttachments().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			errs = append(errs, err)
		}
		s.log.Debug().Str("pv", pvName).Str("node", node).Msg("attach/detach: attached")
	}
	canDetach := nodeObj == nil || s.nodes.kubeletAlive(node) || hasTaint(nodeObj, taintOutOfService, "")
	for _, va := range s.vasFor(byVANode, node) {
		if va.Spec.Source.PersistentVolumeName == nil || va.DeletionTimestamp != nil {
			continue
		}
		if _, ok := needed[*va.Spec.Source.PersistentVolumeName]; ok || !canDetach {
			continue
		}
		err := s.Kube.StorageV1().VolumeAttachments().Delete(ctx, va.Name, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("detach %s from %s: %w", *va.Spec.Source.PersistentVolumeName, node, err))
			continue
		}
		s.log.Debug().Str("pv", *va.Spec.Source.PersistentVolumeName).Str("node", node).Msg("attach/detach: detached")
		// A detach here may unblock an RWO attach elsewhere.
		s.enqueueNodesUsing(*va.Spec.Source.PersistentVolumeName, node)
	}
	if len(errs) > 0 {
		return fmt.Errorf("attach/detach on %s: %w", node, errs[0])
	}
	return nil
}

// enqueueNodesUsing has the attach/detach controller look again at the
// nodes, but node, whose pods use PV pvName.
func (s *Simulator) enqueueNodesUsing(pvName, node string) {
	for _, other := range s.nodesUsingPV(pvName) {
		if other != node {
			s.volumeQueue.Add(volumeNodeKey(other))
		}
	}
}
