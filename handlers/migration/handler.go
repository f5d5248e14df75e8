package migration

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/platform"
	"github.com/drover-io/drover/schemas"
)

// Handler is the single-VM migration workflow: vm.migrate.requested moves
// one VM (optionally to nodes matching a selector) and is acked when it
// succeeded or failed for good; vm.migrate.cancelled deletes the migration
// while it is Pending or Running and reports whether the abort won.
type Handler struct {
	Cluster *platform.Cluster
	// Mover is shared with the maintenance workflow, so that both keep to
	// the cluster's migration limits together.
	Mover *platform.Mover
	// Tick bounds a wait for a change in the cluster (default 1s);
	// AbortTimeout the wait for an aborted migration to settle (default 2m).
	Tick         time.Duration
	AbortTimeout time.Duration
}

var _ consumers.Handler = (*Handler)(nil)

// State is the checkpoint of a migration request.
type State struct {
	VM      platform.VMState `json:"vm"`
	Outcome string           `json:"outcome,omitempty"`
}

// Handle implements consumers.Handler.
func (h *Handler) Handle(ctx context.Context, op *consumers.Operation, e consumers.Event) error {
	if h.Tick <= 0 {
		h.Tick = time.Second
	}
	if h.AbortTimeout <= 0 {
		h.AbortTimeout = 2 * time.Minute
	}
	if h.Mover == nil {
		h.Mover = &platform.Mover{Cluster: h.Cluster}
	}
	if err := h.Cluster.Ready(ctx); err != nil {
		return err
	}
	switch p := e.Payload.(type) {
	case *schemas.VMMigrateRequested:
		return h.migrate(ctx, op, p)
	case *schemas.VMMigrateCancelled:
		return h.cancel(ctx, op, p)
	}
	return consumers.Terminalf("the migration workflow does not handle %s", e.CloudEvent.Type())
}

func (h *Handler) migrate(ctx context.Context, op *consumers.Operation, req *schemas.VMMigrateRequested) error {
	c := h.Cluster
	var st State
	if _, err := op.Data(&st); err != nil {
		return consumers.Terminal(err)
	}
	if st.VM.Name == "" {
		vmi := c.VMI(req.Namespace, req.Name)
		if vmi == nil || vmi.Status.Phase != kvv1.Running || !migratable(vmi) {
			// Reject only what the API server says, not a cache that may
			// not have seen the VM start yet.
			live, err := c.KubeVirt.VirtualMachineInstances(req.Namespace).Get(ctx, req.Name, metav1.GetOptions{})
			switch {
			case apierrors.IsNotFound(err):
				vmi = nil
			case err != nil:
				return fmt.Errorf("read VMI %s/%s (a retry helps): %w", req.Namespace, req.Name, err)
			default:
				vmi = live
			}
		}
		if vmi == nil && c.VM(req.Namespace, req.Name) == nil && c.DeckhouseVM(req.Namespace, req.Name) == nil {
			return consumers.Terminalf("rejected: VM %s/%s does not exist", req.Namespace, req.Name)
		}
		if vmi == nil || vmi.Status.Phase != kvv1.Running {
			return consumers.Terminalf("rejected: VM %s/%s is not running", req.Namespace, req.Name)
		}
		if ok, why := platform.Migratable(vmi); !ok {
			return consumers.Terminalf("rejected: VM %s/%s is not live-migratable: %s", req.Namespace, req.Name, why)
		}
		cfg := c.KubeVirtConfig()
		bw := cfg.Bandwidth
		if bw <= 0 {
			bw = c.Options().Bandwidth
		}
		var mem int64
		if m := vmi.Spec.Domain.Memory; m != nil && m.Guest != nil {
			mem = m.Guest.Value()
		}
		predicted := c.Options().Overhead + time.Duration(float64(mem)/float64(bw)*float64(time.Second))
		corr, _, _ := c.Estimator.Corrections()
		st.VM = platform.VMState{Namespace: req.Namespace, Name: req.Name, Platform: c.PlatformOf(vmi), Action: "Migrate",
			UID: string(vmi.UID), From: vmi.Status.NodeName, Phase: platform.PhasePlanned,
			Predicted: predicted, Expected: time.Duration(float64(predicted) * corr)}
		if err := op.Checkpoint(ctx, "migrating", fmt.Sprintf("migrating %s/%s from %s", req.Namespace, req.Name, st.VM.From), st); err != nil {
			return err
		}
	}
	sel := labels.SelectorFromSet(req.TargetNodeSelector)
	goal := func(vmi *kvv1.VirtualMachineInstance) bool {
		if vmi.Status.NodeName == st.VM.From {
			return false
		}
		if len(req.TargetNodeSelector) == 0 {
			return true
		}
		n := c.Node(vmi.Status.NodeName)
		return n != nil && sel.Matches(labels.Set(n.Labels))
	}
	for {
		cancelled, preempted, err := platform.Signal(ctx, op)
		switch {
		case err != nil:
			return err
		case cancelled:
			return h.abort(ctx, op, &st)
		case preempted:
			if err := op.Checkpoint(ctx, "suspended", "pre-empted by "+op.PreemptedBy().By, st); err != nil {
				return err
			}
			return consumers.Yield("checkpointed the migration of " + st.VM.Key())
		}
		if err := h.Mover.Step(ctx, op, &st.VM, goal, req.TargetNodeSelector); err != nil {
			return err
		}
		if st.VM.Final {
			break
		}
		h.Cluster.Wait(ctx, op, h.Tick)
	}
	v := st.VM
	if v.Fail || v.Phase == platform.PhaseGone {
		st.Outcome = "failed"
		msg := fmt.Sprintf("migration of %s failed: %s", v.Key(), v.Reason)
		if v.Phase == platform.PhaseGone {
			msg = fmt.Sprintf("migration of %s failed: the VM stopped running", v.Key())
		}
		if err := op.Checkpoint(ctx, "failed", msg, st); err != nil {
			return err
		}
		return consumers.Terminalf("%s", msg)
	}
	st.Outcome = "migrated"
	msg := fmt.Sprintf("%s %s: %s -> %s", v.Key(), v.Phase, v.From, v.To)
	if !v.Started.IsZero() && !v.Done.IsZero() {
		msg += fmt.Sprintf(" in %s", v.Done.Sub(v.Started).Round(10*time.Millisecond))
	}
	return op.Checkpoint(ctx, "completed", msg, st)
}

// abort deletes the request's migration while it is unfinished and reports
// whether the abort won (the VM stayed) or the migration completed first.
func (h *Handler) abort(ctx context.Context, op *consumers.Operation, st *State) error {
	c := h.Cluster
	if err := c.AbortMigrations(ctx, op.Key(), h.AbortTimeout, h.Tick); err != nil {
		return err
	}
	v := &st.VM
	msg := ""
	vmi := c.VMI(v.Namespace, v.Name)
	switch {
	case v.Name == "":
		msg = "cancelled before it started"
	case vmi != nil && v.From != "" && vmi.Status.NodeName != v.From && vmi.Status.NodeName != "":
		v.To, v.Phase, v.Final = vmi.Status.NodeName, platform.PhaseMigrated, true
		msg = fmt.Sprintf("the migration completed before the abort: %s moved %s -> %s", v.Key(), v.From, v.To)
	default:
		v.Phase, v.Final = platform.PhaseStayed, true
		msg = fmt.Sprintf("the abort won: %s stays on %s", v.Key(), v.From)
	}
	if v.Name != "" {
		platform.Report(ctx, op, v, msg)
		c.RecordVM(vmi, v.Namespace, v.Name, corev1.EventTypeNormal, "MigrationCancelled", "drover: "+msg)
	}
	st.Outcome = "cancelled"
	return op.Checkpoint(ctx, "cancelled", msg, st)
}

// cancel runs vm.migrate.cancelled. The runtime has marked the VM's
// unfinished migration requests cancelled; their handlers abort and report.
// This one holds the VM's lease after them: it deletes drover migrations of
// the VM that are still unfinished (a request whose handler is gone) and
// reports how the cancelled requests ended.
func (h *Handler) cancel(ctx context.Context, op *consumers.Operation, req *schemas.VMMigrateCancelled) error {
	c := h.Cluster
	for _, m := range c.MigrationsForVM(req.Namespace, req.Name) {
		if m.Operation == "" || m.Final || m.Deleting {
			continue
		}
		if err := c.DeleteMigration(ctx, m); err != nil {
			return err
		}
	}
	recs, err := op.RelatedList(ctx, consumers.MigrationOperationFilter(req.Namespace, req.Name))
	if err != nil {
		return err
	}
	msg := fmt.Sprintf("no migration of %s/%s was in flight", req.Namespace, req.Name)
	var latest *consumers.Record
	for i := range recs {
		r := &recs[i]
		if r.CancelRequested && (latest == nil || r.Created.After(latest.Created)) {
			latest = r
		}
	}
	if latest != nil {
		switch {
		case latest.State == consumers.StateCancelled && latest.Message != "":
			msg = latest.Message
		case latest.State.Terminal():
			msg = fmt.Sprintf("%s had already %s: %s", latest.Key, latest.State, latest.Message)
		default:
			msg = fmt.Sprintf("%s is %s; it aborts when it runs next", latest.Key, latest.State)
		}
	}
	vmi := c.VMI(req.Namespace, req.Name)
	v := &platform.VMState{Namespace: req.Namespace, Name: req.Name, Phase: platform.PhaseStayed}
	if vmi != nil {
		v.From = vmi.Status.NodeName
	}
	if latest != nil && latest.State == consumers.StateCancelled {
		var st State
		if len(latest.Data) > 0 && json.Unmarshal(latest.Data, &st) == nil && st.VM.Phase != "" {
			v.Phase, v.From, v.To = st.VM.Phase, st.VM.From, st.VM.To
		}
	}
	platform.Report(ctx, op, v, msg)
	return op.Checkpoint(ctx, "done", msg, nil)
}

// migratable is platform.Migratable without the reason.
func migratable(vmi *kvv1.VirtualMachineInstance) bool {
	ok, _ := platform.Migratable(vmi)
	return ok
}
