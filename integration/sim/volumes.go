package sim

import (
	"context"
	"crypto/sha256"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
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

// runVolumes plays a dynamic provisioner with its PV binder, and
// kube-controller-manager's attach/detach controller with a CSI attacher.
func (s *Simulator) runVolumes(ctx context.Context) error {
	return s.runWorkers(ctx, "volumes", s.volumeQueue, 2, s.syncVolumes)
}

func (s *Simulator) syncVolumes(ctx context.Context, key string) error {
	switch {
	case strings.HasPrefix(key, "claim/"):
		parts := strings.SplitN(strings.TrimPrefix(key, "claim/"), "/", 2)
		return s.provision(ctx, parts[0], parts[1])
	case strings.HasPrefix(key, "node/"):
		return s.attachDetach(ctx, strings.TrimPrefix(key, "node/"))
	}
	return nil
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
func (s *Simulator) attachDetach(ctx context.Context, node string) error {
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
		var elsewhere []string
		for _, va := range s.vasFor(byVAPV, pvName) {
			if va.Spec.NodeName == node {
				mine = va
			} else {
				elsewhere = append(elsewhere, va.Spec.NodeName)
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
		if isRWOPV(pv) && len(elsewhere) > 0 {
			for _, p := range pods {
				s.eventOnce(ctx, p, corev1.EventTypeWarning, "FailedAttachVolume",
					fmt.Sprintf("Multi-Attach error for volume %q Volume is already exclusively attached to one node (%s) and can't be attached to another", pvName, strings.Join(elsewhere, ",")))
			}
			continue
		}
		va := &storagev1.VolumeAttachment{
			ObjectMeta: metav1.ObjectMeta{Name: vaName(pvName, csiDriver, node)},
			Spec: storagev1.VolumeAttachmentSpec{
				Attacher: csiDriver,
				NodeName: node,
				Source:   storagev1.VolumeAttachmentSource{PersistentVolumeName: &pvName},
			},
		}
		created, err := s.Kube.StorageV1().VolumeAttachments().Create(ctx, va, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("attach %s to %s: %w", pvName, node, err))
			continue
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
		for _, other := range s.nodeNames() {
			if other != node {
				s.volumeQueue.Add(volumeNodeKey(other))
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("attach/detach on %s: %w", node, errs[0])
	}
	return nil
}
