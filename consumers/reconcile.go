package consumers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/drover-io/drover/schemas"
)

// reconcilerLease elects the replica that reconciles.
const reconcilerLease = "reconciler"

// reconcileLoop looks for orphans at start and then every ReconcileInterval.
func (r *Runtime) reconcileLoop(ctx context.Context) {
	t := time.NewTimer(r.jitter(100 * time.Millisecond))
	defer t.Stop()
	var lastErr string
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := r.Reconcile(ctx)
		switch {
		case err != nil && ctx.Err() == nil && err.Error() != lastErr:
			r.log.Warn().Err(err).Msg("reconcile pass failed; will try again")
			lastErr = err.Error()
		case err == nil:
			lastErr = ""
		}
		t.Reset(r.jitter(r.cfg.ReconcileInterval))
	}
}

// streamMsg is what the reconciler knows of a request message.
type streamMsg struct {
	seq     uint64
	subject string
	time    time.Time
}

// Reconcile finds, once, the request messages that no consumer will deliver
// again (JetStream gave them up, or every delivery of them went to replicas
// that died) and the operations left running by a holder that is gone, and
// resumes them: an orphaned message is published again (under a new id) and
// the original removed; a stuck operation goes back to pending, and if no
// message drives it any more its stored request is published again. The
// operation's own budget still applies, so a crash loop ends in the DLQ.
// One replica reconciles at a time.
func (r *Runtime) Reconcile(ctx context.Context) error {
	l, _, err := r.leases.acquire(ctx, reconcilerLease, leaseValue{Holder: r.id, Operation: reconcilerLease, Nonce: nonce()})
	if errors.Is(err, errLeaseHeld) {
		return nil
	}
	if err != nil {
		return err
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		_ = l.Release(rctx, "", 0)
	}()

	delivered := map[string]uint64{}
	for wf := range WorkflowKinds {
		c, err := r.js.Consumer(ctx, StreamRequests, wf)
		if errors.Is(err, jetstream.ErrConsumerNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("reconcile: consumer %s: %w", wf, err)
		}
		info, err := c.Info(ctx)
		if err != nil {
			return fmt.Errorf("reconcile: consumer %s: %w", wf, err)
		}
		delivered[wf] = info.Delivered.Stream
	}
	recs, err := r.unfinishedRecords(ctx)
	if err != nil {
		return err
	}
	msgs, err := r.requestMessages(ctx)
	if err != nil {
		return err
	}

	now := time.Now()
	bySeq := map[uint64]Record{}
	counts := map[[2]string]int{}
	oldestOp := map[[2]string]time.Duration{}
	phases := map[[2]string]int{}
	for _, rec := range recs {
		if rec.Seq > 0 {
			bySeq[rec.Seq] = rec
		}
		counts[[2]string{rec.Workflow, string(rec.State)}]++
		if !rec.Created.IsZero() {
			k := [2]string{rec.Workflow, string(rec.State)}
			oldestOp[k] = max(oldestOp[k], now.Sub(rec.Created))
		}
		if rec.Phase != "" {
			phases[[2]string{rec.Workflow, rec.Phase}]++
		}
	}
	inStream := map[uint64]bool{}
	var oldest time.Duration
	for _, m := range msgs {
		inStream[m.seq] = true
		oldest = max(oldest, now.Sub(m.time))
		_, kind, _, perr := schemas.ParseSubject(m.subject)
		wf, _ := WorkflowOf(kind)
		if perr != nil || m.seq > delivered[wf] || now.Sub(m.time) < r.cfg.OrphanAfter {
			continue // not delivered yet, or too young to judge
		}
		if rec, ok := bySeq[m.seq]; ok && r.alive(ctx, rec, now) {
			continue
		}
		if err := r.resend(ctx, m); err != nil {
			r.log.Warn().Err(err).Uint64("seq", m.seq).Msg("could not resume an orphaned message")
			continue
		}
		r.metrics.Orphans.WithLabelValues("message").Inc()
	}
	r.metrics.OldestAge.Set(oldest.Seconds())
	r.metrics.Operations.Reset()
	for k, n := range counts {
		r.metrics.Operations.WithLabelValues(k[0], k[1]).Set(float64(n))
	}
	r.metrics.OldestOperation.Reset()
	for k, age := range oldestOp {
		r.metrics.OldestOperation.WithLabelValues(k[0], k[1]).Set(age.Seconds())
	}
	r.metrics.InPhase.Reset()
	for k, n := range phases {
		r.metrics.InPhase.WithLabelValues(k[0], k[1]).Set(float64(n))
	}

	for _, rec := range recs {
		if rec.State.Terminal() || r.alive(ctx, rec, now) {
			continue
		}
		if rec.State == StateRunning {
			if _, err := r.ops.Mutate(ctx, rec.Key, func(cur *Record) error {
				if cur.State != StateRunning || cur.Holder != rec.Holder || cur.Attempts != rec.Attempts {
					return errNoChange
				}
				cur.State, cur.Holder, cur.LastError = StatePending, "", "holder "+rec.Holder+" vanished without settling"
				return nil
			}); err != nil {
				r.log.Warn().Err(err).Str("op", rec.Key).Msg("could not reset an operation stuck running")
				continue
			}
			r.metrics.Orphans.WithLabelValues("operation").Inc()
			r.log.Warn().Str("op", rec.Key).Str("holder", rec.Holder).Msg("operation was left running by a holder that is gone; back to pending")
		}
		if inStream[rec.Seq] || len(rec.Request) == 0 {
			continue
		}
		if err := r.republishRequest(ctx, rec); err != nil {
			r.log.Warn().Err(err).Str("op", rec.Key).Msg("could not re-publish the request of an operation no message drives")
			continue
		}
		r.metrics.Orphans.WithLabelValues("request").Inc()
	}
	return nil
}

// alive reports whether rec shows that some replica still has its message:
// running under a live lease, or due again soon.
func (r *Runtime) alive(ctx context.Context, rec Record, now time.Time) bool {
	if rec.State == StateRunning {
		if len(rec.Leases) == 0 || now.Sub(rec.LastSeen) < r.cfg.OrphanAfter {
			// Without leases, or its message seen lately (a replica waits
			// for the lease of a holder that died): alive.
			seen := rec.Updated
			if rec.LastSeen.After(seen) {
				seen = rec.LastSeen
			}
			return now.Sub(seen) < r.cfg.OrphanAfter
		}
		for _, key := range rec.Leases {
			e, err := r.leases.kv.Get(ctx, key)
			if err != nil {
				// Gone: not alive. Unreadable now: assume alive, look again next pass.
				return !errors.Is(err, jetstream.ErrKeyNotFound) && !errors.Is(err, jetstream.ErrKeyDeleted)
			}
			if decodeLease(e.Value()).Holder != rec.Holder {
				return false
			}
		}
		return true
	}
	due := rec.Due
	if due.IsZero() {
		due = rec.Updated
	}
	return now.Sub(due) < r.cfg.OrphanAfter && now.Sub(rec.LastSeen) < 2*r.cfg.OrphanAfter
}

// unfinishedRecords returns the operations not finished yet: from the
// watcher's index, or, until it is complete, from one pass over the bucket.
func (r *Runtime) unfinishedRecords(ctx context.Context) ([]Record, error) {
	r.mu.Lock()
	if r.indexed {
		raw := make(map[string][]byte, len(r.unfinished))
		for k, v := range r.unfinished {
			raw[k] = v
		}
		r.mu.Unlock()
		var out []Record
		var finished []string
		for key, b := range raw {
			var rec Record
			if json.Unmarshal(b, &rec) != nil || rec.State.Terminal() {
				finished = append(finished, key)
				continue
			}
			out = append(out, rec)
		}
		r.mu.Lock()
		for _, key := range finished {
			if string(r.unfinished[key]) == string(raw[key]) { // unchanged since: prune
				delete(r.unfinished, key)
			}
		}
		r.mu.Unlock()
		return out, nil
	}
	r.mu.Unlock()
	all, err := r.allRecords(ctx)
	if err != nil {
		return nil, err
	}
	out := all[:0]
	for _, rec := range all {
		if !rec.State.Terminal() {
			out = append(out, rec)
		}
	}
	return out, nil
}

// allRecords reads every operation record in one pass.
func (r *Runtime) allRecords(ctx context.Context) ([]Record, error) {
	w, err := r.opsKV.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("reconcile: read operations: %w", err)
	}
	defer func() { _ = w.Stop() }()
	var out []Record
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case e, ok := <-w.Updates():
			if !ok {
				return nil, errors.New("reconcile: operations watcher closed")
			}
			if e == nil {
				return out, nil
			}
			if strings.HasPrefix(e.Key(), nodeStatePrefix) || strings.HasPrefix(e.Key(), routePrefix) {
				continue
			}
			var rec Record
			if json.Unmarshal(e.Value(), &rec) == nil {
				out = append(out, rec)
			}
		}
	}
}

// requestMessages lists the messages in the request stream: one direct
// read per message still there (a work queue holds only unfinished ones).
func (r *Runtime) requestMessages(ctx context.Context) ([]streamMsg, error) {
	s, err := r.js.Stream(ctx, StreamRequests)
	if err != nil {
		return nil, fmt.Errorf("reconcile: %w", err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("reconcile: %w", err)
	}
	var out []streamMsg
	for seq := info.State.FirstSeq; info.State.Msgs > 0 && seq <= info.State.LastSeq; {
		raw, err := s.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(schemas.RequestPrefix+".>"))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("reconcile: read %s at %d: %w", StreamRequests, seq, err)
		}
		out = append(out, streamMsg{seq: raw.Sequence, subject: raw.Subject, time: raw.Time})
		seq = raw.Sequence + 1
	}
	return out, nil
}

// resend publishes an orphaned message again under a new id and removes
// the original.
func (r *Runtime) resend(ctx context.Context, m streamMsg) error {
	s, err := r.js.Stream(ctx, StreamRequests)
	if err != nil {
		return err
	}
	raw, err := s.GetMsg(ctx, m.seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil // settled meanwhile
	}
	if err != nil {
		return err
	}
	h := nats.Header{}
	for k, v := range raw.Header {
		h[k] = v
	}
	h.Set(jetstream.MsgIDHeader, "orphan-"+strconv.FormatUint(m.seq, 10))
	// The original is removed first: the stream holds a bounded number of
	// messages per subject, and the copy must find room.
	if err := s.DeleteMsg(ctx, m.seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		return err
	}
	if _, err := r.js.PublishMsg(ctx, &nats.Msg{Subject: raw.Subject, Header: h, Data: raw.Data}); err != nil {
		// Do not lose it: dead-letter it with the reason instead.
		wf := workflowOfSubject(raw.Subject)
		if derr := publishDeadLetter(ctx, r.js, deadLetterMsg(wf, "", "", raw.Subject, m.seq, 0, raw.Header, raw.Data,
			"orphaned and could not be published again: "+err.Error())); derr != nil {
			return errors.Join(err, derr)
		}
		r.metrics.DeadLetters.WithLabelValues(wf, "orphan").Inc()
		return nil
	}
	r.log.Warn().Uint64("seq", m.seq).Str("subject", raw.Subject).Msg("message no consumer would deliver again; published it again")
	return nil
}

// republishRequest publishes the request stored in rec again.
func (r *Runtime) republishRequest(ctx context.Context, rec Record) error {
	var ce event.Event
	if err := json.Unmarshal(rec.Request, &ce); err != nil {
		return fmt.Errorf("stored request unreadable: %w", err)
	}
	p, err := schemas.Decode(ce)
	if err != nil {
		return err
	}
	subject, err := schemas.RequestSubject(p.Kind(), p.Target())
	if err != nil {
		return err
	}
	m, err := schemas.ToMsg(subject, ce)
	if err != nil {
		return err
	}
	m.Header.Set(jetstream.MsgIDHeader, fmt.Sprintf("resume-%s-g%d-a%d", rec.Key, max(rec.Generation, 1), rec.Attempts))
	_, err = r.js.PublishMsg(ctx, m)
	if err == nil {
		r.log.Warn().Str("op", rec.Key).Msg("operation had no message left; published its request again")
	}
	return err
}

func workflowOfSubject(subject string) string {
	_, kind, _, err := schemas.ParseSubject(subject)
	if err != nil {
		return "unknown"
	}
	wf, ok := WorkflowOf(kind)
	if !ok {
		return "unknown"
	}
	return wf
}
