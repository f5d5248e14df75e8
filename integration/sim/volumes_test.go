package sim

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	kvv1 "kubevirt.io/api/core/v1"
)

// TestRWOAttachmentBlocksAnotherNode: an RWO volume attached to a dead
// node keeps the restarted VM's new launcher pod from starting elsewhere
// (ContainerCreating, Multi-Attach error) until that VolumeAttachment is
// deleted.
func TestRWOAttachmentBlocksAnotherNode(t *testing.T) {
	s := startSim(t, Options{})
	ctx := ctxT(t)
	mustNode(t, s, "r1", NodeOptions{})
	mustPVC(t, s, "data", corev1.ReadWriteOnce)
	mustVM(t, s, "db", VMOptions{Disk: "data"})
	first := vmiRunning(t, s, "db", 30*time.Second)
	require.Equal(t, "r1", first.Status.NodeName)
	c := vmiCondition(first, kvv1.VirtualMachineInstanceIsMigratable)
	require.NotNil(t, c)
	require.Equal(t, corev1.ConditionFalse, c.Status)
	require.Equal(t, kvv1.VirtualMachineInstanceReasonDisksNotMigratable, c.Reason)
	pv := s.pvOf(testNS, "data")
	require.NotEmpty(t, pv)
	vas := s.vasFor(byVAPV, pv)
	require.Len(t, vas, 1)
	require.Equal(t, "r1", vas[0].Spec.NodeName)
	require.True(t, vas[0].Status.Attached)

	mustNode(t, s, "r2", NodeOptions{})
	require.NoError(t, s.SetFault(ctx, "r1", FaultDown))
	waitNodeReady(t, s, "r1", corev1.ConditionUnknown, 30*time.Second)
	require.Equal(t, 1, forceDeletePods(t, s, "r1"))

	var blocked *corev1.Pod
	eventually(t, 30*time.Second, "new launcher pod on r2 waiting for the volume", func() (bool, string) {
		vmi := s.getVMI(testNS + "/db")
		if vmi == nil || vmi.UID == first.UID {
			return false, "no new vmi"
		}
		for _, p := range vmiPods(s, "db") {
			if p.Spec.NodeName == "r2" && podWaiting(p) {
				blocked = p
				return true, ""
			}
		}
		return false, fmt.Sprintf("vmi %s", vmi.Status.Phase)
	})
	eventually(t, 20*time.Second, "Multi-Attach event", func() (bool, string) {
		evs, err := s.Kube.CoreV1().Events(testNS).List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("involvedObject.name", blocked.Name).String()})
		require.NoError(t, err)
		for _, e := range evs.Items {
			if e.Reason == "FailedAttachVolume" {
				return true, ""
			}
		}
		return false, fmt.Sprintf("%d events", len(evs.Items))
	})
	// the attach on r2 was refused: r1 still holds the only attachment
	vas = s.vasFor(byVAPV, pv)
	require.Len(t, vas, 1)
	require.Equal(t, "r1", vas[0].Spec.NodeName)
	cur := s.getPod(keyOf(blocked))
	require.Equal(t, corev1.PodPending, cur.Status.Phase)
	require.NotEqual(t, kvv1.Running, s.getVMI(testNS+"/db").Status.Phase)
	require.Empty(t, s.Truth().GuestNodes(testNS+"/db"))

	require.NoError(t, s.Kube.StorageV1().VolumeAttachments().Delete(ctx, vas[0].Name, metav1.DeleteOptions{}))
	vmi := vmiRunning(t, s, "db", 30*time.Second)
	require.Equal(t, "r2", vmi.Status.NodeName)
	require.Equal(t, map[string][]string{testNS + "/data": {"r2"}}, s.Truth().Volumes)
	vas = s.vasFor(byVAPV, pv)
	require.Len(t, vas, 1)
	require.Equal(t, "r2", vas[0].Spec.NodeName)
	require.Empty(t, s.Violations())
}

// TestRWOAttachRace: pods on many nodes start at once, all wanting one RWO
// claim. The attach/detach workers sync those nodes concurrently and the
// cache lags their own writes, yet at most one VolumeAttachment for the
// volume ever exists (every VolumeAttachment event is watched); the other
// pods get Multi-Attach errors.
func TestRWOAttachRace(t *testing.T) {
	s := startSim(t, Options{})
	ctx := ctxT(t)
	const n = 8
	for i := 0; i < n; i++ {
		mustNode(t, s, fmt.Sprintf("race%d", i), NodeOptions{})
	}
	mustPVC(t, s, "shared-rwo", corev1.ReadWriteOnce)
	var pv string
	eventually(t, 30*time.Second, "claim bound", func() (bool, string) {
		pv = s.pvOf(testNS, "shared-rwo")
		return pv != "" && s.getPV(pv) != nil, "unbound"
	})
	require.NoError(t, s.ensureServiceAccount(ctx, testNS))

	list, err := s.Kube.StorageV1().VolumeAttachments().List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	w, err := s.Kube.StorageV1().VolumeAttachments().Watch(ctx, metav1.ListOptions{ResourceVersion: list.ResourceVersion})
	require.NoError(t, err)
	defer w.Stop()
	var mu sync.Mutex
	live := map[string]string{} // VolumeAttachment name -> node, for pv
	most := 0
	var seen []string
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for ev := range w.ResultChan() {
			va, ok := ev.Object.(*storagev1.VolumeAttachment)
			if !ok || va.Spec.Source.PersistentVolumeName == nil || *va.Spec.Source.PersistentVolumeName != pv {
				continue
			}
			mu.Lock()
			switch ev.Type {
			case watch.Added, watch.Modified:
				if _, had := live[va.Name]; !had {
					seen = append(seen, va.Spec.NodeName)
				}
				live[va.Name] = va.Spec.NodeName
			case watch.Deleted:
				delete(live, va.Name)
			}
			most = max(most, len(live))
			mu.Unlock()
		}
	}()

	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("writer%d", i), Namespace: testNS},
				Spec: corev1.PodSpec{
					NodeName:   fmt.Sprintf("race%d", i),
					Containers: []corev1.Container{{Name: "c", Image: "writer"}},
					Volumes: []corev1.Volume{{Name: "data", VolumeSource: corev1.VolumeSource{
						PersistentVolumeClaim: &corev1.PersistentVolumeClaimVolumeSource{ClaimName: "shared-rwo"},
					}}},
				},
			}
			_, err := s.Kube.CoreV1().Pods(testNS).Create(ctx, p, metav1.CreateOptions{})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}

	// Every pod either has the volume attached to its node or has been
	// refused it: every node has decided.
	var winner string
	eventually(t, 60*time.Second, "every pod attached or refused", func() (bool, string) {
		vas := s.vasFor(byVAPV, pv)
		if len(vas) == 0 {
			return false, "no attachment"
		}
		attachedTo := map[string]bool{}
		for _, va := range vas {
			attachedTo[va.Spec.NodeName] = true
		}
		evs, err := s.Kube.CoreV1().Events(testNS).List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("reason", "FailedAttachVolume").String()})
		require.NoError(t, err)
		refused := map[string]bool{}
		for _, e := range evs.Items {
			refused[e.InvolvedObject.Name] = true
		}
		for i := 0; i < n; i++ {
			if !attachedTo[fmt.Sprintf("race%d", i)] && !refused[fmt.Sprintf("writer%d", i)] {
				return false, fmt.Sprintf("writer%d undecided; attached to %v", i, attachedTo)
			}
		}
		winner = vas[0].Spec.NodeName
		return true, ""
	})
	mu.Lock()
	require.LessOrEqual(t, most, 1, "RWO VolumeAttachments at once; created for %v", seen)
	mu.Unlock()
	var nodes []string
	for _, va := range s.vasFor(byVAPV, pv) {
		nodes = append(nodes, va.Spec.NodeName)
	}
	require.Equal(t, []string{winner}, nodes, "one RWO attachment")
	require.Empty(t, s.Violations())
	w.Stop()
	<-watchDone
}
