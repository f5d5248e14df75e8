package consumers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/drover-io/drover/schemas"
)

// Event is what a handler receives: the CloudEvent, its validated payload and
// where it came from.
type Event struct {
	CloudEvent event.Event
	Payload    schemas.Payload
	Keys       Keys
	Subject    string
	// Delivery counts deliveries of this message, starting at 1.
	Delivery  uint64
	StreamSeq uint64
}

// Handler runs one workflow step for an event. It must be idempotent: it may
// run again for the same operation after a crash, and op.Resumed() says how
// far an earlier attempt got. It returns nil when the work is complete (or
// cleanly cancelled), an error wrapped by Terminal when no retry can help, or
// any other error to be retried with backoff.
type Handler interface {
	Handle(ctx context.Context, op *Operation, e Event) error
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, op *Operation, e Event) error

// Handle calls f.
func (f HandlerFunc) Handle(ctx context.Context, op *Operation, e Event) error { return f(ctx, op, e) }

// Workflow binds a handler to one of the durable consumers of WorkflowKinds.
type Workflow struct {
	Name string
	// Concurrency is the number of worker slots in this process (default 1);
	// each slot holds at most one message.
	Concurrency int
	Handler     Handler
}

// Runtime runs the workflows' consumers. Several processes may run one each
// against the same JetStream: they share the durable consumers.
type Runtime struct {
	cfg       Config
	nc        *nats.Conn
	js        jetstream.JetStream
	log       zerolog.Logger
	metrics   *Metrics
	workflows []Workflow
	id        string

	ops   *OpStore
	locks jetstream.KeyValue

	mu       sync.Mutex
	inflight map[string]*Operation // by operation key
}

// NewRuntime checks the configuration and the workflows. Nothing touches the
// server until Start.
func NewRuntime(nc *nats.Conn, cfg Config, log zerolog.Logger, metrics *Metrics, workflows ...Workflow) (*Runtime, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("runtime config: %w", err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream context: %w", err)
	}
	seen := map[string]bool{}
	for i, wf := range workflows {
		if _, ok := WorkflowKinds[wf.Name]; !ok {
			return nil, fmt.Errorf("workflow %q: unknown (want one of maintenance, recovery, migration)", wf.Name)
		}
		if seen[wf.Name] {
			return nil, fmt.Errorf("workflow %q registered twice", wf.Name)
		}
		if wf.Handler == nil {
			return nil, fmt.Errorf("workflow %q has no handler", wf.Name)
		}
		seen[wf.Name] = true
		if wf.Concurrency <= 0 {
			workflows[i].Concurrency = 1
		}
	}
	if metrics == nil {
		metrics = NewMetrics(nil)
	}
	host, _ := os.Hostname()
	id := fmt.Sprintf("%s-%d-%s", host, os.Getpid(), schemas.DeterministicID(host, strconv.FormatInt(time.Now().UnixNano(), 10))[:8])
	return &Runtime{cfg: cfg, nc: nc, js: js, log: log, metrics: metrics, workflows: workflows, id: id,
		inflight: map[string]*Operation{}}, nil
}

// ID identifies this runtime as a lease holder.
func (r *Runtime) ID() string { return r.id }

// Start declares streams, buckets and consumers, runs the workers and blocks
// until ctx ends. Then it stops fetching, gives in-flight handlers
// Config.ShutdownGrace to finish, cancels the rest (their messages stay
// unacknowledged, so another replica takes them over) and returns.
func (r *Runtime) Start(ctx context.Context) error {
	names := make([]string, 0, len(r.workflows))
	for _, wf := range r.workflows {
		names = append(names, wf.Name)
	}
	opsKV, locks, err := Setup(ctx, r.js, r.cfg, names...)
	if err != nil {
		return err
	}
	r.ops, r.locks = NewOpStore(opsKV), locks

	adv, err := r.nc.Subscribe(maxDeliveriesAdvisories+StreamRequests+".*", r.onMaxDeliveries)
	if err != nil {
		return fmt.Errorf("subscribe to max-deliveries advisories: %w", err)
	}
	defer func() { _ = adv.Unsubscribe() }()

	// One watcher for the whole bucket signals cancel requests to the
	// handlers running here (a watcher per handler would cost a consumer
	// per event).
	watchCtx, stopWatch := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWatch()
	go r.watchCancels(watchCtx)

	// Handlers run on base, not ctx: a shutdown request must not interrupt
	// them before the grace period is over.
	base, cancelBase := context.WithCancelCause(context.WithoutCancel(ctx))
	defer cancelBase(nil)
	var wg sync.WaitGroup
	for _, wf := range r.workflows {
		cons, err := r.js.Consumer(ctx, StreamRequests, wf.Name)
		if err != nil {
			cancelBase(err)
			wg.Wait()
			return fmt.Errorf("open consumer %s: %w", wf.Name, err)
		}
		for slot := 0; slot < wf.Concurrency; slot++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.worker(ctx, base, wf, cons, slot)
			}()
		}
	}
	r.log.Info().Str("runtime", r.id).Strs("workflows", names).Dur("ackWait", r.cfg.AckWait).Msg("consumers started")
	<-ctx.Done()
	r.log.Info().Dur("grace", r.cfg.ShutdownGrace).Msg("shutting down: no new messages; waiting for in-flight handlers")

	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-time.After(r.cfg.ShutdownGrace):
	}
	r.log.Warn().Dur("grace", r.cfg.ShutdownGrace).Msg("handlers still running after the shutdown grace; cancelling them, their messages stay unacknowledged for another replica")
	cancelBase(ErrShuttingDown)
	select {
	case <-done:
		return nil
	case <-time.After(r.cfg.ShutdownGrace):
		return errors.New("handlers ignored cancellation and are still running")
	}
}

// worker pulls one message at a time: a slot never holds a message it is not
// working on, so an idle replica can take the next one.
func (r *Runtime) worker(ctx, base context.Context, wf Workflow, cons jetstream.Consumer, slot int) {
	holder := fmt.Sprintf("%s/%s/%d", r.id, wf.Name, slot)
	log := r.log.With().Str("workflow", wf.Name).Int("slot", slot).Logger()
	var lastErr string
	for ctx.Err() == nil {
		batch, err := cons.Fetch(1, jetstream.FetchMaxWait(r.cfg.FetchWait))
		if err != nil {
			if msg := err.Error(); msg != lastErr {
				log.Error().Err(err).Msg("fetch failed; retrying")
				lastErr = msg
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		for msg := range batch.Messages() {
			if ctx.Err() != nil {
				// Fetched as we were stopping: hand it back at once.
				_ = msg.Nak()
				continue
			}
			r.process(ctx, base, wf, holder, msg)
		}
		if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, context.DeadlineExceeded) {
			if msg := err.Error(); msg != lastErr {
				log.Warn().Err(err).Msg("fetch ended with an error")
				lastErr = msg
			}
		} else {
			lastErr = ""
		}
	}
}

// decode turns a message into an Event, or says why it cannot be one.
func decode(workflow string, msg jetstream.Msg) (Event, error) {
	ce, err := schemas.FromHeaders(msg.Headers(), msg.Data())
	if err != nil {
		return Event{}, fmt.Errorf("not a valid CloudEvent: %w", err)
	}
	p, err := schemas.Decode(ce)
	if err != nil {
		return Event{}, fmt.Errorf("event %s of type %q: %w", ce.ID(), ce.Type(), err)
	}
	_, kind, target, err := schemas.ParseSubject(msg.Subject())
	if err != nil {
		return Event{}, fmt.Errorf("subject %q: %w", msg.Subject(), err)
	}
	if kind != p.Kind() {
		return Event{}, fmt.Errorf("event type %s does not belong on subject kind %q", ce.Type(), kind)
	}
	if target != p.Target() {
		return Event{}, fmt.Errorf("subject target %q does not match event target %q", target, p.Target())
	}
	keys, err := Route(p, ce.ID())
	if err != nil {
		return Event{}, err
	}
	if keys.Workflow != workflow {
		return Event{}, fmt.Errorf("event type %s belongs to workflow %s, not %s", ce.Type(), keys.Workflow, workflow)
	}
	return Event{CloudEvent: ce, Payload: p, Keys: keys, Subject: msg.Subject()}, nil
}

var errAlreadyFinished = errors.New("operation already finished")

func (r *Runtime) process(stop, base context.Context, wf Workflow, holder string, msg jetstream.Msg) {
	meta, err := msg.Metadata()
	if err != nil {
		r.log.Error().Err(err).Str("subject", msg.Subject()).Msg("message without JetStream metadata; terminating it")
		_ = msg.Term()
		return
	}
	log := r.log.With().Str("workflow", wf.Name).Uint64("seq", meta.Sequence.Stream).
		Uint64("delivery", meta.NumDelivered).Logger()
	ctx := log.WithContext(base)

	ev, err := decode(wf.Name, msg)
	if err != nil {
		r.deadLetter(ctx, log, wf.Name, msg, meta, "rejected: "+err.Error(), "invalid", "")
		return
	}
	ev.Delivery, ev.StreamSeq = meta.NumDelivered, meta.Sequence.Stream
	keys := ev.Keys
	log = log.With().Str("op", keys.Operation).Str("target", keys.Target).Str("event", ev.CloudEvent.ID()).
		Str("type", ev.CloudEvent.Type()).Logger()
	ctx = log.WithContext(base)

	if keys.Cancels != "" {
		marked, err := r.ops.RequestCancel(ctx, keys.Cancels, "cancelled by "+ev.CloudEvent.Type()+" "+ev.CloudEvent.ID(), keys.Workflow, keys.Target)
		if err != nil {
			r.retry(ctx, log, wf.Name, msg, meta, nil, fmt.Errorf("request cancel of %s: %w", keys.Cancels, err))
			return
		}
		if len(marked) > 0 {
			log.Info().Strs("cancelled", marked).Msg("cancel requested")
		}
	}

	if rec, _, found, err := r.ops.Get(ctx, keys.Operation); err != nil {
		r.retry(ctx, log, wf.Name, msg, meta, nil, err)
		return
	} else if found && rec.State.Terminal() {
		r.skip(log, wf.Name, msg, rec)
		return
	}

	var lease *Lease
	if keys.Lock != "" {
		poll := min(250*time.Millisecond, r.cfg.LeaseTTL/4)
		var held leaseValue
		lease, held, err = acquireLease(stop, r.locks, keys.Lock,
			leaseValue{Holder: holder, Operation: keys.Operation, Acquired: time.Now().UTC()},
			r.cfg.LeaseWait, poll, r.cfg.heartbeat(), func() { _ = msg.InProgress() })
		switch {
		case errors.Is(err, errLeaseHeld):
			r.metrics.LeaseWaits.WithLabelValues(wf.Name).Inc()
			r.retry(ctx, log, wf.Name, msg, meta, nil,
				fmt.Errorf("lease %s still held by %s for operation %s after %s", keys.Lock, held.Holder, held.Operation, r.cfg.LeaseWait))
			return
		case err != nil && stop.Err() != nil:
			_ = msg.Nak()
			r.metrics.Messages.WithLabelValues(wf.Name, ResultAbandoned).Inc()
			return
		case err != nil:
			r.retry(ctx, log, wf.Name, msg, meta, nil, err)
			return
		}
	}
	release := func() {
		if lease == nil {
			return
		}
		rctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := lease.Release(rctx); err != nil {
			log.Warn().Err(err).Msg("could not release lease; it expires with its TTL")
		}
		lease = nil
	}

	rec, err := r.ops.Mutate(ctx, keys.Operation, func(rec *Record) error {
		if rec.State.Terminal() {
			return errAlreadyFinished
		}
		rec.Workflow, rec.Target = wf.Name, keys.Target
		rec.EventID, rec.EventType = ev.CloudEvent.ID(), ev.CloudEvent.Type()
		rec.State, rec.Holder = StateRunning, holder
		rec.Attempts++
		if rec.Started.IsZero() {
			rec.Started = time.Now().UTC()
		}
		return nil
	})
	if errors.Is(err, errAlreadyFinished) {
		release()
		r.skip(log, wf.Name, msg, rec)
		return
	}
	if err != nil {
		release()
		r.retry(ctx, log, wf.Name, msg, meta, nil, err)
		return
	}
	if rec.Attempts == 1 {
		r.publishStatus(ctx, wf.Name, rec, "started")
	} else {
		r.publishStatus(ctx, wf.Name, rec, fmt.Sprintf("resumed (attempt %d)", rec.Attempts))
	}
	op := &Operation{store: r.ops, start: rec, cancelled: make(chan struct{}),
		onUpdate: func(ctx context.Context, rec Record) { r.publishStatus(ctx, wf.Name, rec, "progress") }}
	if rec.CancelRequested {
		op.markCancelled()
	}

	r.mu.Lock()
	r.inflight[op.Key()] = op
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.inflight, op.Key())
		r.mu.Unlock()
	}()

	hctx, cancel := context.WithCancelCause(ctx)
	hbDone := make(chan struct{})
	go func() {
		defer close(hbDone)
		r.heartbeat(hctx, cancel, log, msg, lease, op)
	}()
	r.metrics.InFlight.WithLabelValues(wf.Name).Inc()
	started := time.Now()
	log.Info().Int("attempt", rec.Attempts).Msg("handler started")
	herr := call(hctx, wf.Handler, op, ev)
	r.metrics.Duration.WithLabelValues(wf.Name).Observe(time.Since(started).Seconds())
	r.metrics.InFlight.WithLabelValues(wf.Name).Dec()
	var cause error
	if hctx.Err() != nil {
		cause = context.Cause(hctx)
	}
	cancel(nil)
	<-hbDone

	switch {
	case errors.Is(cause, ErrLeaseLost):
		// Someone else may own the node now: touch neither the record nor the message.
		lease = nil
		log.Warn().AnErr("handler", herr).Err(cause).Msg("lease lost; handler stopped, message left for redelivery")
		r.metrics.Messages.WithLabelValues(wf.Name, ResultAbandoned).Inc()
	case errors.Is(cause, ErrShuttingDown):
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, _ = r.ops.Mutate(sctx, keys.Operation, func(rec *Record) error {
			rec.State, rec.Holder, rec.LastError = StatePending, "", "interrupted by shutdown"
			return nil
		})
		scancel()
		release()
		log.Warn().Msg("shutdown interrupted the handler; message left for another replica")
		r.metrics.Messages.WithLabelValues(wf.Name, ResultAbandoned).Inc()
	case herr == nil:
		r.succeed(ctx, log, wf.Name, msg, meta, keys.Operation, op, release)
	case IsTerminal(herr):
		r.deadLetter(ctx, log, wf.Name, msg, meta, "handler failed: "+herr.Error(), "terminal", keys.Operation)
		release()
	default:
		r.retry(ctx, log, wf.Name, msg, meta, release, herr)
		r.recordRetry(ctx, log, keys.Operation, herr)
	}
}

func (r *Runtime) recordRetry(ctx context.Context, log zerolog.Logger, key string, herr error) {
	if _, err := r.ops.Mutate(ctx, key, func(rec *Record) error {
		if rec.State.Terminal() {
			return errNoChange
		}
		rec.State, rec.Holder, rec.LastError = StatePending, "", herr.Error()
		return nil
	}); err != nil {
		log.Warn().Err(err).Msg("could not record the retry")
	}
}

// call runs the handler, turning a panic into an error so one bad event
// cannot take the process down.
func call(ctx context.Context, h Handler, op *Operation, ev Event) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("handler panicked: %v\n%s", p, debug.Stack())
		}
	}()
	return h.Handle(ctx, op, ev)
}

// heartbeat keeps the message and the lease alive while the handler runs and
// closes op.Cancelled when a cancel request is recorded. If the lease cannot
// be renewed before it could have expired, it cancels the handler with
// ErrLeaseLost.
func (r *Runtime) heartbeat(ctx context.Context, cancel context.CancelCauseFunc, log zerolog.Logger, msg jetstream.Msg, lease *Lease, op *Operation) {
	hb := r.cfg.heartbeat()
	t := time.NewTicker(hb)
	defer t.Stop()
	lastRenew := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := msg.InProgress(); err != nil {
			log.Warn().Err(err).Msg("could not extend the ack deadline")
		}
		if rec, _, found, err := r.ops.Get(ctx, op.Key()); err == nil && found && rec.CancelRequested {
			op.markCancelled()
		}
		if lease == nil {
			continue
		}
		err := lease.Renew(ctx)
		if err == nil {
			lastRenew = time.Now()
			continue
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, ErrLeaseLost) || time.Since(lastRenew) >= r.cfg.LeaseTTL-hb {
			log.Error().Err(err).Dur("sinceRenew", time.Since(lastRenew)).Msg("lease lost; cancelling the handler")
			cancel(fmt.Errorf("%w: %v", ErrLeaseLost, err))
			return
		}
		log.Warn().Err(err).Msg("lease renewal failed; will retry")
	}
}

// watchCancels follows the operations bucket and closes Cancelled of the
// in-flight operations that a cancel request marks. If the watch fails, the
// heartbeat's read of the record still finds the request.
func (r *Runtime) watchCancels(ctx context.Context) {
	for ctx.Err() == nil {
		w, err := r.ops.kv.WatchAll(ctx, jetstream.UpdatesOnly())
		if err != nil {
			r.log.Warn().Err(err).Msg("cannot watch operation records; cancel requests are seen at the next heartbeat")
			select {
			case <-ctx.Done():
			case <-time.After(r.cfg.heartbeat()):
			}
			continue
		}
		for e := range w.Updates() {
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			r.mu.Lock()
			op := r.inflight[e.Key()]
			r.mu.Unlock()
			var rec Record
			if op != nil && json.Unmarshal(e.Value(), &rec) == nil && rec.CancelRequested {
				r.log.Info().Str("op", e.Key()).Str("reason", rec.CancelReason).Msg("cancel requested; signalling the handler")
				op.markCancelled()
			}
		}
		_ = w.Stop()
	}
}

func (r *Runtime) succeed(ctx context.Context, log zerolog.Logger, wf string, msg jetstream.Msg, meta *jetstream.MsgMetadata, key string, op *Operation, release func()) {
	cancelled := false
	select {
	case <-op.Cancelled():
		cancelled = true
	default:
	}
	rec, err := r.ops.Mutate(ctx, key, func(rec *Record) error {
		rec.State = StateSucceeded
		if cancelled || rec.CancelRequested {
			rec.State = StateCancelled
		}
		rec.Holder, rec.LastError, rec.Finished = "", "", time.Now().UTC()
		return nil
	})
	if err != nil {
		// Without the record a redelivery would not know the work is done;
		// retry rather than ack (handlers are idempotent).
		r.retry(ctx, log, wf, msg, meta, release, fmt.Errorf("record success: %w", err))
		return
	}
	release()
	r.publishStatus(ctx, wf, rec, "")
	actx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := msg.DoubleAck(actx); err != nil {
		log.Warn().Err(err).Msg("ack not confirmed; a redelivery will find the operation finished and skip it")
	}
	r.metrics.Messages.WithLabelValues(wf, ResultAcked).Inc()
	log.Info().Str("state", string(rec.State)).Msg("operation finished; message acknowledged")
}

func (r *Runtime) skip(log zerolog.Logger, wf string, msg jetstream.Msg, rec Record) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := msg.DoubleAck(ctx); err != nil {
		log.Warn().Err(err).Msg("ack of a finished operation's message not confirmed")
	}
	r.metrics.Messages.WithLabelValues(wf, ResultSkipped).Inc()
	log.Info().Str("state", string(rec.State)).Msg("operation already finished; acknowledged without acting")
}

// retry naks with backoff, or dead-letters when this was the last delivery.
func (r *Runtime) retry(ctx context.Context, log zerolog.Logger, wf string, msg jetstream.Msg, meta *jetstream.MsgMetadata, release func(), err error) {
	if release != nil {
		release()
	}
	if meta.NumDelivered >= uint64(r.cfg.MaxDeliver) {
		r.deadLetter(ctx, log, wf, msg, meta,
			fmt.Sprintf("max deliveries (%d) exhausted; last error: %v", meta.NumDelivered, err), "max_deliveries", operationOf(msg))
		return
	}
	delay := r.cfg.backoff(meta.NumDelivered)
	log.Warn().Err(err).Dur("retryIn", delay).Msg("handler failed; will retry")
	if nerr := msg.NakWithDelay(delay); nerr != nil {
		log.Warn().Err(nerr).Msg("nak failed; the message is redelivered after the ack wait")
	}
	r.metrics.Messages.WithLabelValues(wf, ResultRetried).Inc()
}

// operationOf recovers the operation key of a message that decoded once.
func operationOf(msg jetstream.Msg) string {
	ev, err := decode(workflowFromSubject(msg.Subject()), msg)
	if err != nil {
		return ""
	}
	return ev.Keys.Operation
}

func workflowFromSubject(subject string) string {
	_, kind, _, err := schemas.ParseSubject(subject)
	if err != nil {
		return ""
	}
	wf, _ := WorkflowOf(kind)
	return wf
}

// deadLetter stores the message in DROVER_DLQ, waits for the store's ack,
// marks the operation failed and terminates the message. If the DLQ cannot
// take it, the message is naked instead: nothing is dropped.
func (r *Runtime) deadLetter(ctx context.Context, log zerolog.Logger, wf string, msg jetstream.Msg, meta *jetstream.MsgMetadata, reason, cause, opKey string) {
	dl := deadLetterMsg(wf, msg.Subject(), meta.Sequence.Stream, meta.NumDelivered, msg.Headers(), msg.Data(), reason)
	if err := publishDeadLetter(ctx, r.js, dl); err != nil {
		log.Error().Err(err).Msg("could not dead-letter; will retry the message")
		_ = msg.NakWithDelay(r.cfg.backoff(meta.NumDelivered))
		return
	}
	if opKey != "" {
		rec, err := r.ops.Mutate(ctx, opKey, func(rec *Record) error {
			if rec.State.Terminal() {
				return errNoChange
			}
			rec.State, rec.Holder, rec.LastError, rec.Finished = StateFailed, "", reason, time.Now().UTC()
			return nil
		})
		if err != nil {
			log.Warn().Err(err).Msg("could not mark the operation failed")
		} else if rec.State == StateFailed {
			r.publishStatus(ctx, wf, rec, reason)
		}
	}
	if err := msg.TermWithReason(truncate(reason, 256)); err != nil {
		log.Warn().Err(err).Msg("term failed; a redelivery will be dead-lettered again under the same id")
	}
	r.metrics.Messages.WithLabelValues(wf, ResultDeadLettered).Inc()
	r.metrics.DeadLetters.WithLabelValues(wf, cause).Inc()
	log.Error().Str("reason", reason).Msg("message dead-lettered")
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// maxDeliveriesAdvisories prefixes JetStream's advisories of messages that
// ran out of deliveries: $JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>.
const maxDeliveriesAdvisories = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES."

type maxDeliveriesAdvisory struct {
	Stream     string `json:"stream"`
	Consumer   string `json:"consumer"`
	StreamSeq  uint64 `json:"stream_seq"`
	Deliveries uint64 `json:"deliveries"`
}

// onMaxDeliveries dead-letters a message whose deliveries ran out without any
// worker settling it (every worker that took it died or stalled): JetStream
// then stops delivering it and, in a work queue, it would sit there forever.
func (r *Runtime) onMaxDeliveries(m *nats.Msg) {
	var a maxDeliveriesAdvisory
	if err := json.Unmarshal(m.Data, &a); err != nil || a.Stream != StreamRequests {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := r.js.Stream(ctx, StreamRequests)
	if err != nil {
		return
	}
	raw, err := s.GetMsg(ctx, a.StreamSeq)
	if err != nil {
		return // already settled or removed by another replica
	}
	reason := fmt.Sprintf("max deliveries (%d) exhausted without an acknowledgement: every worker that took it died or stalled", a.Deliveries)
	if err := publishDeadLetter(ctx, r.js, deadLetterMsg(a.Consumer, raw.Subject, a.StreamSeq, a.Deliveries, raw.Header, raw.Data, reason)); err != nil {
		r.log.Error().Err(err).Uint64("seq", a.StreamSeq).Msg("could not dead-letter an exhausted message")
		return
	}
	if err := s.DeleteMsg(ctx, a.StreamSeq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		r.log.Warn().Err(err).Uint64("seq", a.StreamSeq).Msg("dead-lettered but could not delete the original")
	}
	r.metrics.DeadLetters.WithLabelValues(a.Consumer, "max_deliveries").Inc()
	r.log.Error().Uint64("seq", a.StreamSeq).Str("workflow", a.Consumer).Str("reason", reason).Msg("message dead-lettered")
}

var phaseOf = map[State]string{
	StatePending: "Pending", StateRunning: "Running", StateSucceeded: "Succeeded",
	StateFailed: "Failed", StateCancelled: "Cancelled",
}

// publishStatus publishes a status event for rec. Status is information for
// people and bots: a failure to publish is logged, never fails the operation.
func (r *Runtime) publishStatus(ctx context.Context, wf string, rec Record, note string) {
	st := &schemas.Status{Operation: rec.Key, Workflow: wf, Phase: phaseOf[rec.State], Message: note}
	if st.Message == "" {
		st.Message = rec.LastError
	}
	if ns, name, ok := strings.Cut(rec.Target, "/"); ok {
		st.VM = ns + "/" + name
	} else {
		st.Node = rec.Target
	}
	for target, p := range rec.Progress {
		ns, name, ok := strings.Cut(target, "/")
		if !ok {
			continue
		}
		phase := p.Phase
		if phase == "" {
			phase = "Unknown"
		}
		st.VMs = append(st.VMs, schemas.VMProgress{Namespace: ns, Name: name, Phase: phase, Node: p.Node, Message: p.Message})
	}
	id := schemas.DeterministicID(rec.Key, st.Phase, strconv.Itoa(rec.Attempts), rec.Updated.Format(time.RFC3339Nano))
	e, err := schemas.New(r.cfg.Source, id, st)
	if err == nil {
		var subject string
		if subject, err = schemas.StatusSubject(wf, rec.Target); err == nil {
			var m *nats.Msg
			if m, err = schemas.ToMsg(subject, e); err == nil {
				pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				_, err = r.js.PublishMsg(pctx, m)
				cancel()
			}
		}
	}
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Str("op", rec.Key).Msg("could not publish status")
	}
}
