package maintenance

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/platform"
	"github.com/drover-io/drover/schemas"
)

// EndState is the checkpoint of a maintenance end.
type EndState struct {
	Released bool       `json:"released,omitempty"`
	VMs      []*VMState `json:"vms,omitempty"`
	Outcome  string     `json:"outcome,omitempty"`
}

// end runs maintenance.ended: abort what the maintenance left unfinished,
// give the node back (its taint; the cordon only if drover cordoned it),
// start the VMs shut down until the end, and with returnHome migrate the
// VMs drover moved back, within the limits.
func (h *Handler) end(ctx context.Context, op *consumers.Operation, req *schemas.MaintenanceEnded) error {
	key := consumers.MaintenanceOperationKey(req.Node, req.RequestID)
	var ms State
	if rec, found, err := op.Related(ctx, key); err != nil {
		return err
	} else if found && len(rec.Data) > 0 {
		if err := json.Unmarshal(rec.Data, &ms); err != nil {
			return consumers.Terminalf("decode the checkpoint of %s: %v", key, err)
		}
	}
	var es EndState
	if _, err := op.Data(&es); err != nil {
		return consumers.Terminal(err)
	}
	if !es.Released {
		// The maintenance's handler aborts its own migrations when it sees the
		// cancel; this covers one that is not running any more.
		if err := h.Cluster.AbortMigrations(ctx, key, h.AbortTimeout, h.Tick); err != nil {
			return err
		}
		if err := h.releaseFor(ctx, op, req.Node, req.RequestID, key); err != nil {
			return err
		}
		es.Released = true
		for _, v := range ms.VMs {
			switch {
			case Action(v.Action) == ActionShutdownRestartAfter && v.Phase == PhaseStopped:
				es.VMs = append(es.VMs, &VMState{Namespace: v.Namespace, Name: v.Name, Platform: v.Platform,
					Action: string(ActionShutdownRestartAfter), From: v.From, Phase: PhaseStarting, Reason: "started again: the maintenance ended"})
			case ms.Request.ReturnHome && v.Moved && v.Phase == PhaseMigrated:
				vmi := h.Cluster.VMI(v.Namespace, v.Name)
				uid := ""
				if vmi != nil {
					uid = string(vmi.UID)
				}
				es.VMs = append(es.VMs, &VMState{Namespace: v.Namespace, Name: v.Name, Platform: v.Platform,
					Action: string(ActionMigrate), UID: uid, From: v.To, To: req.Node, Phase: PhaseReturning,
					Expected: v.Expected, Predicted: v.Predicted, Reason: "return home"})
			}
		}
		h.Cluster.RecordNode(req.Node, corev1.EventTypeNormal, "MaintenanceEnded",
			fmt.Sprintf("drover maintenance %s ended; %d VMs to start or bring home", req.RequestID, len(es.VMs)))
		if err := op.Checkpoint(ctx, "released", "node given back", es); err != nil {
			return err
		}
	}
	home := req.Node
	for {
		if _, _, err := platform.Signal(ctx, op); err != nil {
			return err
		}
		select {
		case <-op.Preempted():
			if err := op.Checkpoint(ctx, "suspended", "pre-empted", es); err != nil {
				return err
			}
			return consumers.Yield("checkpointed the end of the maintenance of " + home)
		default:
		}
		pending := 0
		for _, v := range retriesLast(es.VMs) {
			if v.Final {
				continue
			}
			var err error
			if Action(v.Action) == ActionMigrate {
				err = h.Mover.Step(ctx, op, v, func(vmi *kvv1.VirtualMachineInstance) bool { return vmi.Status.NodeName == home },
					map[string]string{corev1.LabelHostname: home})
				if v.Final && v.Phase == PhaseMigrated {
					v.Phase = PhaseHome
					platform.Report(ctx, op, v, "back on "+home)
				}
			} else {
				err = h.stepStart(ctx, op, v)
			}
			if err != nil {
				return err
			}
			if !v.Final {
				pending++
			}
		}
		if err := op.Checkpoint(ctx, "returning", h.endCounts(es), es); err != nil {
			return err
		}
		if pending == 0 {
			break
		}
		h.Cluster.Wait(ctx, op, h.Tick)
	}
	es.Outcome = "ended"
	msg := "maintenance " + req.RequestID + " ended; node " + home + " given back"
	if len(es.VMs) > 0 {
		msg += "; " + h.endCounts(es)
	}
	return op.Checkpoint(ctx, "ended", msg, es)
}

func (h *Handler) endCounts(es EndState) string {
	return h.counts(&State{VMs: es.VMs})
}

// stepStart starts a VM drover shut down until the end of the maintenance.
func (h *Handler) stepStart(ctx context.Context, op *consumers.Operation, v *VMState) error {
	c := h.Cluster
	vmi := c.VMI(v.Namespace, v.Name)
	if vmi != nil && vmi.Status.Phase == kvv1.Running {
		v.Phase, v.Final, v.To = PhaseStarted, true, vmi.Status.NodeName
		platform.Report(ctx, op, v, "running on "+v.To)
		return nil
	}
	if !v.Requested {
		platformOf := v.Platform
		if platformOf == "" {
			platformOf = platform.KubeVirt
		}
		if err := c.Start(ctx, platformOf, v.Namespace, v.Name, op.Key(), op.Token()); err != nil {
			return err
		}
		v.Requested, v.Started = true, time.Now().UTC()
		platform.Report(ctx, op, v, "start requested")
		return op.Flush(ctx)
	}
	if time.Since(v.Started) > h.RestartTimeout {
		v.Fail, v.Final, v.Phase, v.Reason = true, true, PhaseFailed, "not running "+roundDur(h.RestartTimeout).String()+" after its start"
		platform.Report(ctx, op, v, v.Reason)
	}
	return nil
}
