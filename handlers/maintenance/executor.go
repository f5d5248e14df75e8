package maintenance

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/util/retry"
	"k8s.io/kubectl/pkg/drain"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/platform"
	"github.com/drover-io/drover/schemas"
)

// Handler is the maintenance workflow: maintenance.requested evacuates a
// node (or only plans, for a dry run), maintenance.ended undoes what drover
// did to it.
type Handler struct {
	Cluster *platform.Cluster
	// MaxMigrationAttempts bounds the migrations of one VM per request
	// (default 3); RetryBackoff is the wait before the second (default 5s,
	// doubling).
	MaxMigrationAttempts int
	RetryBackoff         time.Duration
	// RestartTimeout is how long a restarted VM may take to run elsewhere
	// before it is reported failed (default 5m).
	RestartTimeout time.Duration
	// Tick bounds a wait for a change in the cluster (default 1s).
	Tick time.Duration
	// EvictionRetry is how soon evictions refused by a disruption budget are
	// tried again (default 5s).
	EvictionRetry time.Duration
	// AbortTimeout bounds the wait for aborted migrations to settle (default 2m).
	AbortTimeout time.Duration

	// Mover starts and follows live migrations; share it with the
	// migration workflow so that both respect the limits together.
	Mover *platform.Mover
	// Metrics, nil: none recorded.
	Metrics *Metrics

	// planMu serializes plan and cordon in this process, so that two
	// requests of one rack see each other's nodes in maintenance.
	planMu sync.Mutex
}

// VMState is where one VM of a maintenance stands.
type VMState = platform.VMState

// Per-VM phases.
const (
	PhasePlanned    = platform.PhasePlanned
	PhaseBlocked    = platform.PhaseBlocked
	PhaseSkipped    = platform.PhaseSkipped
	PhaseMigrated   = platform.PhaseMigrated
	PhaseRestarting = platform.PhaseRestarting
	PhaseRestarted  = platform.PhaseRestarted
	PhaseStopping   = platform.PhaseStopping
	PhaseStopped    = platform.PhaseStopped
	PhaseStayed     = platform.PhaseStayed
	PhaseFailed     = platform.PhaseFailed
	PhaseReturning  = platform.PhaseReturning
	PhaseHome       = platform.PhaseHome
	PhaseStarting   = platform.PhaseStarting
	PhaseStarted    = platform.PhaseStarted
)

var _ consumers.Handler = (*Handler)(nil)

func (h *Handler) defaults() {
	if h.MaxMigrationAttempts <= 0 {
		h.MaxMigrationAttempts = 3
	}
	if h.RetryBackoff <= 0 {
		h.RetryBackoff = 5 * time.Second
	}
	if h.RestartTimeout <= 0 {
		h.RestartTimeout = 5 * time.Minute
	}
	if h.Tick <= 0 {
		h.Tick = time.Second
	}
	if h.EvictionRetry <= 0 {
		h.EvictionRetry = 5 * time.Second
	}
	if h.AbortTimeout <= 0 {
		h.AbortTimeout = 2 * time.Minute
	}
	if h.Mover == nil {
		h.Mover = &platform.Mover{Cluster: h.Cluster, MaxAttempts: h.MaxMigrationAttempts, RetryBackoff: h.RetryBackoff}
	}
}

// State is the checkpoint of a maintenance: the request, the first plan,
// and where each VM stands.
type State struct {
	Request  schemas.MaintenanceRequested `json:"request"`
	Plan     Plan                         `json:"plan"`
	Started  time.Time                    `json:"started"`
	Cordoned bool                         `json:"cordoned,omitempty"`
	VMs      []*VMState                   `json:"vms,omitempty"`
	Finished time.Time                    `json:"finished,omitzero"`
	Makespan time.Duration                `json:"makespan,omitempty"`
	// Outcome: planned, rejected, completed, failed, cancelled; "" while it runs.
	Outcome string `json:"outcome,omitempty"`
	Message string `json:"message,omitempty"`
}

// Handle implements consumers.Handler.
func (h *Handler) Handle(ctx context.Context, op *consumers.Operation, e consumers.Event) error {
	h.defaults()
	if err := h.Cluster.Ready(ctx); err != nil {
		return err
	}
	switch p := e.Payload.(type) {
	case *schemas.MaintenanceRequested:
		return h.start(ctx, op, p)
	case *schemas.MaintenanceEnded:
		return h.end(ctx, op, p)
	}
	return consumers.Terminalf("the maintenance workflow does not handle %s", e.CloudEvent.Type())
}

// taintValue is the request id as a taint value (a label value): as it is
// when valid, else a hash of it.
func taintValue(requestID string) string {
	if len(validation.IsValidLabelValue(requestID)) == 0 && requestID != "" {
		return requestID
	}
	return "h" + schemas.DeterministicID(requestID)[:20]
}

// start runs maintenance.requested.
func (h *Handler) start(ctx context.Context, op *consumers.Operation, req *schemas.MaintenanceRequested) error {
	c := h.Cluster
	if c.Node(req.Node) == nil {
		if _, err := c.Kube.CoreV1().Nodes().Get(ctx, req.Node, metav1.GetOptions{}); apierrors.IsNotFound(err) {
			return consumers.Terminalf("rejected: node %s does not exist", req.Node)
		}
	}
	var st State
	found, err := op.Data(&st)
	if err != nil {
		return consumers.Terminal(err)
	}
	if !found || st.Request.RequestID == "" {
		st = State{Request: *req, Started: time.Now().UTC()}
	}
	select {
	case <-op.Cancelled():
		// Ended before it ran (or while it was suspended): never cordon again.
		return h.abort(ctx, op, &st)
	default:
	}
	if !st.Cordoned {
		h.planMu.Lock()
		done, err := h.planAndCordon(ctx, op, &st)
		h.planMu.Unlock()
		if done || err != nil {
			return err
		}
	} else {
		h.replan(op, &st)
	}
	return h.evacuate(ctx, op, &st)
}

// vmStates turns the plan's steps into per-VM states.
func (h *Handler) vmStates(p Plan, node string) []*VMState {
	var out []*VMState
	for _, s := range p.Steps {
		vmi := h.Cluster.VMI(s.Namespace, s.Name)
		v := &VMState{Namespace: s.Namespace, Name: s.Name, Action: string(s.Action), From: node, Phase: PhasePlanned,
			Reason: s.Reason, Expected: s.Expected, Platform: h.Cluster.PlatformOf(vmi)}
		if vmi != nil {
			v.UID = string(vmi.UID)
		}
		if s.Action == ActionMigrate {
			m := p.Model
			m.Correction = 1
			v.Predicted = m.MigrationTime(s.GuestMemory)
		} else {
			v.Predicted = p.Model.RestartTime
		}
		switch s.Action {
		case ActionBlocked:
			v.Phase = PhaseBlocked
		case ActionNone:
			v.Phase, v.Final = PhaseSkipped, true
		}
		out = append(out, v)
	}
	return out
}

// planAndCordon plans, and either stops there (dry run, rejection) or
// cordons and taints the node. done says the handler is finished.
func (h *Handler) planAndCordon(ctx context.Context, op *consumers.Operation, st *State) (done bool, err error) {
	c := h.Cluster
	req := st.Request
	// Plan from caches that hold at least what the API server holds now: a
	// node a person uncordoned just before asking must count as room.
	if err := c.Fresh(ctx); err != nil {
		return true, err
	}
	p := Make(inventory(c, req.Node, req.Mode, req.Force, op.Key()))
	st.Plan = p
	st.VMs = h.vmStates(p, req.Node)
	for _, v := range st.VMs {
		platform.Report(ctx, op, v, string(v.Action)+": "+v.Reason)
	}
	if req.DryRun {
		st.Outcome, st.Message = "planned", p.Summary()
		return true, op.Checkpoint(ctx, "planned", "dry run: "+p.Summary(), st)
	}
	if p.Rejected != "" {
		return true, h.reject(ctx, op, st, p.Rejected)
	}
	if nst, err := op.NodeState(ctx, req.Node); err != nil {
		return true, err
	} else if nst.Maintenance != "" && nst.Maintenance != op.Key() {
		return true, h.reject(ctx, op, st, "the node is already in maintenance "+nst.Maintenance)
	}
	if err := h.cordon(ctx, op, req.Node, req.RequestID); err != nil {
		return true, err
	}
	// The next request planned in this process must see this node out.
	if err := h.waitTainted(ctx, req.Node, taintValue(req.RequestID)); err != nil {
		return true, err
	}
	// Another replica may have cordoned a node of the same rack meanwhile:
	// look again now that this node is out, and give it back if the two no
	// longer fit together.
	if again := Make(inventory(c, req.Node, req.Mode, req.Force, op.Key())); again.Rejected != "" && !req.Force {
		if err := h.release(ctx, op, req.Node, req.RequestID); err != nil {
			return true, err
		}
		return true, h.reject(ctx, op, st, again.Rejected)
	}
	st.Cordoned = true
	c.RecordNode(req.Node, corev1.EventTypeNormal, "MaintenanceStarted",
		fmt.Sprintf("drover maintenance %s (%s): %s", req.RequestID, req.Reason, p.Summary()))
	return false, op.Checkpoint(ctx, "evacuating", p.Summary(), st)
}

func (h *Handler) reject(ctx context.Context, op *consumers.Operation, st *State, why string) error {
	st.Outcome, st.Message = "rejected", "rejected: "+why
	h.Cluster.RecordNode(st.Request.Node, corev1.EventTypeWarning, "MaintenanceRejected",
		fmt.Sprintf("drover maintenance %s rejected: %s", st.Request.RequestID, why))
	if err := op.Checkpoint(ctx, "rejected", st.Message, st); err != nil {
		return err
	}
	return consumers.Terminalf("rejected: maintenance of %s: %s", st.Request.Node, why)
}

// replan adds VMs that appeared on the node since the checkpoint (an
// earlier attempt may have crashed before it saw them).
func (h *Handler) replan(op *consumers.Operation, st *State) {
	req := st.Request
	known := map[string]bool{}
	for _, v := range st.VMs {
		known[v.Key()] = true
	}
	p := Make(inventory(h.Cluster, req.Node, req.Mode, req.Force, op.Key()))
	for _, v := range h.vmStates(p, req.Node) {
		if !known[v.Key()] && Action(v.Action) != ActionNone {
			if Action(v.Action) == ActionBlocked {
				v.Final, v.Fail, v.Phase = true, true, PhaseFailed
			}
			st.VMs = append(st.VMs, v)
		}
	}
}

// cordon records in the node's state that drover cordons it (unless a person
// already did), then cordons and taints it.
func (h *Handler) cordon(ctx context.Context, op *consumers.Operation, node, requestID string) error {
	c := h.Cluster
	n, err := c.Kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("cordon %s: %w", node, err)
	}
	taint := consumers.Taint{Key: TaintKey, Value: taintValue(requestID), Effect: string(corev1.TaintEffectNoSchedule)}
	if _, err := op.UpdateNodeState(ctx, node, func(s *consumers.NodeState) error {
		if s.Maintenance != op.Key() {
			s.CordonedByDrover = !n.Spec.Unschedulable
		}
		s.Maintenance = op.Key()
		for _, t := range s.Taints {
			if t == taint {
				return nil
			}
		}
		s.Taints = append(s.Taints, taint)
		return nil
	}); err != nil {
		return err
	}
	if !n.Spec.Unschedulable {
		ch := drain.NewCordonHelper(n)
		if ch.UpdateIfRequired(true) {
			if err, patchErr := ch.PatchOrReplaceWithContext(ctx, c.Kube, false); err != nil || patchErr != nil {
				return fmt.Errorf("cordon %s: %w", node, errors.Join(err, patchErr))
			}
		}
		c.RecordNode(node, corev1.EventTypeNormal, "Cordoned", "cordoned by drover for maintenance "+requestID)
	}
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := c.Kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, t := range n.Spec.Taints {
			if t.Key == taint.Key && t.Value == taint.Value && string(t.Effect) == taint.Effect {
				return nil
			}
		}
		n.Spec.Taints = append(n.Spec.Taints, corev1.Taint{Key: taint.Key, Value: taint.Value, Effect: corev1.TaintEffectNoSchedule})
		_, err = c.Kube.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		return err
	})
}

// waitTainted waits until the caches show node cordoned with drover's taint.
func (h *Handler) waitTainted(ctx context.Context, node, value string) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		if n := h.Cluster.Node(node); n != nil && n.Spec.Unschedulable {
			for _, t := range n.Spec.Taints {
				if t.Key == TaintKey && t.Value == value {
					return nil
				}
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("node %s: the cordon and taint did not show in the cache within 30s", node)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-h.Cluster.Changed():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// release removes drover's taint of this request and uncordons the node if
// drover cordoned it for operation key, then clears the node's state.
func (h *Handler) release(ctx context.Context, op *consumers.Operation, node, requestID string) error {
	return h.releaseFor(ctx, op, node, requestID, op.Key())
}

func (h *Handler) releaseFor(ctx context.Context, op *consumers.Operation, node, requestID, maintenanceKey string) error {
	c := h.Cluster
	st, err := op.NodeState(ctx, node)
	if err != nil {
		return err
	}
	ours := st.Maintenance == maintenanceKey
	value := taintValue(requestID)
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := c.Kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err != nil {
			return err
		}
		var keep []corev1.Taint
		changed := false
		for _, t := range n.Spec.Taints {
			if t.Key == TaintKey && t.Value == value {
				changed = true
				continue
			}
			keep = append(keep, t)
		}
		otherMaintenance := false
		for _, t := range keep {
			otherMaintenance = otherMaintenance || t.Key == TaintKey
		}
		if ours && st.CordonedByDrover && n.Spec.Unschedulable && !otherMaintenance {
			n.Spec.Unschedulable = false
			changed = true
		}
		if !changed {
			return nil
		}
		n.Spec.Taints = keep
		_, err = c.Kube.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		if err == nil && !n.Spec.Unschedulable && ours && st.CordonedByDrover {
			c.RecordNode(node, corev1.EventTypeNormal, "Uncordoned", "uncordoned by drover: maintenance "+requestID+" ended")
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("release node %s: %w", node, err)
	}
	if !ours {
		return nil
	}
	_, err = op.UpdateNodeState(ctx, node, func(s *consumers.NodeState) error {
		if s.Maintenance != maintenanceKey {
			return nil
		}
		s.Maintenance, s.CordonedByDrover = "", false
		var keep []consumers.Taint
		for _, t := range s.Taints {
			if !(t.Key == TaintKey && t.Value == value) {
				keep = append(keep, t)
			}
		}
		s.Taints = keep
		return nil
	})
	return err
}

// evacuate drives every VM to its planned end, then evicts the remaining pods.
func (h *Handler) evacuate(ctx context.Context, op *consumers.Operation, st *State) error {
	node := st.Request.Node
	for {
		cancelled, preempted, err := platform.Signal(ctx, op)
		switch {
		case err != nil:
			return err
		case cancelled:
			return h.abort(ctx, op, st)
		case preempted:
			if err := op.Checkpoint(ctx, "suspended", "pre-empted by "+op.PreemptedBy().By, st); err != nil {
				return err
			}
			return consumers.Yield("checkpointed the evacuation of " + node)
		}
		pending := 0
		for _, v := range retriesLast(st.VMs) {
			if v.Final {
				continue
			}
			var err error
			switch Action(v.Action) {
			case ActionMigrate:
				err = h.Mover.Step(ctx, op, v, func(vmi *kvv1.VirtualMachineInstance) bool { return vmi.Status.NodeName != node }, nil)
			case ActionRestart:
				err = h.stepRestart(ctx, op, v, node)
			case ActionShutdown, ActionShutdownRestartAfter:
				err = h.stepStop(ctx, op, v)
			default:
				v.Final = true
			}
			if err != nil {
				return err
			}
			if !v.Final {
				pending++
			}
		}
		if err := op.Checkpoint(ctx, "evacuating", h.counts(st), st); err != nil {
			return err
		}
		if pending == 0 {
			break
		}
		h.Cluster.Wait(ctx, op, h.Tick)
	}
	if blocked, err := h.evictRest(ctx, st); err != nil {
		return err
	} else if blocked != "" {
		if err := op.Checkpoint(ctx, "evicting", blocked, st); err != nil {
			return err
		}
		return consumers.WaitFor(h.EvictionRetry, "eviction", blocked)
	}
	return h.finish(ctx, op, st)
}

// retriesLast orders the VMs for the next pass: in plan order, but a VM
// whose migration failed before goes after every VM not tried yet, so that a
// guest that does not converge does not take the slots of the others.
func retriesLast(vms []*VMState) []*VMState {
	out := append([]*VMState(nil), vms...)
	sort.SliceStable(out, func(i, j int) bool { return out[i].LastFailure.IsZero() && !out[j].LastFailure.IsZero() })
	return out
}

// counts is a one-line summary of where the VMs stand.
func (h *Handler) counts(st *State) string {
	by := map[string]int{}
	for _, v := range st.VMs {
		by[v.Phase]++
	}
	keys := make([]string, 0, len(by))
	for k := range by {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%d %s", by[k], strings.ToLower(k)))
	}
	return strings.Join(parts, ", ")
}

// finish records the outcome: completed when every VM reached its planned
// state, failed (terminal) when some could not.
func (h *Handler) finish(ctx context.Context, op *consumers.Operation, st *State) error {
	c := h.Cluster
	first := st.Finished.IsZero()
	if first {
		st.Finished = time.Now().UTC()
		st.Makespan = st.Finished.Sub(st.Started)
	}
	var failed []string
	for _, v := range st.VMs {
		if v.Fail {
			failed = append(failed, v.Key()+": "+v.Reason)
		}
	}
	// Observed once the final checkpoint holds (Finished set): a retry
	// after a failed checkpoint does not observe it again.
	observe := func(outcome string) {
		if first {
			h.Metrics.makespan(outcome, st.Makespan.Seconds())
		}
	}
	figures := fmt.Sprintf("makespan %s (plan estimate %s, lower bound %s)", roundDur(st.Makespan), roundDur(st.Plan.Estimate), roundDur(st.Plan.LowerBound))
	if len(failed) > 0 {
		st.Outcome = "failed"
		st.Message = fmt.Sprintf("failed: %d VMs did not reach their planned state (%s); %s; %s", len(failed), strings.Join(failed, "; "), h.counts(st), figures)
		c.RecordNode(st.Request.Node, corev1.EventTypeWarning, "MaintenanceFailed", st.Message)
		if err := op.Checkpoint(ctx, "failed", st.Message, st); err != nil {
			return err
		}
		observe("failed")
		return consumers.Terminal(errors.New(st.Message))
	}
	st.Outcome = "completed"
	st.Message = fmt.Sprintf("completed: %s; %s", h.counts(st), figures)
	c.RecordNode(st.Request.Node, corev1.EventTypeNormal, "MaintenanceCompleted", st.Message)
	if err := op.Checkpoint(ctx, "completed", st.Message, st); err != nil {
		return err
	}
	observe("completed")
	return nil
}

// stepRestart shuts a VM down through its run strategy (never deleting the
// VM) and waits until a new VMI runs on another node.
func (h *Handler) stepRestart(ctx context.Context, op *consumers.Operation, v *VMState, node string) error {
	c := h.Cluster
	vmi := c.VMI(v.Namespace, v.Name)
	now := time.Now()
	if vmi != nil && string(vmi.UID) != v.UID && vmi.Status.Phase == kvv1.Running && vmi.Status.NodeName != node && vmi.DeletionTimestamp == nil {
		v.To, v.Phase, v.Final, v.Done = vmi.Status.NodeName, PhaseRestarted, true, now.UTC()
		msg := "restarted on " + v.To
		if !v.Started.IsZero() {
			took := now.Sub(v.Started)
			msg += fmt.Sprintf(" in %s (expected %s)", roundDur(took), roundDur(v.Expected))
			c.Estimator.ObserveRestart(v.Predicted, took)
		}
		platform.Report(ctx, op, v, msg)
		c.RecordVM(vmi, v.Namespace, v.Name, corev1.EventTypeNormal, "Restarted", "drover: "+msg+" (maintenance of "+node+")")
		return nil
	}
	if !v.Requested {
		if vmi != nil && string(vmi.UID) == v.UID && vmi.DeletionTimestamp == nil {
			if err := c.Restart(ctx, vmi, op.Key(), op.Token()); err != nil {
				return err
			}
			c.RecordVM(vmi, v.Namespace, v.Name, corev1.EventTypeNormal, "Restarting", "drover: shut down to start on another node (maintenance of "+node+")")
		}
		v.Requested, v.Started, v.Phase = true, now.UTC(), PhaseRestarting
		platform.Report(ctx, op, v, "shut down; its run strategy starts it on another node")
		return op.Flush(ctx)
	}
	if now.Sub(v.Started) > h.RestartTimeout {
		state := "no VMI"
		if vmi != nil {
			state = fmt.Sprintf("VMI %s on %q", vmi.Status.Phase, vmi.Status.NodeName)
		}
		v.Fail, v.Final, v.Phase, v.Reason = true, true, PhaseFailed, fmt.Sprintf("not running on another node %s after its restart (%s)", roundDur(h.RestartTimeout), state)
		platform.Report(ctx, op, v, v.Reason)
	}
	return nil
}

// stepStop shuts a VM down and keeps it down.
func (h *Handler) stepStop(ctx context.Context, op *consumers.Operation, v *VMState) error {
	c := h.Cluster
	vmi := c.VMI(v.Namespace, v.Name)
	now := time.Now()
	if vmi == nil || string(vmi.UID) != v.UID || vmi.IsFinal() {
		v.Phase, v.Final, v.Done = PhaseStopped, true, now.UTC()
		msg := "shut down"
		if Action(v.Action) == ActionShutdownRestartAfter {
			msg += "; started again when the maintenance ends"
		}
		platform.Report(ctx, op, v, msg)
		return nil
	}
	if !v.Requested {
		if err := c.Stop(ctx, vmi, op.Key(), op.Token()); err != nil {
			return err
		}
		c.RecordVM(vmi, v.Namespace, v.Name, corev1.EventTypeNormal, "Stopping", "drover: shut down for the maintenance of "+v.From+" ("+v.Reason+")")
		v.Requested, v.Started, v.Phase = true, now.UTC(), PhaseStopping
		platform.Report(ctx, op, v, v.Reason)
		return op.Flush(ctx)
	}
	return nil
}

// evictRest evicts the node's remaining pods but virt-launcher pods (their
// VMs are handled above) and DaemonSet pods, through the Eviction API, as
// `kubectl drain --ignore-daemonsets --delete-emptydir-data` does. A
// disruption budget that refuses (429) makes it return what blocks.
func (h *Handler) evictRest(ctx context.Context, st *State) (blocked string, err error) {
	c := h.Cluster
	node := st.Request.Node
	d := &drain.Helper{Ctx: ctx, Client: c.Kube, Force: st.Request.Force, GracePeriodSeconds: -1,
		IgnoreAllDaemonSets: true, DeleteEmptyDirData: true, PodSelector: kvv1.AppLabel + "!=virt-launcher",
		Out: io.Discard, ErrOut: io.Discard}
	list, errs := d.GetPodsForDeletion(node)
	if len(errs) > 0 {
		return "", consumers.Terminalf("evict the pods of %s: %v", node, errors.Join(errs...))
	}
	gv, err := drain.CheckEvictionSupport(c.Kube)
	if err != nil {
		return "", err
	}
	var refused, terminating []string
	for _, p := range list.Pods() {
		if p.DeletionTimestamp != nil {
			terminating = append(terminating, p.Namespace+"/"+p.Name)
			continue
		}
		err := d.EvictPod(p, gv)
		switch {
		case err == nil:
			terminating = append(terminating, p.Namespace+"/"+p.Name)
		case apierrors.IsNotFound(err):
		case apierrors.IsTooManyRequests(err):
			refused = append(refused, fmt.Sprintf("%s/%s (%v)", p.Namespace, p.Name, err))
		default:
			return "", fmt.Errorf("evict %s/%s: %w", p.Namespace, p.Name, err)
		}
	}
	if len(refused) > 0 {
		return "eviction refused, a disruption budget allows no disruption now: " + strings.Join(refused, "; "), nil
	}
	if len(terminating) > 0 {
		return "waiting for evicted pods to terminate: " + strings.Join(terminating, ", "), nil
	}
	return "", nil
}

// abort cancels what has not finished after a cancel request: it deletes
// the operation's unfinished migrations, waits until they settled (an abort
// after hand-off can lose: the VM then moved) and reports each VM.
func (h *Handler) abort(ctx context.Context, op *consumers.Operation, st *State) error {
	if err := h.Cluster.AbortMigrations(ctx, op.Key(), h.AbortTimeout, h.Tick); err != nil {
		return err
	}
	moved, stayed := 0, 0
	for _, v := range st.VMs {
		if v.Final || Action(v.Action) != ActionMigrate {
			continue
		}
		vmi := h.Cluster.VMI(v.Namespace, v.Name)
		if vmi != nil && string(vmi.UID) == v.UID && vmi.Status.NodeName != v.From && vmi.Status.NodeName != "" {
			v.To, v.Phase, v.Final, v.Moved = vmi.Status.NodeName, PhaseMigrated, true, true
			platform.Report(ctx, op, v, "the migration completed before the abort: on "+v.To)
			moved++
			continue
		}
		v.Phase, v.Final = PhaseStayed, true
		platform.Report(ctx, op, v, "cancelled: stays on "+v.From)
		stayed++
	}
	st.Outcome = "cancelled"
	st.Message = fmt.Sprintf("cancelled (%s): %d still in flight stayed, %d had moved; %s", op.CancelReason(), stayed, moved, h.counts(st))
	h.Cluster.RecordNode(st.Request.Node, corev1.EventTypeNormal, "MaintenanceCancelled", st.Message)
	return op.Checkpoint(ctx, "cancelled", st.Message, st)
}
