package platform

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
)

// Per-VM phases in progress and status events.
const (
	PhasePlanned    = "Planned"
	PhaseBlocked    = "Blocked"
	PhaseSkipped    = "Skipped"
	PhaseWaiting    = "Waiting"
	PhaseMigrating  = "Migrating"
	PhaseMigrated   = "Migrated"
	PhaseRestarting = "Restarting"
	PhaseRestarted  = "Restarted"
	PhaseStopping   = "Stopping"
	PhaseStopped    = "Stopped"
	PhaseStayed     = "Stayed"
	PhaseFailed     = "Failed"
	PhaseGone       = "Gone"
	PhaseReturning  = "Returning"
	PhaseHome       = "Home"
	PhaseStarting   = "Starting"
	PhaseStarted    = "Started"
)

// VMState is where one VM of an operation stands; workflows checkpoint it.
type VMState struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Platform  string `json:"platform"`
	// Action is the workflow's plan for it (Migrate, Restart, ...).
	Action string `json:"action"`
	// UID is the VMI's when planned: a new UID means the VM was restarted.
	UID       string        `json:"uid"`
	From      string        `json:"from"`
	To        string        `json:"to,omitempty"`
	Phase     string        `json:"phase"`
	Reason    string        `json:"reason,omitempty"`
	Requested bool          `json:"requested,omitempty"`
	Attempts  int           `json:"attempts,omitempty"`
	Expected  time.Duration `json:"expected,omitempty"`
	Predicted time.Duration `json:"predicted,omitempty"`
	Started   time.Time     `json:"started,omitzero"`
	Done      time.Time     `json:"done,omitzero"`
	// LastFailure is when the last failed migration of the VM was seen.
	LastFailure time.Time `json:"lastFailure,omitzero"`
	// Moved: live-migrated away by this operation (a return-home candidate).
	Moved bool `json:"moved,omitempty"`
	Final bool `json:"final,omitempty"`
	Fail  bool `json:"failed,omitempty"`
}

// Key is namespace/name.
func (v *VMState) Key() string { return v.Namespace + "/" + v.Name }

// Report records one VM's progress on the operation (published as a status
// delta).
func Report(ctx context.Context, op *consumers.Operation, v *VMState, msg string) {
	node := v.To
	if node == "" {
		node = v.From
	}
	if err := op.Progress(ctx, v.Key(), consumers.TargetProgress{Phase: v.Phase, Node: node, Message: msg}); err != nil {
		zerolog.Ctx(ctx).Debug().Err(err).Str("vm", v.Key()).Msg("progress not recorded")
	}
}

// SetPhase reports a phase and message when they changed.
func SetPhase(ctx context.Context, op *consumers.Operation, v *VMState, phase, msg string) {
	if p, ok := op.Target(v.Key()); ok && p.Phase == phase && p.Message == msg {
		return
	}
	v.Phase = phase
	Report(ctx, op, v, msg)
}

// Mover drives live migrations one step at a time for the workflows: at
// most one migration object of an operation per VM at a time, created within
// the cluster's limits and never while KubeVirt's admission would refuse
// it, retried with backoff a bounded number of times.
type Mover struct {
	Cluster *Cluster
	// MaxAttempts bounds the migrations of one VM per operation (default 3);
	// RetryBackoff is the wait before the second (default 5s, doubling).
	MaxAttempts  int
	RetryBackoff time.Duration
	// mu serializes the limit check and the create of a migration in this
	// process, for every workflow that shares the Mover.
	mu sync.Mutex
}

func (m *Mover) attempts() int {
	if m.MaxAttempts <= 0 {
		return 3
	}
	return m.MaxAttempts
}

func (m *Mover) backoff() time.Duration {
	if m.RetryBackoff <= 0 {
		return 5 * time.Second
	}
	return m.RetryBackoff
}

// Mine returns the migration objects of VM ns/name created by operation op,
// and an unfinished one somebody else created.
func (c *Cluster) Mine(op, ns, name string) (mine []Migration, other *Migration) {
	hash := OpHash(op)
	for _, m := range c.MigrationsForVM(ns, name) {
		if m.Operation == hash {
			mine = append(mine, m)
		} else if !m.Final {
			mm := m
			other = &mm
		}
	}
	return mine, other
}

// Step moves VM v by live migration until goal holds for its VMI; selector
// is added to the migration's target node selection. It updates v and
// reports it; v.Final says it is done (v.Fail: for good, not moved).
func (m *Mover) Step(ctx context.Context, op *consumers.Operation, v *VMState, goal func(*kvv1.VirtualMachineInstance) bool, selector map[string]string) error {
	c := m.Cluster
	vmi := c.VMI(v.Namespace, v.Name)
	now := time.Now()
	done := func(phase, msg string) {
		v.Phase, v.Final, v.Done = phase, true, now.UTC()
		Report(ctx, op, v, msg)
	}
	if vmi == nil {
		// A VM whose run strategy restarts it comes back: wait for it.
		if c.VM(v.Namespace, v.Name) == nil && c.DeckhouseVM(v.Namespace, v.Name) == nil || !restarts(c.RunStrategy(nil, v.Namespace, v.Name)) {
			done(PhaseGone, "the VMI is gone (stopped or deleted by someone else)")
			return nil
		}
		SetPhase(ctx, op, v, PhaseWaiting, "the VMI is gone; its run strategy starts it again")
		return nil
	}
	if string(vmi.UID) != v.UID {
		if vmi.Status.Phase == kvv1.Running && goal(vmi) {
			v.To = vmi.Status.NodeName
			done(PhaseRestarted, "restarted on "+v.To+" by its run strategy, not migrated")
		}
		return nil
	}
	mine, other := c.Mine(op.Key(), v.Namespace, v.Name)
	var open, last *Migration
	failures := 0
	for i := range mine {
		mg := &mine[i]
		last = mg
		if !mg.Final {
			open = mg
		} else if !mg.Succeeded {
			failures++
		}
	}
	if vmi.Status.Phase == kvv1.Running && goal(vmi) && open == nil && other == nil &&
		(vmi.Status.MigrationState == nil || vmi.Status.MigrationState.Completed) {
		v.To = vmi.Status.NodeName
		var took time.Duration
		if !v.Started.IsZero() {
			took = now.Sub(v.Started)
		}
		if took > 0 && last != nil && last.Succeeded {
			c.Estimator.ObserveMigration(v.Predicted, took)
			v.Moved = true
		}
		msg := fmt.Sprintf("%s -> %s", v.From, v.To)
		if took > 0 {
			msg += fmt.Sprintf(" in %s", took.Round(10*time.Millisecond))
			if v.Expected > 0 {
				msg += fmt.Sprintf(" (expected %s)", v.Expected.Round(10*time.Millisecond))
			}
		}
		done(PhaseMigrated, msg)
		c.RecordVM(vmi, v.Namespace, v.Name, corev1.EventTypeNormal, "Migrated", "drover: "+msg)
		return nil
	}
	if vmi.Status.Phase != kvv1.Running {
		SetPhase(ctx, op, v, PhaseWaiting, fmt.Sprintf("the VMI is %s", vmi.Status.Phase))
		return nil
	}
	if open != nil {
		SetPhase(ctx, op, v, PhaseMigrating, fmt.Sprintf("%s %s (attempt %d)", open.Name, orPending(open.Phase), failures+1))
		return nil
	}
	if other != nil {
		SetPhase(ctx, op, v, PhaseWaiting, "another migration of this VM is in flight: "+other.Name)
		return nil
	}
	if last != nil && last.Succeeded {
		return nil // the caches have not caught up with the hand-over yet
	}
	if failures > 0 {
		if v.LastFailure.IsZero() || v.Attempts < failures {
			v.LastFailure, v.Attempts = now.UTC(), failures
			c.RecordVM(vmi, v.Namespace, v.Name, corev1.EventTypeWarning, "MigrationFailed", fmt.Sprintf("drover: migration %s failed: %s", last.Name, last.Reason))
		}
		if failures >= m.attempts() {
			v.Fail, v.Reason = true, fmt.Sprintf("%d migrations failed; last: %s", failures, last.Reason)
			done(PhaseFailed, v.Reason)
			return nil
		}
		backoff := m.backoff() << (failures - 1)
		if left := backoff - now.Sub(v.LastFailure); left > 0 {
			SetPhase(ctx, op, v, PhaseWaiting, fmt.Sprintf("retrying in %s after: %s", left.Round(100*time.Millisecond), last.Reason))
			return nil
		}
	}
	if ok, why := c.CanMigrate(vmi); !ok {
		SetPhase(ctx, op, v, PhaseWaiting, why)
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	free, inCluster, fromNode := c.Slots(vmi.Status.NodeName)
	if free <= 0 {
		SetPhase(ctx, op, v, PhaseWaiting, fmt.Sprintf("waiting for a migration slot (%d in the cluster, %d from %s)", inCluster, fromNode, vmi.Status.NodeName))
		return nil
	}
	name := MigrationName(op.Key(), v.Name, failures+1)
	if err := c.CreateMigration(ctx, vmi, name, selector, op.Key(), op.Token()); err != nil {
		if apierrors.IsForbidden(err) || apierrors.IsInvalid(err) || apierrors.IsTooManyRequests(err) || strings.Contains(err.Error(), "admission webhook") {
			// Refused: look again at the next change rather than fail.
			SetPhase(ctx, op, v, PhaseWaiting, err.Error())
			return nil
		}
		return err
	}
	v.Attempts = failures + 1
	if v.Started.IsZero() || failures > 0 {
		v.Started = now.UTC()
	}
	v.Phase = PhaseMigrating
	Report(ctx, op, v, fmt.Sprintf("%s created (attempt %d)", name, v.Attempts))
	c.RecordVM(vmi, v.Namespace, v.Name, corev1.EventTypeNormal, "MigrationStarted", "drover: "+name+" ("+op.Key()+")")
	return op.Flush(ctx)
}

func orPending(s string) string {
	if s == "" {
		return "Pending"
	}
	return s
}

// restarts reports whether a run strategy (KubeVirt) or run policy
// (Deckhouse) starts a VM again once it is gone.
func restarts(runStrategy string) bool {
	switch runStrategy {
	case "Always", "RerunOnFailure", "AlwaysOn", "AlwaysOnUnlessStoppedManually":
		return true
	}
	return false
}

// AbortMigrations deletes the unfinished migrations operation key created
// and waits, up to timeout, until none is left unfinished.
func (c *Cluster) AbortMigrations(ctx context.Context, key string, timeout, tick time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		open := 0
		for _, m := range c.MigrationsOf(key) {
			if m.Final {
				continue
			}
			open++
			if !m.Deleting {
				if err := c.DeleteMigration(ctx, m); err != nil {
					return err
				}
			}
		}
		if open == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d aborted migrations of %s have not settled after %s", open, key, timeout)
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-c.Changed():
		case <-time.After(tick):
		}
	}
}

// Signal is what a workflow's loop should do about a cancel or a
// pre-emption: a cancel wins over a pre-emption; a context that ended
// returns its cause.
func Signal(ctx context.Context, op *consumers.Operation) (cancelled, preempted bool, err error) {
	select {
	case <-op.Cancelled():
		return true, false, nil
	default:
	}
	select {
	case <-op.Preempted():
		return false, true, nil
	case <-ctx.Done():
		return false, false, context.Cause(ctx)
	default:
	}
	return false, false, nil
}

// Wait blocks until the cluster changes, tick passes, or a signal arrives.
func (c *Cluster) Wait(ctx context.Context, op *consumers.Operation, tick time.Duration) {
	t := time.NewTimer(tick)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-op.Cancelled():
	case <-op.Preempted():
	case <-c.Changed():
		// Let a burst of changes settle before looking.
		select {
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
		}
	case <-t.C:
	}
}
