package sim

// KubeVirt's eviction path, part 2: virt-controller's evacuation controller
// (pkg/virt-controller/watch/drain/evacuation). A VMI marked with status.evacuationNodeName (by
// the eviction webhook) that still runs on that node, or any VMI on a node carrying the
// (deprecated) drain taint, gets a VirtualMachineInstanceMigration, within the cluster's
// migration limits. Once the VMI runs elsewhere the mark is cleared, as virt-handler does at
// the migration hand-off.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/ptr"
	virtv1 "kubevirt.io/api/core/v1"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"
)

const (
	// KubeVirt defaults (pkg/virt-config): parallelMigrationsPerCluster 5,
	// parallelOutboundMigrationsPerNode 2, nodeDrainTaintKey kubevirt.io/drain.
	evacDefaultParallelMigrationsPerCluster      = 5
	evacDefaultParallelOutboundMigrationsPerNode = 2
	evacDefaultNodeDrainTaintKey                 = "kubevirt.io/drain"

	// evacuationBackoffBase and evacuationBackoffMax bound the wait before a new evacuation
	// migration for a VMI whose previous evacuation migration failed (KubeVirt's migration
	// back-off: 20 s doubling, capped), in simulated time.
	evacuationBackoffBase = 20 * time.Second
	evacuationBackoffMax  = 5 * time.Minute

	// evacuationResync is how often the controller looks again without being woken by a watch
	// event (KubeVirt re-enqueues a node after 5 s when no migration slot is free).
	evacuationResync = time.Second
)

// kvPlane holds the clients the KubeVirt- and Deckhouse-side controllers of this file set use,
// and the helpers they share. The eviction webhook reads the API server directly; the
// evacuation and vmop controllers read the simulator's caches, as virt-controller and
// Deckhouse's controllers read their informers, and remember what they created until the
// cache shows it, so that a lagging cache never makes them act twice.
type kvPlane struct {
	kube kubernetes.Interface
	c    ctrlclient.Client
	dyn  dynamic.Interface
	log  zerolog.Logger
	// simToWall converts a simulated duration (KubeVirt's timeouts and back-offs) into the wall
	// clock duration the simulator waits, given its time scale.
	simToWall func(time.Duration) time.Duration
	// now is the simulator's clock.
	now func() time.Time
}

func newKVPlane(cfg *rest.Config, log zerolog.Logger, simToWall func(time.Duration) time.Duration, now func() time.Time) (*kvPlane, error) {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("kubevirt plane: scheme: %w", err)
	}
	if err := virtv1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("kubevirt plane: kubevirt scheme: %w", err)
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubevirt plane: kubernetes client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubevirt plane: dynamic client: %w", err)
	}
	c, err := ctrlclient.New(cfg, ctrlclient.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("kubevirt plane: client: %w", err)
	}
	if simToWall == nil {
		simToWall = func(d time.Duration) time.Duration { return d }
	}
	if now == nil {
		now = time.Now
	}
	return &kvPlane{kube: kube, c: c, dyn: dyn, log: log, simToWall: simToWall, now: now}, nil
}

// kubeVirtConfiguration returns spec.configuration of the cluster's KubeVirt CR, or an empty
// configuration when there is none. With several CRs it picks the one MigrationConfig reads
// (the first by namespace/name), so evacuation and the migration engine agree on the limits.
func (kv *kvPlane) kubeVirtConfiguration(ctx context.Context) (virtv1.KubeVirtConfiguration, error) {
	var list virtv1.KubeVirtList
	if err := kv.c.List(ctx, &list); err != nil {
		if meta.IsNoMatchError(err) || apierrors.IsNotFound(err) {
			return virtv1.KubeVirtConfiguration{}, nil
		}
		return virtv1.KubeVirtConfiguration{}, fmt.Errorf("list kubevirts: %w", err)
	}
	if len(list.Items) == 0 {
		return virtv1.KubeVirtConfiguration{}, nil
	}
	sort.Slice(list.Items, func(i, j int) bool { return keyOf(&list.Items[i]) < keyOf(&list.Items[j]) })
	return list.Items[0].Spec.Configuration, nil
}

// clusterEvictionStrategy is spec.configuration.evictionStrategy of the KubeVirt CR, nil if unset.
func (kv *kvPlane) clusterEvictionStrategy(ctx context.Context) (*virtv1.EvictionStrategy, error) {
	cfg, err := kv.kubeVirtConfiguration(ctx)
	if err != nil {
		return nil, err
	}
	return cfg.EvictionStrategy, nil
}

// patchVMIStatus applies a patch that changes a VMI's status. Real KubeVirt registers no status
// subresource for VMIs (the status is written through the object); the simulator's CRD may have
// one. The patch goes to the status subresource, and to the object when there is none.
func (kv *kvPlane) patchVMIStatus(ctx context.Context, vmi *virtv1.VirtualMachineInstance, patch ctrlclient.Patch, dryRun bool) error {
	var dry []string
	if dryRun {
		dry = []string{metav1.DryRunAll}
	}
	obj := vmi.DeepCopy()
	err := kv.c.Status().Patch(ctx, obj, patch, &ctrlclient.SubResourcePatchOptions{PatchOptions: ctrlclient.PatchOptions{DryRun: dry}})
	if apierrors.IsNotFound(err) {
		// No status subresource (or no VMI, which the second call reports as well).
		obj = vmi.DeepCopy()
		err = kv.c.Patch(ctx, obj, patch, &ctrlclient.PatchOptions{DryRun: dry})
	}
	if err != nil {
		return fmt.Errorf("patch status of vmi %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}
	return nil
}

// loop runs sync once, then again on every wake-up or resync tick, until ctx ends. Errors are
// logged (only when they change) and retried on the next round.
func (kv *kvPlane) loop(ctx context.Context, name string, resync time.Duration, wake <-chan struct{}, sync func(context.Context) error) error {
	log := kv.log.With().Str("controller", name).Logger()
	ticker := time.NewTicker(resync)
	defer ticker.Stop()
	var lastErr string
	for {
		err := sync(ctx)
		switch {
		case ctx.Err() != nil:
			log.Debug().Msg("stopped")
			return nil
		case err != nil && err.Error() != lastErr:
			log.Warn().Err(err).Msg("sync failed; retrying")
			lastErr = err.Error()
		case err == nil && lastErr != "":
			log.Info().Msg("sync recovered")
			lastErr = ""
		}
		select {
		case <-ctx.Done():
			log.Debug().Msg("stopped")
			return nil
		case <-wake:
			// Let a burst of watch events (a migration walking its phases, a drain evicting
			// many pods) settle into one pass.
			select {
			case <-ctx.Done():
			case <-time.After(loopSettle):
			}
		case <-ticker.C:
		}
	}
}

// loopSettle is how long a controller loop waits after a wake-up before it looks again.
const loopSettle = 20 * time.Millisecond

// kubevirtPlane builds the clients and helpers of the controllers in evacuation.go and
// vmop.go from the simulator's configuration (acting as virt-controller, see kubeVirtConfig),
// logger, time scale and clock.
func (s *Simulator) kubevirtPlane() (*kvPlane, error) {
	return newKVPlane(s.kvCfg, s.log, s.scaled, s.clock.Now)
}

// Indexes the evacuation controller reads.
const (
	byEvacuation    = "evacuation" // VMIs by status.evacuationNodeName
	byMigrationOpen = "open"       // migrations that have not ended, under migrationOpen
	migrationOpen   = "open"
)

// setupEvacuation adds the indexes of the evacuation controller (before the informers start).
func (s *Simulator) setupEvacuation() {
	must := func(err error) {
		if err != nil {
			panic(fmt.Sprintf("sim: add evacuation indexers: %v", err))
		}
	}
	must(s.vmiInformer.AddIndexers(cache.Indexers{byEvacuation: func(obj interface{}) ([]string, error) {
		if n := obj.(*virtv1.VirtualMachineInstance).Status.EvacuationNodeName; n != "" {
			return []string{n}, nil
		}
		return nil, nil
	}}))
	must(s.vmimInformer.AddIndexers(cache.Indexers{byMigrationOpen: func(obj interface{}) ([]string, error) {
		if isMigrationFinal(obj.(*virtv1.VirtualMachineInstanceMigration)) {
			return nil, nil
		}
		return []string{migrationOpen}, nil
	}}))
}

// markedVMIs returns the VMIs marked for evacuation (status.evacuationNodeName set).
func (s *Simulator) markedVMIs() []*virtv1.VirtualMachineInstance {
	idx := s.vmiInformer.GetIndexer()
	var out []*virtv1.VirtualMachineInstance
	for _, node := range idx.ListIndexFuncValues(byEvacuation) {
		objs, _ := idx.ByIndex(byEvacuation, node)
		for _, o := range objs {
			out = append(out, o.(*virtv1.VirtualMachineInstance))
		}
	}
	return out
}

// kubeVirtCR is the KubeVirt CR that configures the cluster (the first by namespace/name, as
// MigrationConfig reads it), an empty one when there is none.
func (s *Simulator) kubeVirtCR() *virtv1.KubeVirt {
	var first *virtv1.KubeVirt
	for _, o := range s.kvInformer.GetStore().List() {
		if kv := o.(*virtv1.KubeVirt); first == nil || keyOf(kv) < keyOf(first) {
			first = kv
		}
	}
	if first == nil {
		return &virtv1.KubeVirt{}
	}
	return first
}

// runEvacuation runs KubeVirt's evacuation controller until ctx ends.
func (s *Simulator) runEvacuation(ctx context.Context) error {
	kv, err := s.kubevirtPlane()
	if err != nil {
		return err
	}
	e := newEvacuationController(kv, s)
	e.active = s.virtControllerActive
	return e.run(ctx)
}

// evacuationController is the simulator's virt-controller evacuation controller. It reads the
// simulator's caches, as virt-controller reads its informers, and remembers the migrations it
// created until the cache shows them (KubeVirt's expectations), so that a lagging cache never
// makes it create a second one.
type evacuationController struct {
	kv  *kvPlane
	sim *Simulator
	log zerolog.Logger
	// warned remembers the VMIs already reported as not migratable, to log once.
	warned map[types.UID]bool
	// active says whether virt-controller runs (nil: always).
	active func() bool
	// created maps a VMI (namespace/name) to the migration created for it that the cache may
	// not show yet.
	created map[string]createdMigration
	// busy is set while some VMI waits for a migration slot or its back-off, so that migration
	// events wake the controller only then.
	busy atomic.Bool
}

type createdMigration struct {
	mig *virtv1.VirtualMachineInstanceMigration
	at  time.Time
}

func newEvacuationController(kv *kvPlane, sim *Simulator) *evacuationController {
	return &evacuationController{
		kv:      kv,
		sim:     sim,
		log:     kv.log.With().Str("controller", "evacuation").Logger(),
		warned:  map[types.UID]bool{},
		created: map[string]createdMigration{},
	}
}

// run blocks until ctx ends. Watch events that can change what it decides wake it up early:
// a VMI marked or unmarked for evacuation, a node added, removed or (un)tainted, the KubeVirt
// CR, and migrations while a VMI waits for a slot.
func (e *evacuationController) run(ctx context.Context) error {
	wake := make(chan struct{}, 1)
	poke := func() {
		select {
		case wake <- struct{}{}:
		default:
		}
	}
	marked := func(obj interface{}) bool {
		vmi, ok := obj.(*virtv1.VirtualMachineInstance)
		return ok && vmi.IsMarkedForEviction()
	}
	s := e.sim
	for _, w := range []struct {
		inf      cache.SharedIndexInformer
		relevant func(old, cur interface{}) bool
	}{
		{s.vmiInformer, func(old, cur interface{}) bool { return marked(old) || marked(cur) }},
		{s.vmimInformer, func(_, _ interface{}) bool { return e.busy.Load() }},
		{s.nodeInformer, func(old, cur interface{}) bool {
			o, ok := old.(*corev1.Node)
			n := cur.(*corev1.Node)
			return !ok || o.Spec.Unschedulable != n.Spec.Unschedulable || !slices.EqualFunc(o.Spec.Taints, n.Spec.Taints, func(a, b corev1.Taint) bool { return a.MatchTaint(&b) })
		}},
		{s.kvInformer, func(_, _ interface{}) bool { return true }},
	} {
		reg, err := w.inf.AddEventHandler(wakeOn(poke, w.relevant))
		if err != nil {
			return fmt.Errorf("evacuation: watch: %w", err)
		}
		defer func() { _ = w.inf.RemoveEventHandler(reg) }()
	}
	return e.kv.loop(ctx, "evacuation", evacuationResync, wake, e.sync)
}

// wakeOn is an event handler that calls poke when relevant(old, cur) holds; old is nil for an
// added or deleted object (cur).
func wakeOn(poke func(), relevant func(old, cur interface{}) bool) cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj interface{}) {
			if relevant(nil, obj) {
				poke()
			}
		},
		UpdateFunc: func(old, cur interface{}) {
			if relevant(old, cur) {
				poke()
			}
		},
		DeleteFunc: func(obj interface{}) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			if relevant(nil, obj) {
				poke()
			}
		},
	}
}

// evacLimits are the migration limits of the KubeVirt CR, with KubeVirt's defaults.
type evacLimits struct {
	perCluster, perNode int
	drainTaintKey       string
}

func evacuationLimits(cfg virtv1.KubeVirtConfiguration) evacLimits {
	l := evacLimits{
		perCluster:    evacDefaultParallelMigrationsPerCluster,
		perNode:       evacDefaultParallelOutboundMigrationsPerNode,
		drainTaintKey: evacDefaultNodeDrainTaintKey,
	}
	if m := cfg.MigrationConfiguration; m != nil {
		if m.ParallelMigrationsPerCluster != nil {
			l.perCluster = int(*m.ParallelMigrationsPerCluster)
		}
		if m.ParallelOutboundMigrationsPerNode != nil {
			l.perNode = int(*m.ParallelOutboundMigrationsPerNode)
		}
		if m.NodeDrainTaintKey != nil && *m.NodeDrainTaintKey != "" {
			l.drainTaintKey = *m.NodeDrainTaintKey
		}
	}
	return l
}

// sync is one pass over the cluster: clear marks of VMIs that have left, then create
// migrations for the VMIs to evacuate, node by node, within the limits.
func (e *evacuationController) sync(ctx context.Context) error {
	if e.active != nil && !e.active() {
		return nil
	}
	s := e.sim
	cr := s.kubeVirtCR()
	kvCfg := cr.Spec.Configuration
	limits := evacuationLimits(kvCfg)
	// Deckhouse's fork disables this controller; the mark is still cleared at the hand-off.
	deckhouseFork := cr.Annotations[AnnotationPlatform] == PlatformDeckhouse

	var errs []error
	work := map[string]bool{} // nodes with VMIs marked for evacuation from them
	// Clear the mark of VMIs that now run on another node (virt-handler clears it at the
	// hand-off; this covers a migration engine that does not).
	for _, vmi := range s.markedVMIs() {
		if vmi.Status.NodeName != "" && vmi.Status.NodeName != vmi.Status.EvacuationNodeName {
			if err := e.clearMark(ctx, vmi); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		work[vmi.Status.EvacuationNodeName] = true
	}
	e.busy.Store(false)
	if deckhouseFork {
		return errors.Join(errs...)
	}
	var nodes []*corev1.Node
	drainTaint := corev1.Taint{Key: limits.drainTaintKey, Effect: corev1.TaintEffectNoSchedule}
	for _, obj := range s.nodeInformer.GetStore().List() {
		n := obj.(*corev1.Node)
		if work[n.Name] || slices.ContainsFunc(n.Spec.Taints, func(t corev1.Taint) bool { return t.MatchTaint(&drainTaint) }) {
			nodes = append(nodes, n)
		}
	}
	if len(nodes) == 0 {
		return errors.Join(errs...)
	}
	unfinished := e.unfinishedMigrations()
	clusterStrategy := kvCfg.EvictionStrategy

	slices.SortFunc(nodes, func(a, b *corev1.Node) int { return strings.Compare(a.Name, b.Name) })
	for _, node := range nodes {
		onNode := s.vmisOnNode(node.Name)
		toMigrate := evacuationVMIsToMigrate(node, onNode, limits.drainTaintKey)
		if len(toMigrate) == 0 {
			continue
		}
		activePods := map[string]int{}
		var migs []virtv1.VirtualMachineInstanceMigration
		for _, vmi := range toMigrate {
			for _, p := range s.podsBy(byVMI, vmi.Namespace+"/"+vmi.Name) {
				if uid := p.Labels[virtv1.CreatedByLabel]; uid != "" && p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
					activePods[uid]++
				}
			}
			for _, m := range s.migrationsForVMI(vmi.Namespace, vmi.Name) {
				migs = append(migs, *m)
			}
		}
		candidates := e.filterCandidates(toMigrate, unfinished, activePods, clusterStrategy, migs)
		if len(candidates) == 0 {
			continue
		}
		e.busy.Store(true)
		// KubeVirt counts the running migrations for both limits and relies on its
		// expectations to avoid piling up Pending ones; the simulator counts every unfinished
		// migration, which reaches the same steady state without that race.
		fromNode := migrationsFromNode(node.Name, onNode, unfinished)
		free := min(limits.perCluster-len(unfinished), limits.perNode-fromNode)
		if free <= 0 {
			continue
		}
		for _, vmi := range candidates[:min(free, len(candidates))] {
			mig, err := e.createMigration(ctx, vmi, node.Name, kvCfg)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			e.created[vmi.Namespace+"/"+vmi.Name] = createdMigration{mig: mig, at: s.clock.Now()}
			unfinished = append(unfinished, mig)
		}
	}
	return errors.Join(errs...)
}

// unfinishedMigrations is every migration that has not ended, from the cache, and the ones this
// controller created that the cache does not show yet.
func (e *evacuationController) unfinishedMigrations() []*virtv1.VirtualMachineInstanceMigration {
	s := e.sim
	objs, _ := s.vmimInformer.GetIndexer().ByIndex(byMigrationOpen, migrationOpen)
	out := make([]*virtv1.VirtualMachineInstanceMigration, 0, len(objs)+len(e.created))
	for _, o := range objs {
		out = append(out, o.(*virtv1.VirtualMachineInstanceMigration))
	}
	now := s.clock.Now()
	for vmi, c := range e.created {
		if s.getVMIM(keyOf(c.mig)) != nil || now.Sub(c.at) > rsExpectTimeout {
			delete(e.created, vmi) // the cache shows it (or it was lost)
			continue
		}
		out = append(out, c.mig)
	}
	return out
}

// evacuationVMIsToMigrate: every VMI on a node with the drain taint (deprecated KubeVirt
// mechanism), else the VMIs marked for evacuation from this node that are not migrating.
func evacuationVMIsToMigrate(node *corev1.Node, onNode []*virtv1.VirtualMachineInstance, drainTaintKey string) []*virtv1.VirtualMachineInstance {
	drainTaint := corev1.Taint{Key: drainTaintKey, Effect: corev1.TaintEffectNoSchedule}
	for _, t := range node.Spec.Taints {
		if t.MatchTaint(&drainTaint) {
			return onNode
		}
	}
	var marked []*virtv1.VirtualMachineInstance
	for _, vmi := range onNode {
		if vmi.IsMarkedForEviction() && vmi.Status.NodeName == vmi.Status.EvacuationNodeName && !vmiIsMigrating(vmi) {
			marked = append(marked, vmi)
		}
	}
	return marked
}

// filterCandidates is KubeVirt's filterRunningNonMigratingVMIs plus its migration back-off.
func (e *evacuationController) filterCandidates(
	vmis []*virtv1.VirtualMachineInstance,
	unfinished []*virtv1.VirtualMachineInstanceMigration,
	activePods map[string]int,
	clusterStrategy *virtv1.EvictionStrategy,
	allMigs []virtv1.VirtualMachineInstanceMigration,
) []*virtv1.VirtualMachineInstance {
	migrating := map[string]bool{}
	for _, m := range unfinished {
		migrating[m.Namespace+"/"+m.Spec.VMIName] = true
	}
	var out []*virtv1.VirtualMachineInstance
	for _, vmi := range vmis {
		key := vmi.Namespace + "/" + vmi.Name
		if vmi.IsFinal() || vmi.DeletionTimestamp != nil {
			continue
		}
		switch vmiEvictionStrategy(vmi, clusterStrategy) {
		case virtv1.EvictionStrategyLiveMigrate:
		case virtv1.EvictionStrategyLiveMigrateIfPossible:
			if !vmi.IsMigratable() {
				continue
			}
		default:
			// None lets the pod go; External leaves the work to an external controller.
			continue
		}
		if !vmi.IsMigratable() {
			if !e.warned[vmi.UID] {
				e.log.Info().Str("vmi", key).Msg("VirtualMachineInstance is not migrateable; it cannot be evacuated")
				e.warned[vmi.UID] = true
			}
			continue
		}
		if migrating[key] {
			continue
		}
		if activePods[string(vmi.UID)] > 1 {
			// Waiting for the pods of a previous migration to go away.
			continue
		}
		if wait := e.backoffRemaining(vmi, allMigs, e.kv.now()); wait > 0 {
			continue
		}
		out = append(out, vmi)
	}
	return out
}

// backoffRemaining is how long a VMI whose evacuation migrations keep failing still has to
// wait before the next one (20 s, 40 s, ... capped at 5 min of simulated time).
func (e *evacuationController) backoffRemaining(vmi *virtv1.VirtualMachineInstance, migs []virtv1.VirtualMachineInstanceMigration, now time.Time) time.Duration {
	var evac []*virtv1.VirtualMachineInstanceMigration
	for i := range migs {
		m := &migs[i]
		if m.Namespace != vmi.Namespace || m.Spec.VMIName != vmi.Name {
			continue
		}
		if _, ok := m.Annotations[virtv1.EvacuationMigrationAnnotation]; ok && m.IsFinal() {
			evac = append(evac, m)
		}
	}
	sort.Slice(evac, func(i, j int) bool { return evac[i].CreationTimestamp.Before(&evac[j].CreationTimestamp) })
	failures := 0
	var lastEnd time.Time
	for i := len(evac) - 1; i >= 0 && evac[i].Status.Phase == virtv1.MigrationFailed; i-- {
		failures++
		if failures == 1 {
			lastEnd = migrationEndTime(evac[i])
		}
	}
	if failures == 0 {
		return 0
	}
	backoff := evacuationBackoffBase << min(failures-1, 4)
	backoff = min(backoff, evacuationBackoffMax)
	return lastEnd.Add(e.kv.simToWall(backoff)).Sub(now)
}

// migrationEndTime is when a finished migration ended, as well as the object tells.
func migrationEndTime(m *virtv1.VirtualMachineInstanceMigration) time.Time {
	for _, t := range m.Status.PhaseTransitionTimestamps {
		if t.Phase == m.Status.Phase {
			return t.PhaseTransitionTimestamp.Time
		}
	}
	if s := m.Status.MigrationState; s != nil && s.EndTimestamp != nil {
		return s.EndTimestamp.Time
	}
	return m.CreationTimestamp.Time
}

// createMigration creates the evacuation migration KubeVirt's GenerateNewMigration builds: the
// priority of an evacuation only with the MigrationPriorityQueue feature gate (virt-api refuses
// it otherwise); virt-api's mutating webhook adds the selector label.
func (e *evacuationController) createMigration(ctx context.Context, vmi *virtv1.VirtualMachineInstance, node string, cfg virtv1.KubeVirtConfiguration) (*virtv1.VirtualMachineInstanceMigration, error) {
	mig := &virtv1.VirtualMachineInstanceMigration{
		ObjectMeta: metav1.ObjectMeta{
			Namespace:    vmi.Namespace,
			GenerateName: "kubevirt-evacuation-",
			Annotations:  map[string]string{virtv1.EvacuationMigrationAnnotation: node},
		},
		Spec: virtv1.VirtualMachineInstanceMigrationSpec{VMIName: vmi.Name},
	}
	if featureGateEnabled(cfg, featureGateMigPrQ) {
		mig.Spec.Priority = ptr.To(virtv1.PrioritySystemCritical)
	}
	if err := e.kv.c.Create(ctx, mig); err != nil {
		return nil, fmt.Errorf("evacuate vmi %s/%s from node %s: create migration: %w", vmi.Namespace, vmi.Name, node, err)
	}
	e.log.Info().Str("vmi", vmi.Namespace+"/"+vmi.Name).Str("node", node).Str("migration", mig.Name).Msg("created evacuation migration")
	return mig, nil
}

// clearMark removes status.evacuationNodeName if it still holds the value this pass saw.
func (e *evacuationController) clearMark(ctx context.Context, vmi *virtv1.VirtualMachineInstance) error {
	patch := fmt.Sprintf(`[{"op":"test","path":"/status/evacuationNodeName","value":%s},{"op":"remove","path":"/status/evacuationNodeName"}]`,
		strconv.Quote(vmi.Status.EvacuationNodeName))
	err := e.kv.patchVMIStatus(ctx, vmi, ctrlclient.RawPatch(types.JSONPatchType, []byte(patch)), false)
	if err != nil && (apierrors.IsNotFound(err) || apierrors.IsInvalid(err) || apierrors.IsConflict(err) || isFailedJSONPatchTest(err)) {
		// Gone, or changed since this pass read it: the next pass sees the new state.
		return nil
	}
	if err == nil {
		e.log.Info().Str("vmi", vmi.Namespace+"/"+vmi.Name).Str("from", vmi.Status.EvacuationNodeName).
			Str("node", vmi.Status.NodeName).Msg("evacuated; cleared evacuationNodeName")
	}
	return err
}

// isFailedJSONPatchTest recognises the API server's answer to a failed "test" operation.
func isFailedJSONPatchTest(err error) bool {
	var status apierrors.APIStatus
	return errors.As(err, &status) && status.Status().Code == 422
}

// vmiIsMigrating is KubeVirt's migrations.IsMigrating: a migration started and not ended.
func vmiIsMigrating(vmi *virtv1.VirtualMachineInstance) bool {
	s := vmi.Status.MigrationState
	if s == nil || s.StartTimestamp == nil {
		return false
	}
	return s.EndTimestamp == nil && !s.Completed && !s.Failed
}

// migrationsFromNode counts the unfinished migrations whose source is node: the source node
// the migration records, else (not started yet) the node its VMI runs on. KubeVirt counts the
// migrations of the VMIs that are on the node, which frees a slot at the hand-off, before the
// migration has finished; counting by source keeps the limit strict.
func migrationsFromNode(node string, onNode []*virtv1.VirtualMachineInstance, unfinished []*virtv1.VirtualMachineInstanceMigration) int {
	names := map[string]bool{}
	for _, vmi := range onNode {
		names[vmi.Namespace+"/"+vmi.Name] = true
	}
	n := 0
	for _, m := range unfinished {
		if s := m.Status.MigrationState; s != nil && s.SourceNode != "" {
			if s.SourceNode == node {
				n++
			}
			continue
		}
		if names[m.Namespace+"/"+m.Spec.VMIName] {
			n++
		}
	}
	return n
}
