package recovery

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

// Pause is whether new recoveries are paused cluster-wide.
type Pause struct {
	Paused bool      `json:"paused"`
	By     string    `json:"by,omitempty"`
	Reason string    `json:"reason,omitempty"`
	Since  time.Time `json:"since,omitzero"`
}

// Pauser tells the handler whether new recoveries are paused (`drover
// recovery pause`). Recoveries past their fencing gate finish regardless.
type Pauser interface {
	RecoveryPause(ctx context.Context) (Pause, error)
}

// Handler is the recovery workflow (ColdStandby): for node.notready it
// re-reads the node, applies the storm guard and the pause, waits at the
// fencing gate, cleans up the dead node in the order that lets KubeVirt act
// and waits until every VM whose run policy restarts it runs elsewhere; for
// node.ready it removes the out-of-service taint it added once the node is
// back clean; node.fenced is recorded as evidence the gate reads.
type Handler struct {
	Kube    kubernetes.Interface
	Dynamic dynamic.Interface
	Config  Config
	// Pause may be nil: never paused.
	Pause   Pauser
	Metrics *Metrics
	// Events records Kubernetes Events on the Node and the VMs; nil: none.
	Events record.EventRecorder
	// Now is the clock (default time.Now).
	Now func() time.Time
}

var _ consumers.Handler = (*Handler)(nil)

// Handle implements consumers.Handler.
func (h *Handler) Handle(ctx context.Context, op *consumers.Operation, e consumers.Event) error {
	if h.Kube == nil || h.Dynamic == nil {
		return consumers.Terminalf("no Kubernetes cluster configured: the recovery workflow cannot act on node %s", e.Keys.Target)
	}
	h.Config = h.Config.withDefaults()
	switch p := e.Payload.(type) {
	case *schemas.NodeNotReady:
		return h.recover(ctx, op, p)
	case *schemas.NodeReady:
		return h.ready(ctx, op, p)
	case *schemas.NodeFenced:
		return op.Checkpoint(ctx, "recorded", fmt.Sprintf("fencing of %s recorded (%s by %s): a recovery of %s waiting at its gate takes it as proof the node is dead",
			p.Node, p.Method, p.By, p.Node), nil)
	default:
		return consumers.Terminalf("the recovery workflow does not handle %s", e.CloudEvent.Type())
	}
}

func (h *Handler) now() time.Time {
	if h.Now != nil {
		return h.Now()
	}
	return time.Now()
}

// incident is a recovery's checkpoint: what it found and how far it got.
type incident struct {
	Node       string    `json:"node"`
	NodeUID    string    `json:"nodeUID,omitempty"`
	SpellStart time.Time `json:"spellStart,omitzero"`
	Detected   time.Time `json:"detected"`
	Phase      string    `json:"phase,omitempty"`
	WaitSince  time.Time `json:"waitSince,omitzero"`
	GateOpened time.Time `json:"gateOpened,omitzero"`
	GateMode   string    `json:"gateMode,omitempty"`
	GateBy     string    `json:"gateBy,omitempty"`
	Unsafe     bool      `json:"unsafe,omitempty"`
	Deckhouse  bool      `json:"deckhouse,omitempty"` // Deckhouse's watchdog fencing was armed on the node
	AddTaint   bool      `json:"addTaint,omitempty"`
	VMs        []VM      `json:"vms,omitempty"`
	NoRoom     []string  `json:"noRoom,omitempty"`
	Batches    int       `json:"batches,omitempty"` // launcher batches released
	Tainted    bool      `json:"tainted,omitempty"`
	CleanedUp  time.Time `json:"cleanedUp,omitzero"`
	Cleanup    string    `json:"cleanup,omitempty"`
	AllRunning time.Time `json:"allRunning,omitzero"`
}

// Per-VM phases of a recovery.
const (
	vmPending    = "Pending"    // waits for the gate, then its restart
	vmRestarting = "Restarting" // released: KubeVirt restarts it
	vmNoRoom     = "NoRoom"     // restartable, but the other nodes cannot hold it now
	vmStopped    = "Stopped"    // its run policy does not restart it
	vmRunning    = "Running"
)

func (h *Handler) recover(ctx context.Context, op *consumers.Operation, p *schemas.NodeNotReady) error {
	var st incident
	ok, err := op.Data(&st)
	if err != nil {
		return consumers.Terminal(err)
	}
	if !ok || st.Node == "" {
		st = incident{Node: p.Node, Detected: op.Resumed().Created}
		if st.Detected.IsZero() {
			st.Detected = h.now()
		}
	}
	c := cluster{kube: h.Kube, dyn: h.Dynamic}
	if st.GateOpened.IsZero() {
		done, err := h.beforeGate(ctx, op, c, &st)
		if done || err != nil {
			return err
		}
	}
	return h.afterGate(ctx, op, c, &st)
}

// beforeGate re-reads the node and decides: stale, excluded, paused, storm,
// waiting for fencing, or the gate opens (done false, nil).
func (h *Handler) beforeGate(ctx context.Context, op *consumers.Operation, c cluster, st *incident) (bool, error) {
	log := zerolog.Ctx(ctx).With().Str("node", st.Node).Logger()
	cfg := h.Config
	select {
	case <-op.Cancelled():
		return true, h.cancelled(ctx, op, st)
	default:
	}
	node, lease, err := c.node(ctx, st.Node)
	if err != nil {
		return true, err
	}
	now := h.now()
	if node != nil {
		hl := Health(node, lease, now, cfg.LeaseTimeout)
		switch {
		case hl.Healthy && !hl.Ready:
			// Not Ready for less than the lease timeout (starting up): not
			// an incident yet, and not over either; look again.
			return true, consumers.WaitFor(cfg.GatePoll, "lease_renewing", fmt.Sprintf("node %s is not Ready (%s) but renews its Lease: not an incident unless it stays so for %s", st.Node, hl.Detail, cfg.LeaseTimeout))
		case hl.Ready:
			return true, h.finishEarly(ctx, op, st, "stale", fmt.Sprintf("stale: node %s is Ready again and renews its Lease; nothing done", st.Node))
		case st.NodeUID == "":
			st.NodeUID, st.SpellStart = string(node.UID), hl.SpellStart
		case st.NodeUID != string(node.UID) || hl.SpellStart.After(st.SpellStart.Add(time.Second)):
			return true, h.finishEarly(ctx, op, st, "stale", fmt.Sprintf("stale: node %s has come back and failed again since (spell from %s): a newer incident handles it",
				st.Node, hl.SpellStart.UTC().Format(time.RFC3339)))
		}
		st.Deckhouse = st.Deckhouse || deckhouseFencing(node)
		if excluded(node) {
			return true, h.finishEarly(ctx, op, st, "excluded", fmt.Sprintf("excluded: node %s has %s=true; nothing done", st.Node, LabelExclude))
		}
	}
	if st.Phase == "" {
		// What ran there, before anything (Deckhouse's fencing controller) may
		// release it; looked at again when the clean-up starts.
		vms, err := c.vmsOn(ctx, st.Node)
		if err != nil {
			return true, err
		}
		st.merge(vms)
		for _, v := range vms {
			if err := op.Progress(ctx, v.Key(), consumers.TargetProgress{Phase: vmPending, Node: st.Node, Message: "waits for the fencing gate"}); err != nil {
				return true, err
			}
		}
	}

	if h.Pause != nil {
		pause, err := h.Pause.RecoveryPause(ctx)
		if err != nil {
			return true, fmt.Errorf("read the recovery pause: %w", err)
		}
		h.Metrics.paused(pause.Paused)
		if pause.Paused {
			return true, h.wait(ctx, op, st, "paused", fmt.Sprintf("recoveries paused cluster-wide by %s since %s (%s): `drover recovery resume` lets them go on",
				orSomeone(pause.By), pause.Since.UTC().Format(time.RFC3339), pause.Reason), 8*cfg.GatePoll)
		}
	}
	v, err := c.view(ctx, false)
	if err != nil {
		return true, err
	}
	storm := CheckStorm(v.health(now, cfg.LeaseTimeout), cfg.Storm)
	h.Metrics.storm(storm)
	if storm.Active {
		if st.Phase != "storm" {
			log.Warn().Stringer("storm", storm).Msg("storm guard: not recovering (likely a partition or a control-plane fault)")
			h.event(nodeRef(st), corev1.EventTypeWarning, "RecoveryStormGuard", "storm guard: "+storm.String()+"; drover does nothing until it passes")
		}
		return true, h.wait(ctx, op, st, "storm", "storm guard: "+storm.String()+
			"; that is what a partition or a control-plane fault looks like: no clean-up until it passes", 8*cfg.GatePoll)
	}

	in := GateInput{Policy: cfg.PolicyFor(nil), NodeExists: node != nil, Now: now}
	if node != nil {
		in.Policy = cfg.PolicyFor(node.Labels)
		owner := node.Annotations[AnnotationTaintedBy]
		in.OutOfService = hasTaint(node, TaintOutOfService) && (owner == "" || owner == op.Key())
		in.Deckhouse = deckhouseFencing(node)
		if lease != nil && lease.Spec.RenewTime != nil {
			in.LeaseRenewed = lease.Spec.RenewTime.Time
		}
	}
	if in.Fenced, err = h.evidence(ctx, op, st, in.LeaseRenewed); err != nil {
		return true, err
	}
	g := Gate(in)
	if !g.Open {
		wait := cfg.GatePoll
		if g.Recheck > 0 && g.Recheck < wait {
			wait = g.Recheck
		}
		return true, h.wait(ctx, op, st, "gate", fmt.Sprintf("fencing gate (%s) closed: waiting for %s", g.Mode, g.By), wait)
	}

	// The point of no return: from here on node.ready no longer cancels.
	if err := op.Uncancellable(ctx, "past its fencing gate ("+g.By+")"); err != nil {
		return true, err
	}
	if rec, found, err := op.Related(ctx, op.Key()); err != nil {
		return true, err
	} else if found && rec.CancelRequested {
		return true, h.cancelled(ctx, op, st)
	}
	st.GateOpened, st.GateMode, st.GateBy, st.Unsafe, st.AddTaint = now, g.Mode, g.By, g.Unsafe, g.AddTaint
	if g.Unsafe {
		h.Metrics.unsafe()
		log.Warn().Str("gate", g.By).Msg("UNSAFE: fencing gate opened without proof that the node is dead (fencing none)")
	} else {
		log.Info().Str("gate", g.By).Msg("fencing gate opened")
	}
	msg := "fencing gate opened: " + g.By
	if g.Unsafe {
		msg = "UNSAFE " + msg
	}
	if err := h.checkpoint(ctx, op, st, "gate-opened", msg); err != nil {
		return true, err
	}
	evType := corev1.EventTypeNormal
	if g.Unsafe {
		evType = corev1.EventTypeWarning
	}
	h.event(nodeRef(st), evType, "FencingGateOpened", msg)
	if !st.SpellStart.IsZero() {
		h.Metrics.phase("detect", st.Detected.Sub(st.SpellStart).Seconds())
	}
	h.Metrics.phase("gate", st.GateOpened.Sub(st.Detected).Seconds())
	return false, nil
}

// merge adds VMs not known yet; it reports whether any was.
func (st *incident) merge(vms []VM) bool {
	known := map[string]bool{}
	for _, v := range st.VMs {
		known[v.Key()] = true
	}
	added := false
	for _, v := range vms {
		if !known[v.Key()] {
			st.VMs = append(st.VMs, v)
			added = true
		}
	}
	sort.Slice(st.VMs, func(i, j int) bool { return st.VMs[i].Key() < st.VMs[j].Key() })
	return added
}

// wait records why the recovery waits (once per phase) and returns Wait:
// the node stays reserved and no attempt is spent.
func (h *Handler) wait(ctx context.Context, op *consumers.Operation, st *incident, phase, why string, d time.Duration) error {
	if st.Phase != phase {
		st.WaitSince = h.now()
		if err := h.checkpoint(ctx, op, st, phase, why); err != nil {
			return err
		}
	}
	gate := phase
	if phase == "gate" {
		gate = "fencing"
	}
	return consumers.WaitFor(d, gate, fmt.Sprintf("since %s: %s", st.WaitSince.UTC().Format("15:04:05"), why))
}

func (h *Handler) checkpoint(ctx context.Context, op *consumers.Operation, st *incident, phase, msg string) error {
	st.Phase = phase
	return op.Checkpoint(ctx, phase, msg, st)
}

func (h *Handler) finishEarly(ctx context.Context, op *consumers.Operation, st *incident, result, msg string) error {
	zerolog.Ctx(ctx).Info().Str("node", st.Node).Msg(msg)
	for _, v := range st.VMs {
		if err := op.Progress(ctx, v.Key(), consumers.TargetProgress{Phase: vmStopped, Node: st.Node, Message: result}); err != nil {
			return err
		}
	}
	if err := h.checkpoint(ctx, op, st, result, msg); err != nil {
		return err
	}
	h.Metrics.finished(result)
	return nil
}

func (h *Handler) cancelled(ctx context.Context, op *consumers.Operation, st *incident) error {
	h.Metrics.finished("cancelled")
	return h.checkpoint(ctx, op, st, "cancelled", fmt.Sprintf("cancelled before the fencing gate (%s): nothing was done to %s", op.CancelReason(), st.Node))
}

// evidence finds a node.fenced event recorded for the node since its spell
// started and since its kubelet last renewed its Lease (a node that renewed
// it after the fencing has come back to life since): an acknowledgement
// from a fencing agent or a person.
func (h *Handler) evidence(ctx context.Context, op *consumers.Operation, st *incident, renewed time.Time) (*Evidence, error) {
	recs, err := op.RelatedList(ctx, fencedFilter(st.Node))
	if err != nil {
		return nil, fmt.Errorf("read fencing evidence of %s: %w", st.Node, err)
	}
	since := st.SpellStart
	if since.IsZero() {
		since = st.Detected
	}
	if renewed.After(since) {
		since = renewed
	}
	var best *Evidence
	for _, r := range recs {
		if !r.Created.After(since) || len(r.Request) == 0 {
			continue
		}
		var ce event.Event
		if err := json.Unmarshal(r.Request, &ce); err != nil {
			continue
		}
		p, err := schemas.Decode(ce)
		if err != nil {
			continue
		}
		f, ok := p.(*schemas.NodeFenced)
		if !ok || f.Node != st.Node {
			continue
		}
		if best == nil || r.Created.Before(best.At) {
			best = &Evidence{Method: f.Method, By: f.By, At: r.Created}
		}
	}
	return best, nil
}

// fencedFilter matches the records of node.fenced events of node (the
// runtime keys them fenced.<node token>.<event id>).
func fencedFilter(node string) string {
	return "fenced." + strings.TrimPrefix(consumers.NodeLock(node), "node.") + ".*"
}

// afterGate cleans the dead node up and waits for the VMs to run elsewhere.
func (h *Handler) afterGate(ctx context.Context, op *consumers.Operation, c cluster, st *incident) error {
	if _, err := op.UpdateNodeState(ctx, st.Node, func(ns *consumers.NodeState) error {
		ns.Recovery = op.Key()
		ns.Note = "recovering: " + st.GateBy
		// Recorded before the clean-up adds it.
		ns.Taints = appendTaint(ns.Taints, consumers.Taint{Key: TaintRecovering, Value: "true", Effect: string(corev1.TaintEffectNoSchedule)})
		return nil
	}); err != nil {
		return err
	}
	if st.CleanedUp.IsZero() {
		if err := h.cleanup(ctx, op, c, st); err != nil {
			return err
		}
	}
	return h.waitRunning(ctx, op, c, st)
}

// cleanup releases the dead node's VMs in the order that lets KubeVirt act:
// KubeVirt's own control-plane pods stuck there, the migrations from it,
// its virt-launcher pods (highest restart priority first when room is
// short) and their volume attachments, then the out-of-service taint.
func (h *Handler) cleanup(ctx context.Context, op *consumers.Operation, c cluster, st *incident) error {
	log := zerolog.Ctx(ctx).With().Str("node", st.Node).Logger()
	cfg := h.Config
	now := h.now()
	vms, err := c.vmsOn(ctx, st.Node)
	if err != nil {
		return err
	}
	st.merge(vms)
	v, err := c.view(ctx, true)
	if err != nil {
		return err
	}
	var rooms []NodeRoom
	for _, l := range v.rooms(now, cfg.LeaseTimeout, st.Node) {
		rooms = append(rooms, l.Room)
	}
	plan := PlanRestarts(st.VMs, rooms)
	st.NoRoom = nil
	for _, vm := range plan.NoRoom {
		st.NoRoom = append(st.NoRoom, vm.Key())
	}
	for _, vm := range plan.Stay {
		if err := op.Progress(ctx, vm.Key(), consumers.TargetProgress{Phase: vmStopped, Node: st.Node,
			Message: fmt.Sprintf("run policy %s: not restarted", vm.RunPolicy)}); err != nil {
			return err
		}
	}
	for _, vm := range plan.NoRoom {
		if err := op.Progress(ctx, vm.Key(), consumers.TargetProgress{Phase: vmNoRoom, Node: st.Node,
			Message: fmt.Sprintf("the other nodes cannot hold it now (restart priority %d)", vm.Priority)}); err != nil {
			return err
		}
	}
	if st.Batches == 0 {
		if err := h.checkpoint(ctx, op, st, "cleaning-up", "cleaning up "+st.Node); err != nil {
			return err
		}
	}

	// 0. No VM may be scheduled back onto the failed node: until the node
	// lifecycle controller marks it unreachable it looks schedulable.
	if _, err := c.taint(ctx, st.Node, corev1.Taint{Key: TaintRecovering, Value: "true", Effect: corev1.TaintEffectNoSchedule}, op.Key()); err != nil {
		return err
	}
	pods, err := c.podsOn(ctx, st.Node)
	if err != nil {
		return err
	}
	var report []string
	if st.GateMode == GateDeckhouse || st.GateMode == GateDeleted {
		report = append(report, h.deckhouseReport(st, pods))
	}
	// 1. KubeVirt's own control plane: if both virt-controller replicas
	// were there, nothing restarts until they are gone and recreated.
	var cp []string
	var errs []error
	for i := range pods {
		if isControlPlane(&pods[i]) {
			if err := c.forceDelete(ctx, &pods[i]); err != nil {
				errs = append(errs, err)
				continue
			}
			cp = append(cp, pods[i].Namespace+"/"+pods[i].Name)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if len(cp) > 0 {
		report = append(report, fmt.Sprintf("force-deleted KubeVirt control-plane pods %s", strings.Join(cp, ", ")))
	}
	// 2. Migrations from the dead node hang and hold their slots.
	migrations, err := c.migrationsFrom(ctx, st.Node)
	if err != nil {
		return err
	}
	var mnames []string
	for i := range migrations {
		if err := c.deleteMigration(ctx, &migrations[i]); err != nil {
			return err
		}
		mnames = append(mnames, migrations[i].GetNamespace()+"/"+migrations[i].GetName())
	}
	if len(mnames) > 0 {
		report = append(report, "deleted migrations "+strings.Join(mnames, ", "))
	}
	// 3. virt-launcher pods, by batch, and the attachments they leave.
	batches := [][]VM{st.VMs}
	if plan.Short() {
		batches = [][]VM{plan.Fit, append(append([]VM(nil), plan.NoRoom...), plan.Stay...)}
		log.Warn().Str("noRoom", vmNames(plan.NoRoom)).Msg("the other nodes cannot hold every VM: the highest restart priorities go first")
	}
	launchers, detached := 0, 0
	for i := st.Batches; i < len(batches); i++ {
		n, d, err := h.releaseBatch(ctx, c, st, batches[i])
		if err != nil {
			return err
		}
		launchers, detached = launchers+n, detached+d
		for _, vm := range batches[i] {
			if vm.Restarts && !contains(st.NoRoom, vm.Key()) {
				if err := op.Progress(ctx, vm.Key(), consumers.TargetProgress{Phase: vmRestarting, Node: st.Node, Message: "released: KubeVirt restarts it"}); err != nil {
					return err
				}
			}
		}
		st.Batches = i + 1
		if i < len(batches)-1 {
			// A resumed attempt must not wait for this batch again.
			if err := h.checkpoint(ctx, op, st, "cleaning-up", fmt.Sprintf("cleaning up %s: launcher batch %d of %d released", st.Node, i+1, len(batches))); err != nil {
				return err
			}
			// Let the higher priorities take the room first.
			if err := h.awaitRunning(ctx, op, c, st, batches[i], cfg.RunningWait); err != nil {
				return err
			}
		}
	}
	// 4. The out-of-service taint: Kubernetes releases what else was there.
	if st.AddTaint && !st.Tainted {
		added, err := c.taint(ctx, st.Node, corev1.Taint{Key: TaintOutOfService, Value: "nodeshutdown", Effect: corev1.TaintEffectNoExecute}, op.Key())
		if err != nil {
			return err
		}
		if added {
			if _, err := op.UpdateNodeState(ctx, st.Node, func(ns *consumers.NodeState) error {
				ns.Taints = appendTaint(ns.Taints, consumers.Taint{Key: TaintOutOfService, Value: "nodeshutdown", Effect: string(corev1.TaintEffectNoExecute)})
				return nil
			}); err != nil {
				return err
			}
			report = append(report, "tainted out-of-service")
		}
		st.Tainted = true
	}
	// 5. Anything left: launcher pods created meanwhile, every attachment.
	rest, d, err := h.releaseBatch(ctx, c, st, nil)
	if err != nil {
		return err
	}
	launchers, detached = launchers+rest, detached+d
	report = append(report, fmt.Sprintf("force-deleted %d virt-launcher pods, deleted %d volume attachments", launchers, detached))
	st.CleanedUp = h.now()
	st.Cleanup = strings.Join(report, "; ")
	if err := h.checkpoint(ctx, op, st, "cleaned-up", "cleaned up "+st.Node+": "+st.Cleanup); err != nil {
		return err
	}
	log.Info().Str("cleanup", st.Cleanup).Msg("dead node cleaned up")
	h.event(nodeRef(st), corev1.EventTypeNormal, "RecoveryCleanedUp", st.Cleanup)
	h.Metrics.phase("cleanup", st.CleanedUp.Sub(st.GateOpened).Seconds())
	return nil
}

func appendTaint(ts []consumers.Taint, t consumers.Taint) []consumers.Taint {
	for _, x := range ts {
		if x.Key == t.Key && x.Effect == t.Effect {
			return ts
		}
	}
	return append(ts, t)
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// deckhouseReport says what Deckhouse's fencing controller (or whoever
// deleted the Node) did before drover looked.
func (h *Handler) deckhouseReport(st *incident, pods []corev1.Pod) string {
	left := 0
	for i := range pods {
		if isLauncher(&pods[i]) {
			left++
		}
	}
	who := "the Node's deletion"
	if st.Deckhouse {
		who = "Deckhouse's fencing controller"
	}
	return fmt.Sprintf("%s had released %d of the %d VMs' pods before drover looked", who, max(len(st.VMs)-left, 0), len(st.VMs))
}

// releaseBatch force-deletes the launcher pods of vms on the node (every
// launcher pod when vms is nil), then the volume attachments no pod left
// there uses (all of them when vms is nil).
func (h *Handler) releaseBatch(ctx context.Context, c cluster, st *incident, vms []VM) (int, int, error) {
	pods, err := c.podsOn(ctx, st.Node)
	if err != nil {
		return 0, 0, err
	}
	want := map[string]bool{}
	for _, v := range vms {
		want[v.Key()] = true
		want["uid:"+v.UID] = true
	}
	var kept, release []corev1.Pod
	for i := range pods {
		p := &pods[i]
		key := p.Namespace + "/" + p.Labels[labelDeckhouseVM]
		if !isLauncher(p) || (vms != nil && !want[key] && !want["uid:"+p.Labels[kvv1.CreatedByLabel]]) {
			kept = append(kept, *p)
			continue
		}
		release = append(release, *p)
	}
	// Release as many as can be, in parallel: one refused deletion must not
	// hold the others back.
	failed := c.forceDeleteAll(ctx, release)
	deleted := len(release) - len(failed)
	var errs []error
	for _, f := range failed {
		kept = append(kept, f.pod)
		errs = append(errs, f.err)
	}
	if err := errors.Join(errs...); err != nil {
		return deleted, 0, err
	}
	var keep map[string]bool
	if vms != nil {
		if keep, err = c.volumesOf(ctx, kept); err != nil {
			return deleted, 0, err
		}
	}
	detached, err := c.detach(ctx, st.Node, keep)
	return deleted, detached, err
}

// awaitRunning waits, up to limit, until the restartable VMs of vms run
// elsewhere, recording each as it comes up.
func (h *Handler) awaitRunning(ctx context.Context, op *consumers.Operation, c cluster, st *incident, vms []VM, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		pending, err := h.checkRunning(ctx, op, c, st, vms)
		if err != nil || len(pending) == 0 {
			return err
		}
		if time.Now().After(deadline) {
			return nil
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(h.Config.RunningPoll):
		}
	}
}

// checkRunning records the restartable VMs that run elsewhere now and
// returns the others.
func (h *Handler) checkRunning(ctx context.Context, op *consumers.Operation, c cluster, st *incident, vms []VM) ([]VM, error) {
	var pending []VM
	for _, vm := range vms {
		if !vm.Restarts || op.Done(vm.Key(), vmRunning) {
			continue
		}
		ok, node, err := c.running(ctx, vm, st.Node)
		if err != nil {
			return nil, err
		}
		if !ok {
			pending = append(pending, vm)
			continue
		}
		if err := op.Progress(ctx, vm.Key(), consumers.TargetProgress{Phase: vmRunning, Node: node, Message: "restarted after " + st.Node + " failed"}); err != nil {
			return nil, err
		}
		h.event(vmRef(vm), corev1.EventTypeNormal, "RestartedAfterNodeFailure", fmt.Sprintf("running on %s after node %s failed (%s)", node, st.Node, st.GateBy))
	}
	return pending, nil
}

// waitRunning acknowledges the recovery once every VM whose run policy
// restarts it runs elsewhere; meanwhile it releases the node if it comes
// back, so that its room counts again.
func (h *Handler) waitRunning(ctx context.Context, op *consumers.Operation, c cluster, st *incident) error {
	log := zerolog.Ctx(ctx).With().Str("node", st.Node).Logger()
	deadline := time.Now().Add(h.Config.RunningWait)
	lastRelease := time.Time{}
	for {
		pending, err := h.checkRunning(ctx, op, c, st, st.VMs)
		if err != nil {
			return err
		}
		if err := op.Flush(ctx); err != nil {
			return err
		}
		if len(pending) == 0 {
			break
		}
		if time.Since(lastRelease) > 10*h.Config.RunningPoll {
			lastRelease = time.Now()
			if _, _, err := h.release(ctx, op, c, st.Node); err != nil {
				log.Warn().Err(err).Msg("could not release the node that came back")
			}
		}
		if time.Now().After(deadline) || onlyNoRoom(pending, st) {
			// Without room, waiting here holds a worker for nothing: look
			// again later (a node may come back, a VM may be stopped).
			return consumers.WaitFor(8*h.Config.GatePoll, "restart", fmt.Sprintf("waiting for %d VMs to run elsewhere: %s%s", len(pending), vmNames(pending), noRoomNote(st)))
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(h.Config.RunningPoll):
		}
	}
	st.AllRunning = h.now()
	h.Metrics.phase("running", st.AllRunning.Sub(st.CleanedUp).Seconds())
	if _, err := op.UpdateNodeState(ctx, st.Node, func(ns *consumers.NodeState) error {
		if ns.Recovery == op.Key() {
			ns.Recovery = ""
		}
		ns.Note = "recovered by " + op.Key()
		return nil
	}); err != nil {
		return err
	}
	for _, vm := range st.VMs {
		if !vm.Restarts {
			h.event(vmRef(vm), corev1.EventTypeWarning, "NotRestartedAfterNodeFailure",
				fmt.Sprintf("node %s failed; run policy %s does not restart the VM", st.Node, vm.RunPolicy))
		}
	}
	msg := h.summary(st)
	if err := h.checkpoint(ctx, op, st, "recovered", msg); err != nil {
		return err
	}
	h.event(nodeRef(st), corev1.EventTypeNormal, "RecoveryCompleted", msg)
	h.Metrics.finished("recovered")
	log.Info().Msg(msg)
	return nil
}

func onlyNoRoom(pending []VM, st *incident) bool {
	for _, vm := range pending {
		if !contains(st.NoRoom, vm.Key()) {
			return false
		}
	}
	return true
}

func noRoomNote(st *incident) string {
	if len(st.NoRoom) == 0 {
		return ""
	}
	return " (no room on the other nodes for " + strings.Join(st.NoRoom, ", ") + ")"
}

// summary is the final status: the outcome and the measured phases.
func (h *Handler) summary(st *incident) string {
	restarted := 0
	var stay []string
	for _, vm := range st.VMs {
		if vm.Restarts {
			restarted++
		} else {
			stay = append(stay, fmt.Sprintf("%s (%s)", vm.Key(), vm.RunPolicy))
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "recovered %s: %d VMs Running elsewhere", st.Node, restarted)
	if len(stay) > 0 {
		fmt.Fprintf(&b, "; not restarted by their run policy: %s", strings.Join(stay, ", "))
	}
	if st.Unsafe {
		b.WriteString("; UNSAFE: fencing none, the node was not proven dead")
	}
	b.WriteString("; phases: ")
	if !st.SpellStart.IsZero() {
		fmt.Fprintf(&b, "detected %s after the last heartbeat, ", st.Detected.Sub(st.SpellStart).Round(time.Millisecond))
	} else {
		b.WriteString("detected, ")
	}
	fmt.Fprintf(&b, "gate opened +%s (%s), cleaned up +%s, all Running +%s",
		st.GateOpened.Sub(st.Detected).Round(time.Millisecond), st.GateMode,
		st.CleanedUp.Sub(st.GateOpened).Round(time.Millisecond), st.AllRunning.Sub(st.CleanedUp).Round(time.Millisecond))
	return b.String()
}

// ready handles node.ready: once the node is back and holds no VM pods from
// before it failed, the out-of-service taint drover added comes off.
func (h *Handler) ready(ctx context.Context, op *consumers.Operation, p *schemas.NodeReady) error {
	c := cluster{kube: h.Kube, dyn: h.Dynamic}
	done, msg, err := h.release(ctx, op, c, p.Node)
	if err != nil {
		return err
	}
	if !done {
		return consumers.WaitFor(h.Config.GatePoll, "release", msg)
	}
	return op.Checkpoint(ctx, "done", msg, nil)
}

// release removes drover's out-of-service taint from node if the node is
// healthy again and runs no VM pod from before its failure. done is false
// while it must wait for those pods.
func (h *Handler) release(ctx context.Context, op *consumers.Operation, c cluster, name string) (done bool, msg string, err error) {
	node, lease, err := c.node(ctx, name)
	if err != nil {
		return false, "", err
	}
	if node == nil {
		return true, fmt.Sprintf("node %s no longer exists: nothing to do", name), nil
	}
	hl := Health(node, lease, h.now(), h.Config.LeaseTimeout)
	if !hl.Ready {
		return true, fmt.Sprintf("node %s is not Ready in the API (%s): nothing to do", name, hl.Detail), nil
	}
	if !droverTainted(node) {
		return true, fmt.Sprintf("node %s is Ready; it carries no taint of drover's", name), nil
	}
	pods, err := c.podsOn(ctx, name)
	if err != nil {
		return false, "", err
	}
	var old []string
	for i := range pods {
		if isLauncher(&pods[i]) && pods[i].CreationTimestamp.Time.Before(hl.SpellStart) {
			old = append(old, pods[i].Namespace+"/"+pods[i].Name)
		}
	}
	if len(old) > 0 {
		return false, fmt.Sprintf("node %s is back; waiting for its VM pods from before it failed to go: %s", name, strings.Join(old, ", ")), nil
	}
	removed, err := c.untaint(ctx, name)
	if err != nil {
		return false, "", err
	}
	if removed {
		if _, err := op.UpdateNodeState(ctx, name, func(ns *consumers.NodeState) error {
			var keep []consumers.Taint
			for _, t := range ns.Taints {
				if t.Key != TaintOutOfService && t.Key != TaintRecovering {
					keep = append(keep, t)
				}
			}
			ns.Taints = keep
			return nil
		}); err != nil {
			return false, "", err
		}
		h.event(&corev1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: name, UID: node.UID}, corev1.EventTypeNormal,
			"OutOfServiceTaintRemoved", "node is Ready again and runs none of its VM pods from before: drover removed the taints it added")
	}
	return true, fmt.Sprintf("node %s is Ready and clean: drover's taints removed", name), nil
}

func nodeRef(st *incident) *corev1.ObjectReference {
	return &corev1.ObjectReference{APIVersion: "v1", Kind: "Node", Name: st.Node, UID: types.UID(st.NodeUID)}
}

func vmRef(v VM) *corev1.ObjectReference {
	ref := &corev1.ObjectReference{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachine", Namespace: v.Namespace, Name: v.Name}
	if v.Platform == PlatformDeckhouse {
		ref.APIVersion = DeckhouseVMResource.GroupVersion().String()
		ref.UID = types.UID(v.UID)
	}
	return ref
}

func (h *Handler) event(ref *corev1.ObjectReference, typ, reason, msg string) {
	if h.Events != nil {
		h.Events.Event(ref, typ, reason, msg)
	}
}

func orSomeone(s string) string {
	if s == "" {
		return "someone"
	}
	return s
}
