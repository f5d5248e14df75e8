package sim

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kvv1 "kubevirt.io/api/core/v1"
)

// TestCheckerCatchesPlantedDoubleRun: a guest planted on a second node is a
// double run (and, with an RWO disk, a double attach) for Check while it
// lasts, and stays in Violations after it ends.
func TestCheckerCatchesPlantedDoubleRun(t *testing.T) {
	s := startSim(t, Options{})
	mustNode(t, s, "c1", NodeOptions{})
	mustPVC(t, s, "rwo", corev1.ReadWriteOnce)
	mustVM(t, s, "vm", VMOptions{Disk: "rwo"})
	vmiRunning(t, s, "vm", 30*time.Second)
	require.NoError(t, s.Check())
	require.Empty(t, s.Violations())

	remove := s.PlantGuest(testNS+"/vm", "elsewhere", testNS+"/rwo")
	err := s.Check()
	require.Error(t, err)
	require.True(t, errors.Is(err, ErrInvariant))
	require.Contains(t, err.Error(), string(DoubleRun))
	require.Contains(t, err.Error(), string(RWOMultiAttach))
	require.ElementsMatch(t, []string{"c1", "elsewhere"}, s.Truth().GuestNodes(testNS+"/vm"))
	remove()
	require.NoError(t, s.Check())

	v := s.Violations()
	require.Len(t, v, 2)
	kinds := map[ViolationKind]Violation{}
	for _, x := range v {
		kinds[x.Kind] = x
	}
	require.Equal(t, testNS+"/vm", kinds[DoubleRun].Subject)
	require.Equal(t, []string{"c1", "elsewhere"}, kinds[DoubleRun].Nodes)
	require.Equal(t, testNS+"/rwo", kinds[RWOMultiAttach].Subject)
}

// TestPartitionAndWatchdog: a partitioned node keeps its guests running
// (the API cannot tell); with a watchdog it fences itself after the
// timeout. Without one, restarting its VM elsewhere is a real double run,
// which the checker records; healing the partition kills the orphan.
func TestPartitionAndWatchdog(t *testing.T) {
	s := startSim(t, Options{KubeVirtPods: controlPlaneOn("cp")})
	ctx := ctxT(t)
	mustControlPlaneNodes(t, s, "cp")
	pool := map[string]string{"pool": "b"}
	mustNode(t, s, "w1", NodeOptions{WatchdogTimeout: 60 * time.Second, Labels: map[string]string{"pool": "a"}})
	mustNode(t, s, "w2", NodeOptions{Labels: pool})
	mustVM(t, s, "guarded", VMOptions{NodeSelector: map[string]string{"pool": "a"}})
	mustVM(t, s, "unsafe", VMOptions{NodeSelector: pool})
	require.Equal(t, "w1", vmiRunning(t, s, "guarded", 30*time.Second).Status.NodeName)
	first := vmiRunning(t, s, "unsafe", 30*time.Second)
	require.Equal(t, "w2", first.Status.NodeName)
	mustNode(t, s, "w3", NodeOptions{Labels: pool})

	partitioned := time.Now()
	require.NoError(t, s.SetFault(ctx, "w1", FaultPartitioned))
	require.NoError(t, s.SetFault(ctx, "w2", FaultPartitioned))
	eventually(t, 30*time.Second, "w1 fenced by its watchdog", func() (bool, string) {
		return s.NodeState("w1") == NodeFenced, string(s.NodeState("w1"))
	})
	require.GreaterOrEqual(t, time.Since(partitioned), s.scaled(60*time.Second), "not before the watchdog timeout")
	require.Empty(t, s.Truth().GuestNodes(testNS+"/guarded"), "the watchdog killed the guest")
	require.Equal(t, NodePartitioned, s.NodeState("w2"))
	require.Equal(t, []string{"w2"}, s.Truth().GuestNodes(testNS+"/unsafe"), "no watchdog: the guest runs on")
	require.Equal(t, kvv1.Running, s.getVMI(testNS+"/guarded").Status.Phase, "the API cannot tell either")

	// an admin force-deletes the unsafe VM's pod without fencing w2
	waitNodeReady(t, s, "w2", corev1.ConditionUnknown, 30*time.Second)
	// well past the 60 s that fenced w1, w2 has no watchdog to fence it
	require.GreaterOrEqual(t, time.Since(partitioned), s.scaled(60*time.Second))
	require.Equal(t, NodePartitioned, s.NodeState("w2"))
	require.Equal(t, []string{"w2"}, s.Truth().GuestNodes(testNS+"/unsafe"), "no watchdog: the guest still runs")
	require.Equal(t, 1, forceDeletePods(t, s, "w2"))
	eventually(t, 30*time.Second, "the double run is recorded", func() (bool, string) {
		for _, v := range s.Violations() {
			if v.Kind == DoubleRun && v.Subject == testNS+"/unsafe" {
				return true, ""
			}
		}
		return false, ""
	})
	vmi := vmiRunning(t, s, "unsafe", 30*time.Second)
	require.Equal(t, "w3", vmi.Status.NodeName)
	require.Error(t, s.Check())

	require.NoError(t, s.SetFault(ctx, "w2", ""))
	eventually(t, 30*time.Second, "the orphan guest on w2 is killed on reconnect", func() (bool, string) {
		return s.Check() == nil, ""
	})
	require.Equal(t, []string{"w3"}, s.Truth().GuestNodes(testNS+"/unsafe"))
	// Check says what is violated now: nothing. The history still has the double run the
	// healed partition ended: a test asserts on Violations.
	var double []Violation
	for _, v := range s.Violations() {
		if v.Kind == DoubleRun && v.Subject == testNS+"/unsafe" {
			double = append(double, v)
		}
	}
	require.Len(t, double, 1, "the double run is recorded once, for its whole episode")
	require.Equal(t, []string{"w2", "w3"}, double[0].Nodes)
}

// TestInvariantRWOAttachedTwice: a second VolumeAttachment for an RWO
// volume, planted through the API on another node, is an RWOMultiAttach
// violation (recorded by the simulator as soon as it sees it, and reported
// by Check while it lasts) even though no second guest writes to it; an RWX
// volume attached to two nodes is fine.
func TestInvariantRWOAttachedTwice(t *testing.T) {
	s := startSim(t, Options{})
	ctx := ctxT(t)
	mustNode(t, s, "a1", NodeOptions{})
	mustPVC(t, s, "rwo", corev1.ReadWriteOnce)
	mustPVC(t, s, "rwx", corev1.ReadWriteMany)
	mustVM(t, s, "solo", VMOptions{Disk: "rwo"})
	mustVM(t, s, "shared", VMOptions{Disk: "rwx"})
	vmiRunning(t, s, "solo", 30*time.Second)
	vmiRunning(t, s, "shared", 30*time.Second)
	rwoPV, rwxPV := s.pvOf(testNS, "rwo"), s.pvOf(testNS, "rwx")
	require.NotEmpty(t, rwoPV)
	require.NotEmpty(t, rwxPV)
	// a dead node keeps its attachments: what is planted there stays
	mustNode(t, s, "a2", NodeOptions{})
	require.NoError(t, s.SetFault(ctx, "a2", FaultDown))
	eventually(t, 10*time.Second, "a2 down", func() (bool, string) {
		return s.NodeState("a2") == NodeDown, string(s.NodeState("a2"))
	})
	require.NoError(t, s.Check())
	require.Empty(t, s.Violations())

	plant := func(name, pv string) {
		t.Helper()
		_, err := s.Kube.StorageV1().VolumeAttachments().Create(ctx, &storagev1.VolumeAttachment{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: storagev1.VolumeAttachmentSpec{
				Attacher: csiDriver, NodeName: "a2",
				Source: storagev1.VolumeAttachmentSource{PersistentVolumeName: &pv},
			},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		eventually(t, 10*time.Second, "the cache shows "+name, func() (bool, string) {
			return len(s.vasFor(byVAPV, pv)) == 2, fmt.Sprintf("%d attachments", len(s.vasFor(byVAPV, pv)))
		})
	}

	plant("planted-rwx", rwxPV)
	require.NoError(t, s.Check(), "RWX may be attached to two nodes")

	plant("planted-rwo", rwoPV)
	var recorded Violation
	eventually(t, 10*time.Second, "the simulator records the double attachment", func() (bool, string) {
		for _, v := range s.Violations() {
			if v.Kind == RWOMultiAttach {
				recorded = v
				return true, ""
			}
		}
		return false, "none"
	})
	require.Equal(t, testNS+"/rwo", recorded.Subject)
	require.Equal(t, []string{"a1", "a2"}, recorded.Nodes)
	err := s.Check()
	require.Error(t, err)
	require.True(t, errors.Is(err, ErrInvariant))
	require.Contains(t, err.Error(), string(RWOMultiAttach)+" "+testNS+"/rwo")
	require.NotContains(t, err.Error(), testNS+"/rwx")
	require.NotContains(t, err.Error(), string(DoubleRun))

	require.NoError(t, s.Kube.StorageV1().VolumeAttachments().Delete(ctx, "planted-rwo", metav1.DeleteOptions{}))
	eventually(t, 10*time.Second, "Check passes once the attachment is gone", func() (bool, string) {
		err := s.Check()
		return err == nil, fmt.Sprint(err)
	})
	v := s.Violations()
	require.Len(t, v, 1, "one episode, recorded once: %v", v)
	require.Equal(t, RWOMultiAttach, v[0].Kind)
}
