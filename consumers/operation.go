package consumers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Operation is a handler's view of its operation: the record it resumes
// from, a checkpoint, per-target progress, the signals it must react to
// (cancel, pre-emption) and the fencing token of this attempt. It hides NATS
// from handlers. Every method is safe to call from several goroutines.
//
// Writes (Checkpoint, Progress, Flush, UpdateNodeState, Uncancellable) are
// accepted only while this attempt holds the operation: once its lease is
// lost or another attempt took over they return an error wrapping ErrFenced
// and change nothing.
type Operation struct {
	rt       *Runtime
	wf       *workflow
	start    Record
	holder   string
	locks    []Lock
	leases   []*Lease
	progress *progressBook

	mu   sync.Mutex
	rec  Record // the record as this attempt last wrote or read it
	rev  uint64
	dead error // set once the attempt may no longer write

	cancelled    chan struct{}
	cancelOnce   sync.Once
	cancelReason string
	preempted    chan struct{}
	preemptOnce  sync.Once
	yield        YieldRequest
	dirty        chan struct{}

	cancelRun  context.CancelCauseFunc // ends the handler's context
	yieldTimer *time.Timer
	statusSeq  atomic.Int64 // status events published by this attempt

	// The progress loop starts with the first Progress call.
	startProgress  func()
	progressOnce   sync.Once
	progressOn     bool
	progressClosed bool
	progressDone   chan struct{}
}

func (o *Operation) nextStatusSeq() int { return int(o.statusSeq.Add(1)) }

// kickProgress starts the progress loop if it is not running, unless the
// handler has returned.
func (o *Operation) kickProgress() {
	o.progressOnce.Do(func() {
		o.mu.Lock()
		start := !o.progressClosed && o.startProgress != nil
		o.progressOn = start
		o.mu.Unlock()
		if start {
			o.startProgress()
		}
	})
}

// stopProgress ends the progress loop (cancelling the run's context) and
// waits for it; no loop starts afterwards.
func (o *Operation) stopProgress(cancel context.CancelCauseFunc) {
	o.mu.Lock()
	o.progressClosed = true
	on := o.progressOn
	o.mu.Unlock()
	if on {
		cancel(nil)
		<-o.progressDone
	}
}

func newOperation(rt *Runtime, wf *workflow, rec Record, rev uint64, holder string, locks []Lock, leases []*Lease) *Operation {
	return &Operation{rt: rt, wf: wf, start: rec, rec: rec, rev: rev, holder: holder, locks: locks, leases: leases,
		progress: newProgressBook(rt.js, rt.progKV, rec.Key), cancelled: make(chan struct{}), preempted: make(chan struct{}),
		dirty: make(chan struct{}, 1), progressDone: make(chan struct{})}
}

// Key is the operation key.
func (o *Operation) Key() string { return o.start.Key }

// Generation is the operation's generation (1, then one more per manual retry or replay).
func (o *Operation) Generation() int { return max(o.start.Generation, 1) }

// Attempt is this handler run's number within the generation, from 1.
func (o *Operation) Attempt() int { return o.start.Attempts }

// Token is the fencing token of this attempt: stamp it on what the handler
// creates in Kubernetes (an annotation), so that a later attempt can tell
// its own objects from a lost predecessor's.
func (o *Operation) Token() string { return o.start.Token() }

// Resumed is the record as it stood when this attempt started: Attempts > 1,
// a Phase or Data mean an earlier attempt did part of the work.
func (o *Operation) Resumed() Record { return o.start }

// Data decodes the checkpointed workflow data into v; it reports false when
// there is none.
func (o *Operation) Data(v any) (bool, error) {
	o.mu.Lock()
	data := o.rec.Data
	o.mu.Unlock()
	if len(data) == 0 {
		return false, nil
	}
	if err := json.Unmarshal(data, v); err != nil {
		return false, fmt.Errorf("decode checkpoint of %s: %w", o.Key(), err)
	}
	return true, nil
}

// Target returns the current progress of one target.
func (o *Operation) Target(target string) (TargetProgress, bool) { return o.progress.get(target) }

// Targets returns the current progress of every target.
func (o *Operation) Targets() map[string]TargetProgress { return o.progress.all() }

// Done reports whether target's current phase is phase.
func (o *Operation) Done(target, phase string) bool {
	p, ok := o.progress.get(target)
	return ok && p.Phase == phase
}

// Progress records the progress of one target. It is buffered: the runtime
// writes changed targets in batches (each under its own key) and publishes
// them as status deltas every Config.StatusInterval, and before the
// operation settles. Where a crash must not make a later attempt repeat a
// step, call Flush (or Checkpoint) after it: a crash loses what was not
// flushed, and the next attempt re-plans it from the live cluster.
func (o *Operation) Progress(ctx context.Context, target string, p TargetProgress) error {
	if err := o.Fence(); err != nil {
		return err
	}
	if p.Updated.IsZero() {
		p.Updated = time.Now().UTC()
	}
	o.progress.set(target, p)
	select {
	case o.dirty <- struct{}{}:
	default:
	}
	o.kickProgress()
	return nil
}

// Flush writes every buffered progress update now.
func (o *Operation) Flush(ctx context.Context) error {
	return o.progress.write(ctx, o.Generation(), o.Attempt(), o.Fence)
}

// Checkpoint writes the buffered progress, then records the handler's
// phase, a message for people and its workflow data (anything
// JSON-encodable; nil keeps the previous data) with compare-and-set, and
// waits for both. A later attempt resumes from it.
func (o *Operation) Checkpoint(ctx context.Context, phase, message string, data any) error {
	if err := o.Flush(ctx); err != nil {
		return err
	}
	var raw json.RawMessage
	if data != nil {
		b, err := json.Marshal(data)
		if err != nil {
			return fmt.Errorf("encode checkpoint of %s: %w", o.Key(), err)
		}
		raw = b
	}
	return o.write(ctx, func(r *Record) {
		r.Phase, r.Message = phase, message
		if raw != nil {
			r.Data = raw
		}
	})
}

// Uncancellable marks the operation as past its point of no return: cancel
// requests (node.ready for a recovery past its fencing gate) are refused
// from now on with reason.
func (o *Operation) Uncancellable(ctx context.Context, reason string) error {
	return o.write(ctx, func(r *Record) { r.Uncancellable = reason })
}

// write applies fn to the record if this attempt still holds it.
func (o *Operation) write(ctx context.Context, fn func(r *Record)) error {
	if err := o.Fence(); err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, o.rt.cfg.CallTimeout*2)
	defer cancel()
	o.mu.Lock()
	cur, rev := o.rec, o.rev
	o.mu.Unlock()
	next, nrev, err := o.rt.ops.mutateFrom(cctx, o.Key(), cur, rev, true, func(r *Record) error {
		if err := o.owns(*r); err != nil {
			return err
		}
		if err := o.Fence(); err != nil {
			return err
		}
		fn(r)
		return nil
	})
	if err != nil {
		return err
	}
	o.mu.Lock()
	if nrev > o.rev {
		o.rec, o.rev = next, nrev
	}
	o.mu.Unlock()
	return nil
}

// wrote reports whether rev is a revision of the record this attempt wrote
// itself (nothing in it to signal).
func (o *Operation) wrote(rev uint64) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return rev == o.rev
}

// owns checks the fencing token of a record this attempt is about to write.
func (o *Operation) owns(r Record) error {
	if r.Holder != o.holder || r.Attempts != o.start.Attempts || max(r.Generation, 1) != o.Generation() || r.State != StateRunning {
		return fmt.Errorf("%w: %s is now %s by %q (attempt %d, generation %d), not attempt %d of %q",
			ErrFenced, o.Key(), r.State, r.Holder, r.Attempts, r.Generation, o.start.Attempts, o.holder)
	}
	return nil
}

// Fence returns nil while this attempt may act on its targets, else an
// error wrapping ErrFenced (its lease ran out or is about to).
func (o *Operation) Fence() error {
	o.mu.Lock()
	dead := o.dead
	o.mu.Unlock()
	if dead != nil {
		return dead
	}
	for _, l := range o.leases {
		if !l.Valid() {
			return fmt.Errorf("%w: lease %s of %s expired", ErrFenced, l.key, o.Key())
		}
	}
	return nil
}

func (o *Operation) kill(err error) {
	o.mu.Lock()
	if o.dead == nil {
		o.dead = fmt.Errorf("%w: %v", ErrFenced, err)
	}
	o.mu.Unlock()
}

// Cancelled is closed when a cancel request for this operation arrives
// (maintenance.ended, vm.migrate.cancelled, node.ready before the fencing
// gate). The handler should abort what is still in flight and return nil;
// the runtime then records it cancelled.
func (o *Operation) Cancelled() <-chan struct{} { return o.cancelled }

// CancelReason says who cancelled the operation, once Cancelled is closed.
func (o *Operation) CancelReason() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.cancelReason
}

func (o *Operation) markCancelled(reason string) {
	o.cancelOnce.Do(func() {
		o.mu.Lock()
		o.cancelReason = reason
		o.mu.Unlock()
		close(o.cancelled)
	})
}

// Preempted is closed when a higher-priority operation needs one of this
// operation's leases (a recovery of the node under maintenance). The handler
// should checkpoint, leave the cluster in a safe state and return
// Yield(reason); after Config.YieldGrace its context is cancelled with
// ErrPreempted.
func (o *Operation) Preempted() <-chan struct{} { return o.preempted }

// PreemptedBy says which operation asked this one to yield.
func (o *Operation) PreemptedBy() YieldRequest {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.yield
}

func (o *Operation) markPreempted(y YieldRequest) bool {
	first := false
	o.preemptOnce.Do(func() {
		o.mu.Lock()
		o.yield = y
		o.mu.Unlock()
		close(o.preempted)
		first = true
	})
	return first
}

// armYieldTimer cancels the handler with ErrPreempted if it has not
// returned within grace.
func (o *Operation) armYieldTimer(grace time.Duration) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.yieldTimer == nil && o.cancelRun != nil {
		cancel := o.cancelRun
		o.yieldTimer = time.AfterFunc(grace, func() { cancel(ErrPreempted) })
	}
}

func (o *Operation) stopYieldTimer() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.yieldTimer != nil {
		o.yieldTimer.Stop()
	}
}

// Related reads another operation's record: maintenance end reads the
// maintenance it ends, recovery reads fencing evidence.
func (o *Operation) Related(ctx context.Context, key string) (Record, bool, error) {
	rec, _, found, err := o.rt.ops.Get(ctx, key)
	return rec, found, err
}

// RelatedList reads the operations matching a key filter (wildcards allowed),
// e.g. RecoveryOperationFilter(node).
func (o *Operation) RelatedList(ctx context.Context, filter string) ([]Record, error) {
	return o.rt.ops.List(ctx, filter)
}

// NodeState reads what drover is doing to a node.
func (o *Operation) NodeState(ctx context.Context, node string) (NodeState, error) {
	st, _, _, err := GetNodeState(ctx, o.rt.opsKV, node)
	return st, err
}

// UpdateNodeState changes a node's state record with compare-and-set. Only
// an operation holding the node's lease may write it.
func (o *Operation) UpdateNodeState(ctx context.Context, node string, fn func(*NodeState) error) (NodeState, error) {
	want := NodeLock(node)
	held := false
	for _, l := range o.locks {
		held = held || l.Key == want
	}
	if !held {
		return NodeState{}, fmt.Errorf("operation %s does not hold node %s's lease: it may not write its state", o.Key(), node)
	}
	return updateNodeState(ctx, o.rt.opsKV, node, o.Key(), o.Fence, fn)
}

// errorText is err as one line for status and records: a panic's stack
// stays in the log.
func errorText(err error) string {
	s := err.Error()
	var p *panicError
	if errors.As(err, &p) {
		s = p.Error()
	}
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[:i]
	}
	return s
}

// panicError is a handler panic; its stack goes to the log only.
type panicError struct {
	value any
	stack []byte
}

func (p *panicError) Error() string { return fmt.Sprintf("handler panicked: %v", p.value) }
