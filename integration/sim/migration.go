package sim

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

// migrationState is the migration controller's memory: which migrations
// hold a slot (they have a target pod) and when each last changed phase
// (the API's timestamps have whole seconds only, too coarse at high time
// scales).
type migrationState struct {
	mu       sync.Mutex
	inflight map[types.UID]inflightMigration
	since    map[types.UID]time.Time
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

func newMigrationState() *migrationState {
	return &migrationState{inflight: map[types.UID]inflightMigration{}, since: map[types.UID]time.Time{}}
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
			if m.Status.MigrationState != nil {
				src = m.Status.MigrationState.SourceNode
			}
			ms.inflight[m.UID] = inflightMigration{key: keyOf(m), vmi: m.Namespace + "/" + m.Spec.VMIName, source: src}
		}
	}
}

func (s *Simulator) release(m *kvv1.VirtualMachineInstanceMigration) {
	s.migration.mu.Lock()
	_, had := s.migration.inflight[m.UID]
	delete(s.migration.inflight, m.UID)
	delete(s.migration.since, m.UID)
	s.migration.mu.Unlock()
	if had {
		s.enqueueMigrationsAll()
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

// setPhase moves m from phase from to phase to, copying vmiState (when not
// nil) into its status.migrationState.
func (s *Simulator) setPhase(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, from, to kvv1.VirtualMachineInstanceMigrationPhase, vmiState *kvv1.VirtualMachineInstanceMigrationState) error {
	now := s.now()
	changed := false
	_, err := s.mutateVMIM(ctx, m.Namespace, m.Name, true, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
		changed = false
		if cur.UID != m.UID || cur.Status.Phase != from {
			return false
		}
		setMigrationPhase(cur, to, now)
		if vmiState != nil {
			cur.Status.MigrationState = vmiState.DeepCopy()
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
// migration deleted before it ends is aborted; the source keeps running.
// It works for every VirtualMachineInstanceMigration, whoever created it.
func (s *Simulator) syncMigration(ctx context.Context, key string) error {
	s.migration.load(s)
	m := s.getVMIM(key)
	if m == nil {
		s.migration.mu.Lock()
		for uid, f := range s.migration.inflight {
			if f.key == key {
				delete(s.migration.inflight, uid)
				delete(s.migration.since, uid)
			}
		}
		s.migration.mu.Unlock()
		return nil
	}
	vmi := s.getVMI(m.Namespace + "/" + m.Spec.VMIName)
	if m.DeletionTimestamp != nil {
		return s.abortMigration(ctx, m, vmi)
	}
	if isMigrationFinal(m) {
		s.release(m)
		s.deleteTargetPod(ctx, m, vmi)
		return s.dropMigrationFinalizer(ctx, m, false)
	}
	if m.Status.Phase == kvv1.MigrationPhaseUnset {
		if _, err := s.mutateVMIM(ctx, m.Namespace, m.Name, false, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
			changed := addFinalizer(cur, kvv1.VirtualMachineInstanceMigrationFinalizer)
			if cur.Labels[kvv1.MigrationSelectorLabel] != cur.Spec.VMIName {
				if cur.Labels == nil {
					cur.Labels = map[string]string{}
				}
				cur.Labels[kvv1.MigrationSelectorLabel] = cur.Spec.VMIName
				changed = true
			}
			return changed
		}); err != nil {
			return fmt.Errorf("migration %s: add finalizer: %w", key, err)
		}
		return s.setPhase(ctx, m, kvv1.MigrationPhaseUnset, kvv1.MigrationPending, nil)
	}
	if vmi == nil || vmi.DeletionTimestamp != nil || vmiFinal(vmi) {
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

func (s *Simulator) admitMigration(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) error {
	if vmi.Status.Phase != kvv1.Running {
		return s.failMigration(ctx, m, vmi, fmt.Sprintf("Migration failed: VMI %s is in phase %s, not Running", keyOf(vmi), vmi.Status.Phase))
	}
	if c := vmiCondition(vmi, kvv1.VirtualMachineInstanceIsMigratable); c != nil && c.Status == corev1.ConditionFalse {
		return s.failMigration(ctx, m, vmi, fmt.Sprintf("Cannot migrate VMI, Reason: %s, Message: %s", c.Reason, c.Message))
	}
	cfg := s.MigrationConfig()
	source := vmi.Status.NodeName
	s.migration.mu.Lock()
	total, perNode := 0, 0
	for uid, f := range s.migration.inflight {
		cur := s.getVMIM(f.key)
		if cur == nil || cur.UID != uid {
			// gone behind our back
			delete(s.migration.inflight, uid)
			continue
		}
		if f.vmi == keyOf(vmi) {
			s.migration.mu.Unlock()
			return nil // one migration per VMI at a time; wait
		}
		total++
		if f.source == source {
			perNode++
		}
	}
	if total >= cfg.ParallelMigrationsPerCluster || perNode >= cfg.ParallelOutboundMigrationsPerNode {
		s.migration.mu.Unlock()
		return nil // queued; a slot freeing up requeues us
	}
	// older pending migrations go first (FIFO within the limits)
	s.migration.inflight[m.UID] = inflightMigration{key: keyOf(m), vmi: keyOf(vmi), source: source}
	s.migration.mu.Unlock()

	if err := s.ensureServiceAccount(ctx, m.Namespace); err != nil {
		s.release(m)
		return err
	}
	pod := newLauncherPod(vmi, m, source)
	pod.Name = targetPodName(vmi.Name, vmi.UID, m.UID)
	if _, err := s.Kube.CoreV1().Pods(m.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		s.release(m)
		return fmt.Errorf("migration %s: create target pod: %w", keyOf(m), err)
	}
	state := &kvv1.VirtualMachineInstanceMigrationState{
		SourceNode: source, TargetPod: pod.Name, MigrationUID: m.UID, Mode: kvv1.MigrationPreCopy,
	}
	if p := activePod(vmi, s.mustLaunchers(vmi)); p != nil {
		state.SourcePod = p.Name
	}
	return s.setPhase(ctx, m, kvv1.MigrationPending, kvv1.MigrationScheduling, state)
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
	if pod.Status.Phase == corev1.PodRunning {
		state := m.Status.MigrationState.DeepCopy()
		if state == nil {
			state = &kvv1.VirtualMachineInstanceMigrationState{MigrationUID: m.UID, SourceNode: vmi.Status.NodeName, TargetPod: name}
		}
		state.TargetNode = pod.Spec.NodeName
		state.TargetNodeAddress = pod.Status.PodIP
		return s.setPhase(ctx, m, kvv1.MigrationScheduling, kvv1.MigrationScheduled, state)
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

// migrationPrepare walks Scheduled -> PreparingTarget -> TargetReady ->
// Running, one MigrationStepDuration each, keeping the VMI's
// status.migrationState current.
func (s *Simulator) migrationPrepare(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) error {
	if why := s.migrationBroken(m, vmi); why != "" {
		return s.failMigration(ctx, m, vmi, why)
	}
	left := s.scaled(s.opts.MigrationStepDuration) - s.clock.Now().Sub(s.phaseSince(m))
	if left > 0 {
		s.migrationQueue.AddAfter(keyOf(m), left)
		return nil
	}
	state := m.Status.MigrationState.DeepCopy()
	if state == nil {
		return s.failMigration(ctx, m, vmi, "Migration failed: lost its state")
	}
	now := s.now()
	var next kvv1.VirtualMachineInstanceMigrationPhase
	switch m.Status.Phase {
	case kvv1.MigrationScheduled:
		next = kvv1.MigrationPreparingTarget
	case kvv1.MigrationPreparingTarget:
		next = kvv1.MigrationTargetReady
		state.TargetNodeDomainDetected = true
		state.TargetNodeDomainReadyTimestamp = &now
	case kvv1.MigrationTargetReady:
		next = kvv1.MigrationRunning
		state.StartTimestamp = &now
	}
	if err := s.setVMIMigrationState(ctx, vmi, m, func(ms *kvv1.VirtualMachineInstanceMigrationState) { *ms = *state }); err != nil {
		return err
	}
	if next == kvv1.MigrationPreparingTarget {
		if _, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, false, func(v *kvv1.VirtualMachineInstance) bool {
			if v.Labels[kvv1.MigrationTargetNodeNameLabel] == state.TargetNode {
				return false
			}
			if v.Labels == nil {
				v.Labels = map[string]string{}
			}
			v.Labels[kvv1.MigrationTargetNodeNameLabel] = state.TargetNode
			return true
		}); err != nil {
			return fmt.Errorf("migration %s: label vmi: %w", keyOf(m), err)
		}
	}
	return s.setPhase(ctx, m, m.Status.Phase, next, state)
}

// migrationBroken says why a migration cannot go on: a pod or node of it
// died (the simulator knows; virt-handler would notice).
func (s *Simulator) migrationBroken(m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) string {
	st := m.Status.MigrationState
	if st == nil {
		return ""
	}
	target := s.getPod(m.Namespace + "/" + st.TargetPod)
	if target == nil || isTerminal(target) || target.DeletionTimestamp != nil {
		return "Migration failed: target pod is gone"
	}
	if s.truth.running(target.UID) {
		return "" // the guest moved; completeMigration finishes the handover
	}
	if !s.nodes.kubeletAlive(st.SourceNode) {
		return fmt.Sprintf("Migration failed: source node %s is not responding", st.SourceNode)
	}
	if st.TargetNode != "" && !s.nodes.kubeletAlive(st.TargetNode) {
		return fmt.Sprintf("Migration failed: target node %s is not responding", st.TargetNode)
	}
	src := activePod(vmi, s.mustLaunchers(vmi))
	if src == nil || !s.truth.running(src.UID) {
		return "Migration failed: source guest is not running"
	}
	return ""
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
	if why := s.migrationBroken(m, vmi); why != "" {
		return s.failMigration(ctx, m, vmi, why)
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
	fresh, err := s.KubeVirt.VirtualMachineInstanceMigrations(m.Namespace).Get(ctx, m.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("migration %s: %w", keyOf(m), err)
	}
	if fresh.UID != m.UID || fresh.Status.Phase != kvv1.MigrationRunning || fresh.DeletionTimestamp != nil {
		s.migrationQueue.Add(keyOf(m))
		return nil
	}
	m = fresh
	st := m.Status.MigrationState
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
	_, err = s.mutateVMI(ctx, vmi.Namespace, vmi.Name, true, func(v *kvv1.VirtualMachineInstance) bool {
		if v.UID != vmi.UID {
			return false
		}
		if v.Status.MigrationState == nil || v.Status.MigrationState.MigrationUID != m.UID {
			v.Status.MigrationState = st.DeepCopy()
		}
		ms := v.Status.MigrationState
		ms.Completed = true
		ms.EndTimestamp = &now
		v.Status.NodeName = dstNode
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
	if _, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, false, func(v *kvv1.VirtualMachineInstance) bool {
		if v.Labels == nil {
			v.Labels = map[string]string{}
		}
		v.Labels[kvv1.NodeNameLabel] = dstNode
		delete(v.Labels, kvv1.MigrationTargetNodeNameLabel)
		return true
	}); err != nil {
		return fmt.Errorf("migration %s: relabel vmi: %w", keyOf(m), err)
	}
	s.log.Info().Str("vmi", keyOf(vmi)).Str("from", srcNode).Str("to", dstNode).Msg("migration succeeded")
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
	_, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, true, func(v *kvv1.VirtualMachineInstance) bool {
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

func (s *Simulator) failMigration(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance, reason string) error {
	// Failing rewrites the VMI's migrationState and removes the target pod:
	// make sure the cache did not hand us a migration that already ended.
	fresh, err := s.KubeVirt.VirtualMachineInstanceMigrations(m.Namespace).Get(ctx, m.Name, metav1.GetOptions{})
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
		if cur, err := s.KubeVirt.VirtualMachineInstances(vmi.Namespace).Get(ctx, vmi.Name, metav1.GetOptions{}); err == nil {
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
		final = m.Status.MigrationState.DeepCopy()
		if final == nil {
			final = &kvv1.VirtualMachineInstanceMigrationState{MigrationUID: m.UID}
		}
		final.Completed, final.Failed, final.EndTimestamp, final.FailureReason = true, true, &now, reason
	}
	s.deleteTargetPod(ctx, m, vmi)
	_, err = s.mutateVMIM(ctx, m.Namespace, m.Name, true, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
		if cur.UID != m.UID || isMigrationFinal(cur) {
			return false
		}
		setMigrationPhase(cur, kvv1.MigrationFailed, now)
		if final != nil {
			cur.Status.MigrationState = final
		}
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

// abortMigration handles a migration deleted before it ended: a running
// one is aborted (abortRequested, then abortStatus Succeeded), the source
// keeps running; the finalizer then goes.
func (s *Simulator) abortMigration(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, vmi *kvv1.VirtualMachineInstance) error {
	if isMigrationFinal(m) {
		s.release(m)
		return s.dropMigrationFinalizer(ctx, m, true)
	}
	now := s.now()
	if vmi != nil && vmi.Status.MigrationState != nil && vmi.Status.MigrationState.MigrationUID == m.UID && !vmiFinal(vmi) {
		ms := vmi.Status.MigrationState
		if !ms.AbortRequested {
			if err := s.setVMIMigrationState(ctx, vmi, m, func(ms *kvv1.VirtualMachineInstanceMigrationState) {
				ms.AbortRequested = true
				ms.AbortStatus = kvv1.MigrationAbortInProgress
			}); err != nil {
				return err
			}
			s.log.Info().Str("migration", keyOf(m)).Msg("migration deleted: aborting")
			s.migration.mu.Lock()
			s.migration.since[m.UID] = s.clock.Now()
			s.migration.mu.Unlock()
			s.migrationQueue.AddAfter(keyOf(m), s.scaled(s.opts.MigrationStepDuration))
			return nil
		}
		if ms.AbortStatus == kvv1.MigrationAbortInProgress {
			if left := s.scaled(s.opts.MigrationStepDuration) - s.clock.Now().Sub(s.phaseSince(m)); left > 0 {
				s.migrationQueue.AddAfter(keyOf(m), left)
				return nil
			}
			if err := s.setVMIMigrationState(ctx, vmi, m, func(ms *kvv1.VirtualMachineInstanceMigrationState) {
				ms.AbortStatus = kvv1.MigrationAbortSucceeded
				ms.Completed, ms.Failed, ms.EndTimestamp = true, true, &now
				ms.FailureReason = "Live migration aborted"
			}); err != nil {
				return err
			}
			if err := s.unlabelMigrationTarget(ctx, vmi, m); err != nil {
				return err
			}
			s.log.Info().Str("migration", keyOf(m)).Msg("migration aborted, source keeps running")
		}
	}
	s.deleteTargetPod(ctx, m, vmi)
	if _, err := s.mutateVMIM(ctx, m.Namespace, m.Name, true, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
		if cur.UID != m.UID || isMigrationFinal(cur) {
			return false
		}
		setMigrationPhase(cur, kvv1.MigrationFailed, now)
		cur.Status.Conditions = append(cur.Status.Conditions, kvv1.VirtualMachineInstanceMigrationCondition{
			Type: kvv1.VirtualMachineInstanceMigrationAbortRequested, Status: corev1.ConditionTrue, Reason: "AbortRequested", Message: "migration deleted", LastTransitionTime: now,
		})
		return true
	}); err != nil {
		return fmt.Errorf("migration %s: mark aborted: %w", keyOf(m), err)
	}
	s.release(m)
	return s.dropMigrationFinalizer(ctx, m, true)
}

func (s *Simulator) dropMigrationFinalizer(ctx context.Context, m *kvv1.VirtualMachineInstanceMigration, deleting bool) error {
	if !hasFinalizer(m, kvv1.VirtualMachineInstanceMigrationFinalizer) {
		return nil
	}
	if !deleting && m.DeletionTimestamp == nil {
		return nil // KubeVirt keeps it until the object is deleted
	}
	_, err := s.mutateVMIM(ctx, m.Namespace, m.Name, false, func(cur *kvv1.VirtualMachineInstanceMigration) bool {
		return cur.UID == m.UID && removeFinalizer(cur, kvv1.VirtualMachineInstanceMigrationFinalizer)
	})
	if err != nil {
		return fmt.Errorf("migration %s: remove finalizer: %w", keyOf(m), err)
	}
	return nil
}

// unlabelMigrationTarget removes the migration-target node label from the
// VMI once migration m has ended without a handover.
func (s *Simulator) unlabelMigrationTarget(ctx context.Context, vmi *kvv1.VirtualMachineInstance, m *kvv1.VirtualMachineInstanceMigration) error {
	if _, err := s.mutateVMI(ctx, vmi.Namespace, vmi.Name, false, func(v *kvv1.VirtualMachineInstance) bool {
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
