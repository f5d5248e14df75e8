package sim

// KubeVirt's migration controller (pkg/virt-controller/watch/migration/migration.go), which
// acts while virt-controller runs, and the two virt-handlers of a migration. What drover meets:
//   - a Pending migration takes a slot within parallelMigrationsPerCluster and
//     parallelOutboundMigrationsPerNode when it looks; without a slot it looks again after 5 s
//     (1 s while a target pod it created is not in its cache yet), and nothing wakes it earlier
//     when a slot frees up: which Pending migration gets a free slot is arbitrary;
//   - the migration object's status.migrationState holds only sourcePod until the migration
//     ends; the VMI's status.migrationState has the details while it runs;
//   - a migration whose source node dies after hand-off hangs in its phase, holding its slot,
//     as no virt-handler reports on it: there is no timeout after hand-off;
//   - deleting a migration cancels it before hand-off and asks the source virt-handler to
//     abort it after: the abort can lose the race against the end of the transfer (abortStatus
//     Failed, the migration Succeeded, the VM moved);
//   - a migration whose VMI is gone is deleted, and at most 5 finished migrations per VMI are
//     kept.

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

const (
	// migrationRequeueDelay is how long a Pending migration without a free slot waits before it
	// looks again (handleTargetPodCreation without the MigrationPriorityQueue gate).
	migrationRequeueDelay = 5 * time.Second
	// migrationCreationGate is how long a Pending migration waits while a target pod the
	// controller created is not in its cache yet (podExpectations), or while its VMI still has
	// another live launcher pod (VMIActivePodsCount > 1).
	migrationCreationGate = time.Second
	// creationExpectationTTL forgets a target pod creation never seen (KubeVirt's expectations
	// expire after 5 minutes; the simulator's cache sees its own creates far sooner).
	creationExpectationTTL = 30 * time.Second
	// finishedMigrationsKept is defaultFinalizedMigrationGarbageCollectionBuffer.
	finishedMigrationsKept = 5
)

// migrationState is the migration controller's memory: which migrations hold a slot (they
// have a target pod), when each last changed phase (the API's timestamps have whole seconds
// only, too coarse at high time scales), the target pods it created and has not seen yet, and
// what the source virt-handler decided for aborts.
type migrationState struct {
	mu       sync.Mutex
	inflight map[types.UID]inflightMigration
	since    map[types.UID]time.Time
	creating map[types.UID]podCreation // target pods created and not seen yet, by migration
	aborts   map[types.UID]abortDecision
	loaded   bool
	// beforeHandover, when set (by tests, under mu), runs after the checks
	// of a handover and before it takes the nodes' locks: the window in
	// which a node can go down.
	beforeHandover func(m *kvv1.VirtualMachineInstanceMigration, source, target string)
}

type inflightMigration struct {
	key    string
	vmi    string
	source string
}

type podCreation struct {
	pod string // namespace/name
	at  time.Time
}

// abortDecision is what the source virt-handler makes of an abort request: it takes effect
// after a MigrationStepDuration, unless the transfer ends first (lost).
type abortDecision struct {
	at   time.Time
	lost bool
}

func newMigrationState() *migrationState {
	return &migrationState{
		inflight: map[types.UID]inflightMigration{}, since: map[types.UID]time.Time{},
		creating: map[types.UID]podCreation{}, aborts: map[types.UID]abortDecision{},
	}
}

// MigrationConfig is the part of the KubeVirt CR's
// spec.configuration.migrations the simulator honours, defaults filled in.
type MigrationConfig struct {
	ParallelMigrationsPerCluster      int
	ParallelOutboundMigrationsPerNode int
	// BandwidthPerMigration in bytes per second (Options.MigrationBandwidth when unset).
	BandwidthPerMigration   int64
	ProgressTimeout         time.Duration
	CompletionTimeoutPerGiB time.Duration
}

// MigrationConfig reads the migration limits from the KubeVirt CR.
func (s *Simulator) MigrationConfig() MigrationConfig {
	c := MigrationConfig{
		ParallelMigrationsPerCluster: 5, ParallelOutboundMigrationsPerNode: 2,
		BandwidthPerMigration: s.opts.MigrationBandwidth,
		ProgressTimeout:       150 * time.Second, CompletionTimeoutPerGiB: 150 * time.Second,
	}
	objs := s.kvInformer.GetStore().List()
	sort.Slice(objs, func(i, j int) bool { return keyOf(objs[i].(*kvv1.KubeVirt)) < keyOf(objs[j].(*kvv1.KubeVirt)) })
	// Like KubeVirt, one CR configures the cluster: the first by name wins.
	if len(objs) == 0 {
		return c
	}
	m := objs[0].(*kvv1.KubeVirt).Spec.Configuration.MigrationConfiguration
	if m == nil {
		return c
	}
	if m.ParallelMigrationsPerCluster != nil {
		c.ParallelMigrationsPerCluster = int(*m.ParallelMigrationsPerCluster)
	}
	if m.ParallelOutboundMigrationsPerNode != nil {
		c.ParallelOutboundMigrationsPerNode = int(*m.ParallelOutboundMigrationsPerNode)
	}
	if m.BandwidthPerMigration != nil && !m.BandwidthPerMigration.IsZero() {
		c.BandwidthPerMigration = m.BandwidthPerMigration.Value()
	}
	if m.ProgressTimeout != nil {
		c.ProgressTimeout = time.Duration(*m.ProgressTimeout) * time.Second
	}
	if m.CompletionTimeoutPerGiB != nil {
		c.CompletionTimeoutPerGiB = time.Duration(*m.CompletionTimeoutPerGiB) * time.Second
	}
	return c
}

// ensureKubeVirtCR creates the KubeVirt CR kubevirt/kubevirt when the
// cluster has none, as installing KubeVirt does.
func (s *Simulator) ensureKubeVirtCR(ctx context.Context) error {
	list, err := s.KubeVirt.KubeVirts(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("sim: list KubeVirt CRs: %w", err)
	}
	if len(list.Items) > 0 {
		return nil
	}
	if err := s.ensureNamespace(ctx, s.opts.KubeVirtNamespace); err != nil {
		return err
	}
	kv := &kvv1.KubeVirt{ObjectMeta: metav1.ObjectMeta{Name: kubevirtCRName, Namespace: s.opts.KubeVirtNamespace}}
	if _, err := s.KubeVirt.KubeVirts(s.opts.KubeVirtNamespace).Create(ctx, kv, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("sim: create KubeVirt CR: %w", err)
	}
	return nil
}

func isMigrationFinal(m *kvv1.VirtualMachineInstanceMigration) bool {
	return m.Status.Phase == kvv1.MigrationSucceeded || m.Status.Phase == kvv1.MigrationFailed
}

func (s *Simulator) runMigrations(ctx context.Context) error {
	// admission takes and checks a slot under one lock, so workers can run
	// in parallel; the queue never hands one migration to two workers
	return s.runWorkers(ctx, "migration", s.migrationQueue, 4, s.syncMigration)
}

// load rebuilds the in-flight set from the API after a (re)start.
func (ms *migrationState) load(s *Simulator) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if ms.loaded {
		return
	}
	ms.loaded = true
	for _, o := range s.vmimInformer.GetStore().List() {
		m := o.(*kvv1.VirtualMachineInstanceMigration)
		switch m.Status.Phase {
		case kvv1.MigrationScheduling, kvv1.MigrationScheduled, kvv1.MigrationPreparingTarget, kvv1.MigrationTargetReady, kvv1.MigrationRunning:
			src := ""
			if vmi := s.getVMI(m.Namespace + "/" + m.Spec.VMIName); vmi != nil {
				src = vmi.Status.NodeName
				if st := vmi.Status.MigrationState; st != nil && st.MigrationUID == m.UID {
					src = st.SourceNode
				}
			}
			ms.inflight[m.UID] = inflightMigration{key: keyOf(m), vmi: m.Namespace + "/" + m.Spec.VMIName, source: src}
		}
	}
}

// release frees the slot of m. Pending migrations find it when they next look.
func (s *Simulator) release(m *kvv1.VirtualMachineInstanceMigration) {
	s.migration.mu.Lock()
	delete(s.migration.inflight, m.UID)
	delete(s.migration.since, m.UID)
	delete(s.migration.aborts, m.UID)
	delete(s.migration.creating, m.UID)
	s.migration.mu.Unlock()
}

// forget drops what the controller remembers of the migration key, gone from the API.
func (ms *migrationState) forget(key string) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	for uid, f := range ms.inflight {
		if f.key == key {
			delete(ms.inflight, uid)
			delete(ms.since, uid)
			delete(ms.aborts, uid)
			delete(ms.creating, uid)
		}
	}
}

// InFlightMigrations returns how many migrations hold a slot now, in the
// cluster and per source node.
func (s *Simulator) InFlightMigrations() (total int, perNode map[string]int) {
	s.migration.mu.Lock()
	defer s.migration.mu.Unlock()
	perNode = map[string]int{}
	for _, f := range s.migration.inflight {
		total++
		perNode[f.source]++
	}
	return total, perNode
}

func (s *Simulator) phaseSince(m *kvv1.VirtualMachineInstanceMigration) time.Time {
	s.migration.mu.Lock()
	t, ok := s.migration.since[m.UID]
	s.migration.mu.Unlock()
	if ok {
		return t
	}
	for _, ts := range m.Status.PhaseTransitionTimestamps {
		if ts.Phase == m.Status.Phase {
			t = ts.PhaseTransitionTimestamp.Time
		}
	}
	if t.IsZero() {
		t = s.clock.Now()
	}
	return t
}

func setMigrationPhase(m *kvv1.VirtualMachineInstanceMigration, phase kvv1.VirtualMachineInstanceMigrationPhase, now metav1.Time) bool {
	if m.Status.Phase == phase {
		return false
	}
	m.Status.Phase = phase
	m.Status.PhaseTransitionTimestamps = append(m.Status.PhaseTransitionTimestamps, kvv1.VirtualMachineInstanceMigrationPhaseTransitionTimestamp{Phase: phase, PhaseTransitionTimestamp: now})
	return true
}

// setPhase moves m from phase from to phase to, and sets its status.migrationState to state
// when not nil (the source pod when it becomes Pending, the final state when it ends).
func (s *Simulator) setPhase(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, from, to kvv1.VirtualMachineInstanceMigrationPhase, state *kvv1.VirtualMachineInstanceMigrationState) error {
	now := s.now()
	changed := false
	_, err := s.mutateVMIM(ctx, m.Namespace, m.Name, true, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
		changed = false
		if cur.UID != m.UID || cur.Status.Phase != from {
			return false
		}
		setMigrationPhase(cur, to, now)
		if state != nil {
			cur.Status.MigrationState = state.DeepCopy()
		}
		changed = true
		return true
	})
	if err != nil {
		return fmt.Errorf("migration %s: %s -> %s: %w", keyOf(m), from, to, err)
	}
	if !changed {
		return nil // another sync moved it already
	}
	s.migration.mu.Lock()
	s.migration.since[m.UID] = s.clock.Now()
	s.migration.mu.Unlock()
	s.log.Info().Str("migration", keyOf(m)).Str("vmi", m.Spec.VMIName).Str("phase", string(to)).Msg("migration phase")
	s.migrationQueue.Add(keyOf(m))
	return nil
}

func targetPodName(vmiName string, vmiUID, mUID types.UID) string {
	return launcherPodName(vmiName, string(vmiUID)+"/"+string(mUID))
}

// syncMigration plays KubeVirt's migration controller and the two
// virt-handlers: it admits migrations within the KubeVirt CR's limits,
// schedules a target pod, walks the phases, transfers the guest in a time
// derived from its memory and the bandwidth, and hands the guest over. A
// migration deleted before it ends is cancelled or aborted. It works for
// every VirtualMachineInstanceMigration, whoever created it.
func (s *Simulator) syncMigration(ctx context.Context, key string) error {
	s.migration.load(s)
	m := s.getVMIM(key)
	if m == nil {
		s.migration.forget(key)
		return nil
	}
	if !s.virtControllerActive() {
		return nil // a new leader resyncs every migration
	}
	vmi := s.getVMI(m.Namespace + "/" + m.Spec.VMIName)
	if vmi == nil {
		return s.migrationOfGoneVMI(ctx, m)
	}
	if m.DeletionTimestamp != nil {
		return s.abortMigration(ctx, m, vmi)
	}
	if isMigrationFinal(m) {
		s.release(m)
		s.deleteTargetPod(ctx, m, vmi)
		if err := s.dropMigrationFinalizer(ctx, m); err != nil {
			return err
		}
		return s.collectFinishedMigrations(ctx, vmi)
	}
	if m.Status.Phase == kvv1.MigrationPhaseUnset {
		return s.acceptMigration(ctx, m, vmi)
	}
	if vmi.DeletionTimestamp != nil || vmiFinal(vmi) {
		return s.failMigration(ctx, m, vmi, fmt.Sprintf("Migration failed: VMI %s/%s is not running", m.Namespace, m.Spec.VMIName))
	}
	switch m.Status.Phase {
	case kvv1.MigrationPending:
		return s.admitMigration(ctx, m, vmi)
	case kvv1.MigrationScheduling:
		return s.migrationScheduling(ctx, m, vmi)
	case kvv1.MigrationScheduled, kvv1.MigrationPreparingTarget, kvv1.MigrationTargetReady:
		return s.migrationPrepare(ctx, m, vmi)
	case kvv1.MigrationRunning:
		return s.migrationRunning(ctx, m, vmi)
	}
	return nil
}

// migrationOfGoneVMI is execute's "Deleting migration for deleted vmi". A migration already
// being deleted loses its finalizer, which KubeVirt would leave: its migrations end before
// their VMI goes, a race the simulator's caches can lose.
func (s *Simulator) migrationOfGoneVMI(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration) error {
	_, err := s.kv.VirtualMachineInstances(m.Namespace).Get(ctx, m.Spec.VMIName, metav1.GetOptions{})
	if err == nil || !apierrors.IsNotFound(err) {
		return err // the cache lags behind; the VMI's events bring us back
	}
	s.release(m)
	if m.DeletionTimestamp != nil {
		return s.dropMigrationFinalizer(ctx, m)
	}
	uid := m.UID
	err = s.kv.VirtualMachineInstanceMigrations(m.Namespace).Delete(ctx, m.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("migration %s: delete, its vmi is gone: %w", keyOf(m), err)
	}
	s.log.Info().Str("migration", keyOf(m)).Str("vmi", m.Spec.VMIName).Msg("deleted migration of a deleted vmi")
	return nil
}

// acceptMigration is the first pass over a new migration: the selector label (execute's
// ensureSelectorLabelPresent), then Pending with its source pod (SetSourcePod), or Failed when
// another unfinished migration owns the VMI's migration state (canMigrateVMI).
func (s *Simulator) acceptMigration(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) error {
	if m.Labels[kvv1.MigrationSelectorLabel] != m.Spec.VMIName {
		if _, err := s.mutateVMIM(ctx, m.Namespace, m.Name, false, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
			if cur.Labels == nil {
				cur.Labels = map[string]string{}
			}
			cur.Labels[kvv1.MigrationSelectorLabel] = cur.Spec.VMIName
			return true
		}); err != nil {
			return fmt.Errorf("migration %s: add selector label: %w", keyOf(m), err)
		}
	}
	if st := vmi.Status.MigrationState; st != nil && st.MigrationUID != "" && st.MigrationUID != m.UID {
		for _, other := range s.migrationsForVMI(m.Namespace, m.Spec.VMIName) {
			if other.UID == st.MigrationUID && !isMigrationFinal(other) {
				return s.failMigration(ctx, m, vmi, "VMI is not eligible for migration because another migration job is in progress.")
			}
		}
	}
	state := &kvv1.VirtualMachineInstanceMigrationState{}
	if p := activePod(vmi, s.mustLaunchers(vmi)); p != nil {
		state.SourcePod = p.Name
	}
	return s.setPhase(ctx, m, kvv1.MigrationPhaseUnset, kvv1.MigrationPending, state)
}

// admitMigration is handleTargetPodCreation: within the limits, the migration takes a slot and
// gets its target pod; otherwise it looks again later.
func (s *Simulator) admitMigration(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) error {
	if vmi.Status.Phase != kvv1.Running {
		return nil // no target pod for a VMI that does not run; its events bring us back
	}
	if c := vmiCondition(vmi, kvv1.VirtualMachineInstanceIsMigratable); c != nil && c.Status == corev1.ConditionFalse {
		return s.failMigration(ctx, m, vmi, fmt.Sprintf("Cannot migrate VMI, Reason: %s, Message: %s", c.Reason, c.Message))
	}
	cfg := s.MigrationConfig()
	source := vmi.Status.NodeName
	key := keyOf(m)
	live := 0
	for _, p := range s.mustLaunchers(vmi) {
		if !isTerminal(p) {
			live++
		}
	}
	podName := targetPodName(vmi.Name, vmi.UID, m.UID)
	now := s.clock.Now()
	ms := s.migration
	ms.mu.Lock()
	for uid, c := range ms.creating {
		if s.getPod(c.pod) != nil || now.Sub(c.at) > creationExpectationTTL {
			delete(ms.creating, uid)
		}
	}
	if len(ms.creating) > 0 || live > 1 {
		ms.mu.Unlock()
		s.migrationQueue.AddAfter(key, s.scaled(migrationCreationGate))
		return nil
	}
	total, perNode := 0, 0
	for uid, f := range ms.inflight {
		cur := s.getVMIM(f.key)
		if cur == nil || cur.UID != uid {
			// gone behind our back
			delete(ms.inflight, uid)
			continue
		}
		if f.vmi == keyOf(vmi) {
			ms.mu.Unlock()
			s.migrationQueue.AddAfter(key, s.scaled(migrationCreationGate))
			return nil // one migration per VMI at a time
		}
		total++
		if f.source == source {
			perNode++
		}
	}
	if total >= cfg.ParallelMigrationsPerCluster || perNode >= cfg.ParallelOutboundMigrationsPerNode {
		ms.mu.Unlock()
		// Nothing wakes a waiting migration when a slot frees up: whichever looks first
		// after that takes it, in no particular order.
		s.migrationQueue.AddAfter(key, s.scaled(migrationRequeueDelay))
		return nil
	}
	ms.inflight[m.UID] = inflightMigration{key: key, vmi: keyOf(vmi), source: source}
	ms.creating[m.UID] = podCreation{pod: m.Namespace + "/" + podName, at: now}
	ms.mu.Unlock()

	if err := s.ensureServiceAccount(ctx, m.Namespace); err != nil {
		s.release(m)
		return err
	}
	pod := newLauncherPod(vmi, m, source)
	pod.Name = podName
	if _, err := s.Kube.CoreV1().Pods(m.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		s.release(m)
		return fmt.Errorf("migration %s: create target pod: %w", key, err)
	}
	return s.setPhase(ctx, m, kvv1.MigrationPending, kvv1.MigrationScheduling, nil)
}

func (s *Simulator) mustLaunchers(vmi *kvv1.VirtualMachineInstance) []*corev1.Pod {
	mine, _ := s.launcherPods(vmi)
	return mine
}

func (s *Simulator) migrationScheduling(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) error {
	name := targetPodName(vmi.Name, vmi.UID, m.UID)
	pod := s.getPod(m.Namespace + "/" + name)
	if pod == nil {
		if _, err := s.Kube.CoreV1().Pods(m.Namespace).Get(ctx, name, metav1.GetOptions{}); err == nil || !apierrors.IsNotFound(err) {
			return err // the cache lags behind our create
		}
		return s.failMigration(ctx, m, vmi, "Migration failed: target pod was deleted")
	}
	if isTerminal(pod) || pod.DeletionTimestamp != nil {
		return s.failMigration(ctx, m, vmi, "Migration failed: target pod ended")
	}
	s.migration.mu.Lock()
	delete(s.migration.creating, m.UID) // seen
	s.migration.mu.Unlock()
	if pod.Status.Phase == corev1.PodRunning {
		return s.setPhase(ctx, m, kvv1.MigrationScheduling, kvv1.MigrationScheduled, nil)
	}
	timeout := s.scaled(15 * time.Minute) // KubeVirt's catch-all for a pending target pod
	msg := fmt.Sprintf("Migration target pod for VMI [%s] was still pending", keyOf(vmi))
	if pod.Spec.NodeName == "" {
		timeout = s.scaled(s.opts.MigrationUnschedulableTimeout)
		msg = fmt.Sprintf("Migration target pod for VMI [%s] is currently unschedulable.", keyOf(vmi))
	}
	left := timeout - s.clock.Now().Sub(s.phaseSince(m))
	if left > 0 {
		s.migrationQueue.AddAfter(keyOf(m), left)
		return nil
	}
	return s.failMigration(ctx, m, vmi, msg)
}

// migrationPrepare walks Scheduled -> PreparingTarget -> TargetReady -> Running, one
// MigrationStepDuration each: virt-controller hands the migration off to the virt-handlers
// (the VMI's status.migrationState and migration target label, handleTargetPodHandoff), the
// target virt-handler prepares the target, the source virt-handler starts the transfer.
func (s *Simulator) migrationPrepare(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) error {
	why, hang := s.migrationBroken(m, vmi)
	if why != "" {
		return s.failMigration(ctx, m, vmi, why)
	}
	if hang {
		return nil // the node's return brings us back
	}
	left := s.scaled(s.opts.MigrationStepDuration) - s.clock.Now().Sub(s.phaseSince(m))
	if left > 0 {
		s.migrationQueue.AddAfter(keyOf(m), left)
		return nil
	}
	target := s.getPod(m.Namespace + "/" + targetPodName(vmi.Name, vmi.UID, m.UID))
	if target == nil {
		return s.failMigration(ctx, m, vmi, "Migration failed: target pod is gone")
	}
	now := s.now()
	var next kvv1.VirtualMachineInstanceMigrationPhase
	var edit func(*kvv1.VirtualMachineInstanceMigrationState)
	switch m.Status.Phase {
	case kvv1.MigrationScheduled:
		next = kvv1.MigrationPreparingTarget
		sourcePod := ""
		if m.Status.MigrationState != nil {
			sourcePod = m.Status.MigrationState.SourcePod
		}
		edit = func(st *kvv1.VirtualMachineInstanceMigrationState) {
			*st = kvv1.VirtualMachineInstanceMigrationState{
				MigrationUID: m.UID, SourceNode: vmi.Status.NodeName, SourcePod: sourcePod,
				TargetNode: target.Spec.NodeName, TargetPod: target.Name, Mode: kvv1.MigrationPreCopy,
			}
		}
	case kvv1.MigrationPreparingTarget:
		next = kvv1.MigrationTargetReady
		edit = func(st *kvv1.VirtualMachineInstanceMigrationState) {
			st.TargetNodeAddress = target.Status.PodIP
			st.TargetNodeDomainDetected = true
			st.TargetNodeDomainReadyTimestamp = &now
		}
	case kvv1.MigrationTargetReady:
		next = kvv1.MigrationRunning
		edit = func(st *kvv1.VirtualMachineInstanceMigrationState) { st.StartTimestamp = &now }
	}
	if err := s.setVMIMigrationState(ctx, vmi, m, edit); err != nil {
		return err
	}
	if next == kvv1.MigrationPreparingTarget {
		if _, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, func(v *kvv1.VirtualMachineInstance) bool {
			if v.Labels[kvv1.MigrationTargetNodeNameLabel] == target.Spec.NodeName {
				return false
			}
			if v.Labels == nil {
				v.Labels = map[string]string{}
			}
			v.Labels[kvv1.MigrationTargetNodeNameLabel] = target.Spec.NodeName
			return true
		}); err != nil {
			return fmt.Errorf("migration %s: label vmi: %w", keyOf(m), err)
		}
	}
	return s.setPhase(ctx, m, m.Status.Phase, next, nil)
}

// migrationBroken says why a migration cannot go on (a pod or node of it died: the simulator
// knows, virt-controller or a virt-handler would notice), or that it hangs: its source node is
// dead once the source virt-handler has a part to play (TargetReady on), and nobody reports
// anything about it.
func (s *Simulator) migrationBroken(m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) (why string, hang bool) {
	target := s.getPod(m.Namespace + "/" + targetPodName(vmi.Name, vmi.UID, m.UID))
	if target == nil || isTerminal(target) || target.DeletionTimestamp != nil {
		return "Migration failed: target pod is gone", false
	}
	if s.truth.running(target.UID) {
		return "", false // the guest moved; completeMigration finishes the handover
	}
	source := vmi.Status.NodeName
	if st := vmi.Status.MigrationState; st != nil && st.MigrationUID == m.UID && st.SourceNode != "" {
		source = st.SourceNode
	}
	if !s.nodes.kubeletAlive(source) {
		return "", m.Status.Phase == kvv1.MigrationTargetReady || m.Status.Phase == kvv1.MigrationRunning
	}
	if !s.nodes.kubeletAlive(target.Spec.NodeName) {
		return fmt.Sprintf("Migration failed: target node %s is not responding", target.Spec.NodeName), false
	}
	src := activePod(vmi, s.mustLaunchers(vmi))
	if src == nil || !s.truth.running(src.UID) {
		return "Migration failed: source guest is not running", false
	}
	return "", false
}

func dirtyRate(vmi *kvv1.VirtualMachineInstance) int64 {
	v := vmi.Annotations[AnnotationDirtyRate]
	if v == "" {
		return 0
	}
	q, err := resource.ParseQuantity(v)
	if err != nil {
		return 0
	}
	return q.Value()
}

// MigrationPlan is how a migration of a guest will end and when.
type MigrationPlan struct {
	Converges bool
	// Duration is the simulated time until it completes, or fails when it
	// does not converge.
	Duration time.Duration
	Reason   string
}

// PlanMigration computes how a migration of vmi will go: the guest memory
// over the bandwidth left after the dirty rate; no progress at all fails
// after progressTimeout, a transfer longer than completionTimeoutPerGiB x
// GiB fails at that timeout.
func (s *Simulator) PlanMigration(vmi *kvv1.VirtualMachineInstance) MigrationPlan {
	cfg := s.MigrationConfig()
	mem := vmiGuestMemory(vmi)
	eff := cfg.BandwidthPerMigration - dirtyRate(vmi)
	if eff <= 0 {
		return MigrationPlan{Duration: cfg.ProgressTimeout, Reason: fmt.Sprintf("Live migration stuck for %d seconds and has been aborted", int(cfg.ProgressTimeout/time.Second))}
	}
	d := time.Duration(float64(mem) / float64(eff) * float64(time.Second))
	gib := max(float64(mem)/float64(1<<30), 1)
	limit := time.Duration(gib * float64(cfg.CompletionTimeoutPerGiB))
	if d > limit {
		return MigrationPlan{Duration: limit, Reason: fmt.Sprintf("Live migration is not completed after %d seconds and has been aborted", int(limit/time.Second))}
	}
	return MigrationPlan{Converges: true, Duration: d}
}

func (s *Simulator) migrationRunning(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) error {
	why, hang := s.migrationBroken(m, vmi)
	if why != "" {
		return s.failMigration(ctx, m, vmi, why)
	}
	if hang {
		return nil // the node's return brings us back
	}
	plan := s.PlanMigration(vmi)
	left := s.scaled(plan.Duration) - s.clock.Now().Sub(s.phaseSince(m))
	if left > 0 {
		s.migrationQueue.AddAfter(keyOf(m), left)
		return nil
	}
	if !plan.Converges {
		return s.failMigration(ctx, m, vmi, plan.Reason)
	}
	return s.completeMigration(ctx, m, vmi)
}

func (s *Simulator) completeMigration(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) error {
	// The handover has effects beyond the API (the guest moves): make sure
	// the cache did not hand us a migration that has already completed.
	fresh, err := s.kv.VirtualMachineInstanceMigrations(m.Namespace).Get(ctx, m.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("migration %s: %w", keyOf(m), err)
	}
	if fresh.UID != m.UID || fresh.Status.Phase != kvv1.MigrationRunning || (fresh.DeletionTimestamp != nil && !s.abortLost(m)) {
		s.migrationQueue.Add(keyOf(m))
		return nil
	}
	m = fresh
	st := vmi.Status.MigrationState
	if st == nil || st.MigrationUID != m.UID {
		return s.failMigration(ctx, m, vmi, "VMI's migration state was cleared during the active migration.")
	}
	target := s.getPod(m.Namespace + "/" + st.TargetPod)
	var source *corev1.Pod
	if st.SourcePod != "" {
		source = s.getPod(m.Namespace + "/" + st.SourcePod)
	}
	if source == nil {
		source = activePod(vmi, s.mustLaunchers(vmi))
	}
	if target == nil {
		return s.failMigration(ctx, m, vmi, "Migration failed: lost a pod at handoff")
	}
	// Migration target pods never start a guest of their own: a guest in
	// the target pod means an earlier attempt moved it and then failed to
	// update the VMI; finish that handover rather than fail it.
	resumed := s.truth.running(target.UID)
	if !resumed && (source == nil || source.UID == target.UID || !s.truth.running(source.UID)) {
		return s.failMigration(ctx, m, vmi, "Migration failed: lost a pod at handoff")
	}
	srcNode, dstNode := st.SourceNode, target.Spec.NodeName
	if !resumed {
		srcNode = source.Spec.NodeName
	}
	s.migration.mu.Lock()
	hook := s.migration.beforeHandover
	s.migration.mu.Unlock()
	if hook != nil && !resumed {
		hook(m, srcNode, dstNode)
	}
	// The guest moves and the VMI follows under both nodes' locks: neither
	// node's hardware can change state nor its kubelet act in between (a
	// source kubelet seeing its guest gone would complete the source pod
	// while the VMI still points at it).
	unlock := s.lockNodes(srcNode, dstNode)
	if !resumed {
		why := ""
		switch {
		case !s.nodes.kubeletAlive(srcNode):
			why = fmt.Sprintf("Migration failed: source node %s lost during handover", srcNode)
		case !s.nodes.kubeletAlive(dstNode):
			why = fmt.Sprintf("Migration failed: target node %s lost during handover", dstNode)
		case !s.truth.move(source.UID, s.guestFor(target)):
			why = "Migration failed: source guest lost during handover"
		}
		if why != "" {
			unlock()
			return s.failMigration(ctx, m, vmi, why)
		}
	}
	now := s.now()
	var final kvv1.VirtualMachineInstanceMigrationState
	// 1. the guest has moved, in one step; 2. the VMI points at the target...
	_, err = s.mutateVMI(ctx, vmi.Namespace, vmi.Name, func(v *kvv1.VirtualMachineInstance) bool {
		if v.UID != vmi.UID {
			return false
		}
		if v.Status.MigrationState == nil || v.Status.MigrationState.MigrationUID != m.UID {
			v.Status.MigrationState = st.DeepCopy()
		}
		ms := v.Status.MigrationState
		ms.Completed = true
		ms.EndTimestamp = &now
		if ms.AbortRequested {
			ms.AbortStatus = kvv1.MigrationAbortFailed // the abort came too late
		}
		v.Status.NodeName = dstNode
		v.Status.EvacuationNodeName = "" // virt-handler's ackMigrationCompletion (migration-target.go)
		final = *ms
		return true
	})
	unlock()
	s.kubeletQueue.Add(srcNode)
	s.kubeletQueue.Add(dstNode)
	if err != nil {
		// the guest runs in the target pod: the retry resumes the handover
		return fmt.Errorf("migration %s: hand over vmi: %w", keyOf(m), err)
	}
	// 3. ...and the VMI's labels and the migration follow.
	if _, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, func(v *kvv1.VirtualMachineInstance) bool {
		if v.Labels == nil {
			v.Labels = map[string]string{}
		}
		v.Labels[kvv1.NodeNameLabel] = dstNode
		delete(v.Labels, kvv1.MigrationTargetNodeNameLabel)
		return true
	}); err != nil {
		return fmt.Errorf("migration %s: relabel vmi: %w", keyOf(m), err)
	}
	s.log.Info().Str("vmi", keyOf(vmi)).Str("from", srcNode).Str("to", dstNode).Bool("abortLost", final.AbortRequested).Msg("migration succeeded")
	err = s.setPhase(ctx, m, kvv1.MigrationRunning, kvv1.MigrationSucceeded, &final)
	s.release(m)
	return err
}

// lockNodes takes the locks of nodes a and b (see nodeStates.lock) in
// name order, so two handovers between the same nodes cannot deadlock,
// and returns the func that releases them.
func (s *Simulator) lockNodes(a, b string) func() {
	if a == b {
		return s.nodes.lock(a)
	}
	if b < a {
		a, b = b, a
	}
	ua := s.nodes.lock(a)
	ub := s.nodes.lock(b)
	return func() { ub(); ua() }
}

// setVMIMigrationState edits the VMI's migrationState for migration m.
func (s *Simulator) setVMIMigrationState(ctx context.Context, vmi *kvv1.VirtualMachineInstance, m *kvv1.VirtualMachineInstanceMigration, f func(*kvv1.VirtualMachineInstanceMigrationState)) error {
	_, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, func(v *kvv1.VirtualMachineInstance) bool {
		if v.UID != vmi.UID {
			return false
		}
		if v.Status.MigrationState == nil || v.Status.MigrationState.MigrationUID != m.UID {
			v.Status.MigrationState = &kvv1.VirtualMachineInstanceMigrationState{MigrationUID: m.UID}
		}
		f(v.Status.MigrationState)
		return true
	})
	if err != nil {
		return fmt.Errorf("migration %s: update vmi migrationState: %w", keyOf(m), err)
	}
	return nil
}

// failMigration ends m as Failed. A migration handed off to the virt-handlers has the failure
// on the VMI's migrationState, which becomes the migration's; one that failed before (target
// unschedulable, cancelled) keeps its source pod and gets the reason there too, where KubeVirt
// only records an event.
func (s *Simulator) failMigration(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance, reason string) error {
	// Failing rewrites the VMI's migrationState and removes the target pod:
	// make sure the cache did not hand us a migration that already ended.
	fresh, err := s.kv.VirtualMachineInstanceMigrations(m.Namespace).Get(ctx, m.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("migration %s: %w", keyOf(m), err)
	}
	if fresh.UID != m.UID || isMigrationFinal(fresh) || fresh.Status.Phase != m.Status.Phase {
		s.migrationQueue.Add(keyOf(m))
		return nil
	}
	if vmi != nil {
		if cur, err := s.kv.VirtualMachineInstances(vmi.Namespace).Get(ctx, vmi.Name, metav1.GetOptions{}); err == nil {
			vmi = cur
		}
	}
	now := s.now()
	var final *kvv1.VirtualMachineInstanceMigrationState
	if vmi != nil && vmi.Status.MigrationState != nil && vmi.Status.MigrationState.MigrationUID == m.UID && !vmiFinal(vmi) {
		if err := s.setVMIMigrationState(ctx, vmi, m, func(ms *kvv1.VirtualMachineInstanceMigrationState) {
			ms.Completed, ms.Failed, ms.EndTimestamp, ms.FailureReason = true, true, &now, reason
			final = ms.DeepCopy()
		}); err != nil {
			return err
		}
		if err := s.unlabelMigrationTarget(ctx, vmi, m); err != nil {
			return err
		}
	} else {
		final = fresh.Status.MigrationState.DeepCopy()
		if final == nil {
			final = &kvv1.VirtualMachineInstanceMigrationState{}
		}
		final.Completed, final.Failed, final.EndTimestamp, final.FailureReason = true, true, &now, reason
	}
	s.deleteTargetPod(ctx, m, vmi)
	_, err = s.mutateVMIM(ctx, m.Namespace, m.Name, true, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
		if cur.UID != m.UID || isMigrationFinal(cur) {
			return false
		}
		setMigrationPhase(cur, kvv1.MigrationFailed, now)
		cur.Status.MigrationState = final
		return true
	})
	if err != nil {
		return fmt.Errorf("migration %s: set Failed: %w", keyOf(m), err)
	}
	s.log.Info().Str("migration", keyOf(m)).Str("vmi", m.Spec.VMIName).Str("reason", reason).Msg("migration failed")
	s.release(m)
	return nil
}

func (s *Simulator) deleteTargetPod(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) {
	for _, p := range s.podsBy(byVMI, m.Namespace+"/"+m.Spec.VMIName) {
		if p.Labels[kvv1.MigrationJobLabel] != string(m.UID) || p.DeletionTimestamp != nil {
			continue
		}
		if s.truth.running(p.UID) {
			continue // the guest moved in: it is the VMI's pod now
		}
		s.deletePod(ctx, p, ptr.To(int64(0)))
	}
}

// abortLost reports that the source virt-handler found migration m too far along to abort it.
func (s *Simulator) abortLost(m *kvv1.VirtualMachineInstanceMigration) bool {
	s.migration.mu.Lock()
	defer s.migration.mu.Unlock()
	return s.migration.aborts[m.UID].lost
}

// abortMigration handles a migration deleted before it ended. Before hand-off it is cancelled:
// its target pod goes and it fails (handlePreHandoffMigrationCancel). After hand-off
// virt-controller asks the source virt-handler to abort it (abortRequested on the VMI's
// migrationState, markMigrationAbortInVmiStatus), which takes a MigrationStepDuration: the
// source keeps running (abortStatus Succeeded), unless the transfer ends first, when the abort
// fails and the migration succeeds (abortStatus Failed). A dead source virt-handler does
// neither: the migration hangs. The finalizer goes once the migration has ended.
func (s *Simulator) abortMigration(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) error {
	if isMigrationFinal(m) {
		s.release(m)
		s.deleteTargetPod(ctx, m, vmi)
		return s.dropMigrationFinalizer(ctx, m)
	}
	ms := vmi.Status.MigrationState
	if ms == nil || ms.MigrationUID != m.UID || vmiFinal(vmi) {
		s.deleteTargetPod(ctx, m, vmi)
		if err := s.markMigrationFailedAborted(ctx, m, s.now()); err != nil {
			return err
		}
		s.release(m)
		return s.dropMigrationFinalizer(ctx, m)
	}
	sourceAlive := s.nodes.kubeletAlive(ms.SourceNode)
	if !ms.AbortRequested {
		now := s.clock.Now()
		lost := false
		if m.Status.Phase == kvv1.MigrationRunning {
			plan := s.PlanMigration(vmi)
			remaining := s.scaled(plan.Duration) - now.Sub(s.phaseSince(m))
			lost = plan.Converges && remaining <= s.scaled(s.opts.MigrationStepDuration)
		}
		if err := s.setVMIMigrationState(ctx, vmi, m, func(st *kvv1.VirtualMachineInstanceMigrationState) {
			st.AbortRequested = true
			if sourceAlive {
				st.AbortStatus = kvv1.MigrationAbortInProgress
			}
		}); err != nil {
			return err
		}
		if err := s.addAbortRequestedCondition(ctx, m); err != nil {
			return err
		}
		s.migration.mu.Lock()
		s.migration.aborts[m.UID] = abortDecision{at: now, lost: lost}
		s.migration.mu.Unlock()
		s.log.Info().Str("migration", keyOf(m)).Bool("lost", lost).Bool("sourceAlive", sourceAlive).Msg("migration deleted after hand-off: abort requested")
		s.migrationQueue.AddAfter(keyOf(m), s.scaled(s.opts.MigrationStepDuration))
		return nil
	}
	if !sourceAlive {
		return nil // nobody can abort it; the node's return brings us back
	}
	s.migration.mu.Lock()
	d, ok := s.migration.aborts[m.UID]
	if !ok { // decided before a restart of the simulator: the abort goes on
		d = abortDecision{at: s.clock.Now()}
		s.migration.aborts[m.UID] = d
	}
	s.migration.mu.Unlock()
	if d.lost && m.Status.Phase == kvv1.MigrationRunning {
		return s.migrationRunning(ctx, m, vmi)
	}
	if left := s.scaled(s.opts.MigrationStepDuration) - s.clock.Now().Sub(d.at); left > 0 {
		s.migrationQueue.AddAfter(keyOf(m), left)
		return nil
	}
	now := s.now()
	if err := s.setVMIMigrationState(ctx, vmi, m, func(st *kvv1.VirtualMachineInstanceMigrationState) {
		st.AbortStatus = kvv1.MigrationAbortSucceeded
		st.Completed, st.Failed, st.EndTimestamp = true, true, &now
		st.FailureReason = "Live migration aborted"
	}); err != nil {
		return err
	}
	if err := s.unlabelMigrationTarget(ctx, vmi, m); err != nil {
		return err
	}
	s.log.Info().Str("migration", keyOf(m)).Msg("migration aborted, source keeps running")
	s.deleteTargetPod(ctx, m, vmi)
	if err := s.markMigrationFailedAborted(ctx, m, now); err != nil {
		return err
	}
	s.release(m)
	return s.dropMigrationFinalizer(ctx, m)
}

// addAbortRequestedCondition is updateStatus's migrationAbortRequested condition of a deleted
// migration.
func (s *Simulator) addAbortRequestedCondition(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration) error {
	now := s.now()
	_, err := s.mutateVMIM(ctx, m.Namespace, m.Name, true, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
		if cur.UID != m.UID {
			return false
		}
		for _, c := range cur.Status.Conditions {
			if c.Type == kvv1.VirtualMachineInstanceMigrationAbortRequested {
				return false
			}
		}
		cur.Status.Conditions = append(cur.Status.Conditions, kvv1.VirtualMachineInstanceMigrationCondition{
			Type: kvv1.VirtualMachineInstanceMigrationAbortRequested, Status: corev1.ConditionTrue, Reason: "AbortRequested", Message: "migration deleted", LastTransitionTime: now,
		})
		return true
	})
	if err != nil {
		return fmt.Errorf("migration %s: mark abort requested: %w", keyOf(m), err)
	}
	return nil
}

// markMigrationFailedAborted ends a deleted migration as Failed, with the abort condition.
func (s *Simulator) markMigrationFailedAborted(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, now metav1.Time) error {
	if err := s.addAbortRequestedCondition(ctx, m); err != nil {
		return err
	}
	if _, err := s.mutateVMIM(ctx, m.Namespace, m.Name, true, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
		return cur.UID == m.UID && !isMigrationFinal(cur) && setMigrationPhase(cur, kvv1.MigrationFailed, now)
	}); err != nil {
		return fmt.Errorf("migration %s: mark aborted: %w", keyOf(m), err)
	}
	return nil
}

// dropMigrationFinalizer removes the finalizer of a migration that has ended or is being
// deleted (updateStatus: "Remove the finalizer ... if the migration has already completed").
func (s *Simulator) dropMigrationFinalizer(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration) error {
	if !hasFinalizer(m, kvv1.VirtualMachineInstanceMigrationFinalizer) {
		return nil
	}
	_, err := s.mutateVMIM(ctx, m.Namespace, m.Name, false, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
		return cur.UID == m.UID && removeFinalizer(cur, kvv1.VirtualMachineInstanceMigrationFinalizer)
	})
	if err != nil {
		return fmt.Errorf("migration %s: remove finalizer: %w", keyOf(m), err)
	}
	return nil
}

// collectFinishedMigrations is garbageCollectFinalizedMigrations: of the VMI's finished
// migrations, only the five most recent are kept.
func (s *Simulator) collectFinishedMigrations(ctx context.Context, vmi *kvv1.VirtualMachineInstance) error {
	var done []*kvv1.VirtualMachineInstanceMigration
	for _, m := range s.migrationsForVMI(vmi.Namespace, vmi.Name) {
		if isMigrationFinal(m) && m.DeletionTimestamp == nil {
			done = append(done, m)
		}
	}
	if len(done) <= finishedMigrationsKept {
		return nil
	}
	sort.Slice(done, func(i, j int) bool { // oldest first
		if !done[i].CreationTimestamp.Equal(&done[j].CreationTimestamp) {
			return done[i].CreationTimestamp.Before(&done[j].CreationTimestamp)
		}
		return done[i].Name < done[j].Name
	})
	for _, m := range done[:len(done)-finishedMigrationsKept] {
		uid := m.UID
		err := s.kv.VirtualMachineInstanceMigrations(m.Namespace).Delete(ctx, m.Name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return fmt.Errorf("vmi %s: garbage-collect finished migration %s: %w", keyOf(vmi), m.Name, err)
		}
	}
	return nil
}

// unlabelMigrationTarget removes the migration-target node label from the
// VMI once migration m has ended without a handover.
func (s *Simulator) unlabelMigrationTarget(ctx context.Context, vmi *kvv1.VirtualMachineInstance, m *kvv1.VirtualMachineInstanceMigration) error {
	if _, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, func(v *kvv1.VirtualMachineInstance) bool {
		if _, ok := v.Labels[kvv1.MigrationTargetNodeNameLabel]; !ok {
			return false
		}
		delete(v.Labels, kvv1.MigrationTargetNodeNameLabel)
		return true
	}); err != nil {
		return fmt.Errorf("migration %s: unlabel vmi: %w", keyOf(m), err)
	}
	return nil
}
