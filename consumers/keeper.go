package consumers

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/drover-io/drover/schemas"
)

// keeper keeps a running attempt alive: it extends the message's ack
// deadline and renews the leases every heartbeat, stops the handler before
// a lease could expire on the server, and says the operation runs once it
// has run for a StatusInterval. It works from timers: a handler that ends
// within its first heartbeat costs no goroutine.
type keeper struct {
	r      *Runtime
	d      *delivery
	op     *Operation
	ctx    context.Context
	cancel context.CancelCauseFunc

	mu      sync.Mutex
	stopped bool
	beat    *time.Timer
	watch   *time.Timer
	started *time.Timer
	running sync.WaitGroup // timer callbacks in progress
}

func (r *Runtime) keep(ctx context.Context, cancel context.CancelCauseFunc, d *delivery, op *Operation) *keeper {
	k := &keeper{r: r, d: d, op: op, ctx: ctx, cancel: cancel}
	k.mu.Lock()
	defer k.mu.Unlock()
	k.beat = time.AfterFunc(d.wf.heartbeat, func() { k.do(k.heartbeat) })
	k.started = time.AfterFunc(r.cfg.StatusInterval, func() { k.do(k.sayStarted) })
	k.armWatchLocked()
	return k
}

// do runs f unless the keeper stopped; stop waits for it.
func (k *keeper) do(f func()) {
	k.mu.Lock()
	if k.stopped {
		k.mu.Unlock()
		return
	}
	k.running.Add(1)
	k.mu.Unlock()
	defer k.running.Done()
	f()
}

// stop ends every timer and waits for a callback in progress.
func (k *keeper) stop() {
	k.mu.Lock()
	k.stopped = true
	for _, t := range []*time.Timer{k.beat, k.watch, k.started} {
		if t != nil {
			t.Stop()
		}
	}
	k.mu.Unlock()
	k.running.Wait()
}

// heartbeat extends the ack deadline, renews the leases and re-reads the
// record for cancel and yield requests the watcher may have missed. A lease
// found taken cancels the handler with ErrLeaseLost.
func (k *keeper) heartbeat() {
	d, op := k.d, k.op
	if err := d.msg.InProgress(); err != nil {
		d.log.Warn().Err(err).Msg("could not extend the ack deadline")
	}
	for _, l := range d.leases {
		err := l.Renew(k.ctx)
		if k.ctx.Err() != nil {
			return
		}
		if errors.Is(err, ErrLeaseLost) {
			k.r.loseLease(d, k.cancel, op, err)
			return
		}
		if err != nil {
			d.log.Warn().Err(err).Time("validUntil", l.ValidUntil()).Msg("lease renewal failed; will retry")
		}
	}
	cctx, cancel := context.WithTimeout(k.ctx, k.r.cfg.CallTimeout)
	rec, _, found, err := k.r.ops.Get(cctx, op.Key())
	cancel()
	if err == nil && found {
		k.r.signal(op, rec)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.stopped {
		k.beat.Reset(d.wf.heartbeat)
		k.armWatchLocked()
	}
}

// armWatchLocked sets the watchdog to the earliest moment a lease stops
// being valid. Called with k.mu held.
func (k *keeper) armWatchLocked() {
	if len(k.op.leases) == 0 {
		return
	}
	var until time.Time
	for i, l := range k.op.leases {
		if u := l.ValidUntil(); i == 0 || u.Before(until) {
			until = u
		}
	}
	wait := max(time.Until(until), 0)
	if k.watch == nil {
		k.watch = time.AfterFunc(wait, func() { k.do(k.watchdog) })
		return
	}
	k.watch.Reset(wait)
}

// watchdog stops the handler when its leases are about to expire on the
// server without a renewal: before, not after, another replica can take them.
func (k *keeper) watchdog() {
	for _, l := range k.op.leases {
		if u := l.ValidUntil(); !time.Now().Before(u) {
			k.r.loseLease(k.d, k.cancel, k.op, fmt.Errorf("no renewal of %s succeeded before %s", l.key, u.Format(time.StampMilli)))
			return
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.stopped {
		k.armWatchLocked() // renewed meanwhile: look again at the new deadline
	}
}

// sayStarted publishes that the operation runs (an operation that ends
// sooner publishes only its final phase).
func (k *keeper) sayStarted() {
	note := "started"
	if k.op.Attempt() > 1 {
		note = fmt.Sprintf("resumed (attempt %d)", k.op.Attempt())
	}
	k.op.mu.Lock()
	rec := k.op.rec
	k.op.mu.Unlock()
	k.r.status.publish(rec, schemas.PhaseRunning, note, k.op.nextStatusSeq, nil)
}
