package sim

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
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
