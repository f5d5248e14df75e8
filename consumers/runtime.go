package consumers

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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
	// Delivery counts JetStream deliveries of this message, starting at 1
	// (waiting for a lease is a delivery too); Operation.Attempt counts runs.
	Delivery  uint64
	StreamSeq uint64
}

// Handler runs one workflow for an event. It must be idempotent: it may run
// again for the same operation after a crash, a pre-emption or a wait, and
// Operation says how far earlier attempts got. It returns nil when the work
// is complete (or cleanly cancelled), Terminal(err) when no retry can help,
// Wait(d, why) to be run again after d without using its budget,
// Yield(why) after Operation.Preempted, or any other error to be retried
// with backoff. See the package documentation for the whole contract.
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
	// each slot holds at most one message, and only while a handler runs.
	Concurrency int
	Handler     Handler
	// Resolver, if set, refines the keys of each event from the live cluster.
	Resolver Resolver
	// AckWait of this workflow's consumer (default Config.AckWait). An
	// existing consumer keeps the server's value unless Config.Reconfigure.
	AckWait time.Duration
	// MaxAttempts and MaxAge bound an operation of this workflow (defaults
	// Config.MaxAttempts and Config.MaxAge); past them it is dead-lettered.
	MaxAttempts int
	MaxAge      time.Duration
}

// workflow is a Workflow as the runtime runs it, with the server's values.
type workflow struct {
	Workflow
	ackWait   time.Duration
	heartbeat time.Duration
	cons      jetstream.Consumer
}

// Runtime runs the workflows' consumers. Several processes may run one each
// against the same JetStream: they share the durable consumers.
type Runtime struct {
	cfg       Config
	nc        *nats.Conn
	js        jetstream.JetStream
	log       zerolog.Logger
	metrics   *Metrics
	workflows []*workflow
	id        string

	ops    *OpStore
	opsKV  jetstream.KeyValue
	progKV jetstream.KeyValue
	leases *leaseStore
	status *statusPublisher

	bound atomic.Bool // consumers bound and workers fetching (readiness)
	// final bounds settling (records, acks, releases, final status): it
	// outlives a handler's cancellation and ends only when Start gives up
	// waiting at shutdown.
	final     context.Context
	stopFinal context.CancelFunc

	mu         sync.Mutex
	inflight   map[string]*Operation // by operation key
	unfinished map[string][]byte     // operation records (raw) kept by watchRequests; finished ones are pruned by Reconcile
	indexed    bool                  // unfinished is complete
	trailing   sync.WaitGroup        // acks, releases and final status still in flight
}

// NewRuntime checks the configuration and the workflows. Nothing touches the
// server until Start.
func NewRuntime(nc *nats.Conn, cfg Config, log zerolog.Logger, metrics *Metrics, workflows ...Workflow) (*Runtime, error) {
	cfg = cfg.withDefaults()
	if nc == nil {
		return nil, errors.New("runtime needs a NATS connection")
	}
	// Asynchronous publishes (record creation, lease release, progress,
	// status) give up like any other call instead of waiting forever for an
	// answer a reconnect lost.
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncTimeout(4*cfg.CallTimeout+5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("jetstream context: %w", err)
	}
	seen := map[string]bool{}
	var wfs []*workflow
	var ackWaits []time.Duration
	for _, wf := range workflows {
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
		wf.Concurrency = max(wf.Concurrency, 1)
		if wf.AckWait <= 0 {
			wf.AckWait = cfg.AckWait
		}
		if wf.MaxAttempts <= 0 {
			wf.MaxAttempts = cfg.MaxAttempts
		}
		if wf.MaxAge <= 0 {
			wf.MaxAge = cfg.MaxAge
		}
		ackWaits = append(ackWaits, wf.AckWait)
		wfs = append(wfs, &workflow{Workflow: wf, ackWait: wf.AckWait, heartbeat: cfg.heartbeat(wf.AckWait)})
	}
	if err := cfg.validate(ackWaits...); err != nil {
		return nil, fmt.Errorf("runtime config: %w", err)
	}
	if metrics == nil {
		metrics = NewMetrics(nil)
	}
	for _, wf := range wfs {
		metrics.initWorkflow(wf.Name)
	}
	host, _ := os.Hostname()
	final, stopFinal := context.WithCancel(context.Background())
	return &Runtime{final: final, stopFinal: stopFinal, cfg: cfg, nc: nc, js: js, log: log, metrics: metrics, workflows: wfs,
		id:       fmt.Sprintf("%s-%d-%s", host, os.Getpid(), nonce()[:8]),
		inflight: map[string]*Operation{},
		status:   &statusPublisher{js: js, source: cfg.Source, log: log}}, nil
}

// Bound reports whether the runtime has bound its consumers and its workers
// are fetching (until it starts shutting down): the consumers' part of
// readiness.
func (r *Runtime) Bound() bool { return r.bound.Load() }

// ID identifies this runtime as a lease holder.
func (r *Runtime) ID() string { return r.id }

// Start declares streams, buckets and consumers, runs the workers and blocks
// until ctx ends. Then it stops fetching, gives in-flight handlers
// Config.ShutdownGrace to finish, cancels the rest (their messages are handed
// back, so another replica takes them over) and returns.
func (r *Runtime) Start(ctx context.Context) error {
	res, err := setup(ctx, r.js, r.cfg, r.workflows, r.log)
	if err != nil {
		return err
	}
	if err := r.adopt(res); err != nil {
		return err
	}

	// One watcher for the whole bucket signals cancel and yield requests to
	// the handlers running here (a watcher per handler would cost a consumer
	// per event).
	bg, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	var bgWG sync.WaitGroup
	defer func() { stopBG(); bgWG.Wait() }()
	bgWG.Add(2)
	go func() { defer bgWG.Done(); r.watchRequests(bg) }()
	go func() { defer bgWG.Done(); r.reconcileLoop(bg) }()

	// Handlers run on base, not ctx: a shutdown request must not interrupt
	// them before the grace period is over.
	base, cancelBase := context.WithCancelCause(context.WithoutCancel(ctx))
	defer cancelBase(nil)
	var wg sync.WaitGroup
	names := make([]string, 0, len(r.workflows))
	for _, wf := range r.workflows {
		names = append(names, wf.Name)
		for slot := 0; slot < wf.Concurrency; slot++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.worker(ctx, base, wf, slot)
			}()
		}
	}
	r.log.Info().Str("runtime", r.id).Strs("workflows", names).Dur("leaseTTL", r.cfg.LeaseTTL).Msg("consumers started")
	r.bound.Store(true)
	<-ctx.Done()
	r.bound.Store(false)
	r.log.Info().Dur("grace", r.cfg.ShutdownGrace).Msg("shutting down: no new messages; waiting for in-flight handlers")

	done := make(chan struct{})
	go func() { wg.Wait(); r.trailing.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-time.After(r.cfg.ShutdownGrace):
	}
	r.log.Warn().Dur("grace", r.cfg.ShutdownGrace).Msg("handlers still running after the shutdown grace; cancelling them and handing their messages back")
	cancelBase(ErrShuttingDown)
	select {
	case <-done:
		return nil
	case <-time.After(r.cfg.ShutdownGrace):
	}
	// Settling still waits on NATS (gone, say): stop it; the messages are
	// redelivered to another replica and their records resumed.
	r.stopFinal()
	select {
	case <-done:
		r.log.Warn().Msg("settling cut short at shutdown; unsettled messages are redelivered")
		return nil
	case <-time.After(r.cfg.ShutdownGrace):
		return errors.New("handlers ignored cancellation and are still running")
	}
}

// adopt takes the values the server holds (another replica may have set
// them) and checks that leases stay safe with them.
func (r *Runtime) adopt(res *Resources) error {
	r.opsKV, r.progKV = res.Ops, res.Progress
	r.ops = NewOpStore(res.Ops)
	if res.LeaseTTL != r.cfg.LeaseTTL {
		r.log.Warn().Dur("server", res.LeaseTTL).Dur("local", r.cfg.LeaseTTL).
			Msg("lease TTL differs from this replica's configuration; using the server's (set Reconfigure to change it)")
		r.cfg.LeaseTTL = res.LeaseTTL
		r.cfg.LeaseMargin = max(res.LeaseTTL/10, 100*time.Millisecond)
	}
	var ackWaits []time.Duration
	for _, wf := range r.workflows {
		aw := res.AckWait[wf.Name]
		if aw != wf.ackWait {
			r.log.Warn().Str("workflow", wf.Name).Dur("server", aw).Dur("local", wf.ackWait).
				Msg("ack wait differs from this replica's configuration; using the server's")
		}
		wf.ackWait, wf.heartbeat, wf.cons = aw, r.cfg.heartbeat(aw), res.Consumers[wf.Name]
		ackWaits = append(ackWaits, aw)
		r.cfg.CallTimeout = min(r.cfg.CallTimeout, wf.heartbeat/4)
	}
	if err := r.cfg.validate(ackWaits...); err != nil {
		return fmt.Errorf("the server's configuration is unsafe for this replica: %w", err)
	}
	r.leases = newLeaseStore(r.js, res.Locks, r.cfg.LeaseTTL, r.cfg.LeaseMargin, r.cfg.CallTimeout)
	return nil
}

// worker pulls one message at a time: a slot never holds a message it is not
// working on, so an idle replica can take the next one.
func (r *Runtime) worker(ctx, base context.Context, wf *workflow, slot int) {
	holder := fmt.Sprintf("%s/%s/%d", r.id, wf.Name, slot)
	log := r.log.With().Str("workflow", wf.Name).Int("slot", slot).Logger()
	trailSlot := make(chan struct{}, 2)
	var lastErr string
	for ctx.Err() == nil {
		batch, err := wf.cons.Fetch(1, jetstream.FetchMaxWait(r.cfg.FetchWait))
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
			r.process(ctx, base, wf, holder, msg, trailSlot)
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

// delivery is one message on its way through the steps of process.
type delivery struct {
	wf     *workflow
	msg    jetstream.Msg
	meta   *jetstream.MsgMetadata
	ev     Event
	holder string
	log    zerolog.Logger
	ctx    context.Context // base, carrying log

	leases []*Lease
	rec    Record
	rev    uint64
	op     *Operation
	// trailSlot bounds the settles the worker leaves running in the background.
	trailSlot chan struct{}
}

// process takes one message through decode, route, lease, start (or skip),
// run and settle. Each step settles the message itself when the path ends
// there.
func (r *Runtime) process(stop, base context.Context, wf *workflow, holder string, msg jetstream.Msg, trailSlot chan struct{}) {
	d, ok := r.decode(base, wf, holder, msg)
	if !ok {
		return
	}
	d.trailSlot = trailSlot
	if !r.route(d) {
		return
	}
	// The record of a new operation is created while the leases are taken:
	// one round trip instead of two on the common path.
	created := r.createRecord(d)
	if !r.lease(stop, d, created) || !r.start(d, created) {
		return
	}
	herr, cause := r.run(d)
	r.settle(d, herr, cause)
}

// decode turns the message into an Event, validating it once; a message
// that is not a valid event for this workflow is dead-lettered.
func (r *Runtime) decode(base context.Context, wf *workflow, holder string, msg jetstream.Msg) (*delivery, bool) {
	d := &delivery{wf: wf, msg: msg, holder: holder}
	meta, err := msg.Metadata()
	if err != nil {
		r.log.Error().Err(err).Str("subject", msg.Subject()).Msg("message without JetStream metadata; terminating it")
		_ = msg.Term()
		return nil, false
	}
	d.meta = meta
	d.log = r.log.With().Str("workflow", wf.Name).Uint64("seq", meta.Sequence.Stream).Uint64("delivery", meta.NumDelivered).Logger()
	d.ctx = d.log.WithContext(base)
	d.ev, err = decodeEvent(msg)
	if err != nil {
		r.deadLetter(d, "rejected: "+err.Error(), "invalid")
		return nil, false
	}
	d.ev.Delivery, d.ev.StreamSeq = meta.NumDelivered, meta.Sequence.Stream
	return d, true
}

// decodeEvent parses and validates the message as a request event. The
// subject is parsed once here; its kind and target must match the event.
func decodeEvent(msg jetstream.Msg) (Event, error) {
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
	return Event{CloudEvent: ce, Payload: p, Subject: msg.Subject()}, nil
}

// route finds the operation, its leases and what it cancels, and records
// the cancel requests.
func (r *Runtime) route(d *delivery) bool {
	keys, err := Route(d.ev.Payload, d.ev.CloudEvent.ID())
	if err == nil && keys.Workflow != d.wf.Name {
		err = fmt.Errorf("event type %s belongs to workflow %s, not %s", d.ev.CloudEvent.Type(), keys.Workflow, d.wf.Name)
	}
	if err != nil {
		r.deadLetter(d, "rejected: "+err.Error(), "invalid")
		return false
	}
	d.ev.Keys = keys
	if d.wf.Resolver != nil {
		rctx, cancel := context.WithTimeout(d.ctx, 4*r.cfg.CallTimeout+5*time.Second)
		resolved, err := d.wf.Resolver.Resolve(rctx, d.ev, keys)
		pinned := r.pinnedOperation(rctx, d)
		cancel()
		switch {
		case IsTerminal(err):
			r.deadLetter(d, "rejected: "+err.Error(), "invalid")
			return false
		case err != nil:
			r.later(d, r.jitter(r.cfg.backoff(int(min(d.meta.NumDelivered, 20)))), fmt.Errorf("resolve keys: %w", err), ResultRetried)
			return false
		}
		resolved.Workflow, resolved.Target = keys.Workflow, keys.Target
		// A message keeps the operation it was first resolved to: the
		// cluster may have changed since (a node back, a new spell), and a
		// redelivery must resume its operation, not start another.
		if pinned != "" {
			resolved.Operation = pinned
		} else {
			r.pinOperation(d, resolved.Operation)
		}
		d.ev.Keys = resolved
	}
	k := d.ev.Keys
	d.log = d.log.With().Str("op", k.Operation).Str("target", k.Target).Str("event", d.ev.CloudEvent.ID()).Logger()
	d.ctx = d.log.WithContext(d.ctx)
	if k.Cancels != "" {
		res, err := r.ops.RequestCancel(d.ctx, k.Cancels, "cancelled by "+d.ev.CloudEvent.Type()+" "+d.ev.CloudEvent.ID(), k.Workflow, k.Target)
		if err != nil {
			r.later(d, r.jitter(r.cfg.BackoffBase), fmt.Errorf("request cancel of %s: %w", k.Cancels, err), ResultRetried)
			return false
		}
		if len(res.Marked) > 0 {
			d.log.Info().Strs("cancelled", res.Marked).Msg("cancel requested")
		}
		for wf, keys := range res.Cancelled {
			for range keys {
				r.metrics.finished(wf, StateCancelled)
			}
		}
		for key, why := range res.Refused {
			d.log.Info().Str("refused", key).Str("why", why).Msg("cancel refused: the operation is past its point of no return")
		}
	}
	return true
}

// lease takes every lease of the operation, or none. When one is busy the
// message goes back with a short delay (and, if the holder has a lower
// priority, the holder is asked to yield): waiting holds no worker slot and
// uses none of the operation's budget.
func (r *Runtime) lease(stop context.Context, d *delivery, created *created) bool {
	locks := append([]Lock(nil), d.ev.Keys.Locks...)
	sort.Slice(locks, func(i, j int) bool { return locks[i].Key < locks[j].Key })
	for _, lk := range locks {
		want := leaseValue{Holder: d.holder, Operation: d.ev.Keys.Operation, Workflow: d.wf.Name, Priority: lk.Priority,
			Nonce: nonce(), Acquired: time.Now().UTC()}
		cctx, cancel := context.WithTimeout(stop, 2*r.cfg.CallTimeout+time.Second)
		l, cur, err := r.leases.acquire(cctx, lk.Key, want)
		cancel()
		if err == nil {
			d.leases = append(d.leases, l)
			continue
		}
		r.releaseAll(d, "", 0)
		r.undoCreate(d, created)
		if stop.Err() != nil {
			_ = d.msg.Nak()
			r.settled(d, ResultAbandoned)
			return false
		}
		if errors.Is(err, errLeaseHeld) {
			r.waitForLease(d, lk, cur)
			return false
		}
		r.later(d, r.jitter(r.cfg.LeaseRetry), err, ResultRetried)
		return false
	}
	return true
}

// waitForLease sends the message back to wait for a busy lease: a finished
// operation is skipped at once instead; a lower-priority holder is asked to
// yield.
func (r *Runtime) waitForLease(d *delivery, lk Lock, cur leaseValue) {
	k := d.ev.Keys
	rec, _, found, err := r.ops.Get(d.ctx, k.Operation)
	if err == nil && found && rec.State.Terminal() {
		r.skip(d, rec)
		return
	}
	delay := r.leaseRetry(d.meta.NumDelivered)
	why := fmt.Sprintf("waiting for lease %s held by operation %s (%s)", lk.Key, cur.Operation, cur.Workflow)
	if !cur.held() {
		why = fmt.Sprintf("waiting for lease %s reserved for operation %s", lk.Key, cur.ReservedFor)
	}
	if cur.held() && cur.Operation != k.Operation && cur.Priority < lk.Priority {
		asked, err := r.ops.requestYield(d.ctx, cur.Operation, YieldRequest{By: k.Operation, Workflow: d.wf.Name, Priority: lk.Priority, At: time.Now().UTC()})
		if err != nil {
			d.log.Warn().Err(err).Str("holder", cur.Operation).Msg("could not ask the lease holder to yield")
		} else if asked {
			r.metrics.Preemptions.WithLabelValues(cur.Workflow, d.wf.Name).Inc()
			d.log.Info().Str("holder", cur.Operation).Str("lease", lk.Key).Msg("asked the lower-priority holder to yield")
		}
		delay = r.jitter(r.cfg.PreemptRetry)
		why = fmt.Sprintf("pre-empting operation %s (%s) on lease %s", cur.Operation, cur.Workflow, lk.Key)
	}
	r.metrics.LeaseWaits.WithLabelValues(d.wf.Name).Inc()
	r.metrics.GateWaits.WithLabelValues(d.wf.Name, GateLease).Inc()
	// Note the wait on the record (at most every few seconds), so that the
	// reconciler knows the message is alive and people see why it waits.
	if err == nil && (!found || rec.Seq != d.ev.StreamSeq || time.Since(rec.LastSeen) > r.cfg.OrphanAfter/4 || rec.WaitReason != why) {
		_, werr := r.ops.Mutate(d.ctx, k.Operation, func(rec *Record) error {
			if rec.State.Terminal() {
				return errNoChange
			}
			if rec.State == StateRunning {
				if rec.Seq != d.ev.StreamSeq {
					return errNoChange // a duplicate of a running operation: its own message is the one to follow
				}
				// Its own message again: the holder died or stalls. Say
				// the message is alive; the holder's fields stay.
				rec.LastSeen, rec.Due = time.Now().UTC(), time.Now().Add(delay).UTC()
				return nil
			}
			rec.Workflow, rec.Target = d.wf.Name, k.Target
			if rec.State != StateSuspended {
				rec.State = StateWaiting
			}
			rec.Seq, rec.LastSeen, rec.Due, rec.WaitReason = d.ev.StreamSeq, time.Now().UTC(), time.Now().Add(delay).UTC(), why
			return nil
		})
		if werr != nil {
			d.log.Debug().Err(werr).Msg("could not note the wait on the record")
		}
	}
	d.log.Debug().Str("lease", lk.Key).Str("holder", cur.Holder).Dur("retryIn", delay).Msg(why)
	if err := d.msg.NakWithDelay(delay); err != nil {
		d.log.Warn().Err(err).Msg("nak failed; the message is redelivered after the ack wait")
	}
	r.settled(d, ResultWaiting)
}

var (
	errAlreadyFinished = errors.New("operation already finished")
	errBusy            = errors.New("operation running elsewhere")
)

// budgetError says an operation ran out of attempts or age.
type budgetError struct{ reason string }

func (e *budgetError) Error() string { return e.reason }

// created is a record creation in flight: a compare-and-set publish to the
// bucket's subject, asynchronous so that it overlaps taking the leases.
type created struct {
	rec Record
	fut jetstream.PubAckFuture
	err error
	ctx context.Context
}

// result waits for the creation: the new revision, or ErrKeyExists when the
// record existed (start then resumes it).
func (c *created) result() (uint64, error) {
	if c.err != nil {
		return 0, c.err
	}
	select {
	case ack := <-c.fut.Ok():
		return ack.Sequence, nil
	case err := <-c.fut.Err():
		if isRevisionConflict(err) {
			return 0, fmt.Errorf("%w: %v", jetstream.ErrKeyExists, err)
		}
		return 0, err
	case <-c.ctx.Done():
		return 0, c.ctx.Err()
	}
}

// createRecord starts creating the record of the delivery's operation as a
// new one, running under this attempt.
func (r *Runtime) createRecord(d *delivery) *created {
	k := d.ev.Keys
	now := time.Now().UTC()
	ce := d.ev.CloudEvent
	request, _ := json.Marshal(ce)
	c := &created{ctx: d.ctx, rec: Record{Leases: lockKeys(k.Locks), Key: k.Operation, Workflow: d.wf.Name, Target: k.Target,
		State: StateRunning, Generation: 1, Attempts: 1, Charged: 1, Holder: d.holder, EventID: ce.ID(), EventType: ce.Type(),
		Request: request, Seq: d.ev.StreamSeq, LastSeen: now, Due: now.Add(d.wf.ackWait), Created: now, Started: now, Updated: now}}
	b, err := json.Marshal(c.rec)
	if err != nil {
		c.err = fmt.Errorf("encode operation %s: %w", k.Operation, err)
		return c
	}
	m := nats.NewMsg("$KV." + BucketOps + "." + k.Operation)
	m.Data = b
	m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, "0")
	c.fut, c.err = r.js.PublishMsgAsync(m)
	return c
}

// undoCreate removes a record created for an attempt that did not get its
// leases, unless someone wrote it since.
func (r *Runtime) undoCreate(d *delivery, c *created) {
	rev, err := c.result()
	if err != nil {
		return
	}
	ctx, cancel := context.WithTimeout(r.final, 2*r.cfg.CallTimeout+time.Second)
	defer cancel()
	if err := r.ops.kv.Purge(ctx, c.rec.Key, jetstream.LastRevision(rev)); err != nil && !isRevisionConflict(err) {
		d.log.Warn().Err(err).Msg("could not remove the record of an attempt that did not start")
	}
}

func lockKeys(locks []Lock) []string {
	out := make([]string, 0, len(locks))
	for _, l := range locks {
		out = append(out, l.Key)
	}
	return out
}

// start records the operation running under this attempt: the record
// createRecord made, or an existing one resumed. It skips a finished
// operation and dead-letters one whose budget is spent.
func (r *Runtime) start(d *delivery, c *created) bool {
	k := d.ev.Keys
	now := time.Now().UTC()
	ce := d.ev.CloudEvent
	rev, cerr := c.result()
	if cerr == nil {
		d.rec, d.rev = c.rec, rev
		return true
	}
	if !errors.Is(cerr, jetstream.ErrKeyExists) {
		r.releaseAll(d, "", 0)
		r.later(d, r.jitter(r.cfg.BackoffBase), fmt.Errorf("create operation record: %w", cerr), ResultRetried)
		return false
	}
	request := c.rec.Request
	leases := c.rec.Leases
	var err error
	d.rec, d.rev, err = r.ops.mutateFrom(d.ctx, k.Operation, Record{}, 0, false, func(rec *Record) error {
		if rec.State.Terminal() {
			return errAlreadyFinished
		}
		if rec.State == StateRunning && len(k.Locks) == 0 && rec.Holder != d.holder && now.Sub(rec.Updated) < d.wf.ackWait {
			return errBusy // an operation without leases, running elsewhere: its record is its lock
		}
		if rec.Charged >= d.wf.MaxAttempts {
			return &budgetError{fmt.Sprintf("handler attempts exhausted (%d of %d); last error: %s", rec.Charged, d.wf.MaxAttempts, orNone(rec.LastError))}
		}
		if age := now.Sub(rec.Created); age > d.wf.MaxAge {
			return &budgetError{fmt.Sprintf("operation older than its maximum age %s (created %s); last error: %s", d.wf.MaxAge, rec.Created.Format(time.RFC3339), orNone(rec.LastError))}
		}
		rec.Workflow, rec.Target = d.wf.Name, k.Target
		rec.Generation = max(rec.Generation, 1)
		rec.Attempts++
		rec.Charged++
		rec.State, rec.Holder, rec.Leases = StateRunning, d.holder, leases
		rec.EventID, rec.EventType = ce.ID(), ce.Type()
		if len(rec.Request) == 0 {
			rec.Request = request
		}
		rec.Seq, rec.LastSeen, rec.Due = d.ev.StreamSeq, now, now.Add(d.wf.ackWait)
		rec.Yield, rec.WaitReason = nil, ""
		if rec.Started.IsZero() {
			rec.Started = now
		}
		return nil
	})
	var be *budgetError
	switch {
	case errors.Is(err, errAlreadyFinished):
		r.releaseAll(d, "", 0)
		r.skip(d, d.rec)
		return false
	case errors.As(err, &be):
		r.releaseAll(d, "", 0)
		r.deadLetter(d, be.reason, "budget")
		return false
	case errors.Is(err, errBusy):
		r.later(d, r.leaseRetry(d.meta.NumDelivered), fmt.Errorf("operation %s is running elsewhere", k.Operation), ResultWaiting)
		return false
	case err != nil:
		r.releaseAll(d, "", 0)
		r.later(d, r.jitter(r.cfg.BackoffBase), err, ResultRetried)
		return false
	}
	return true
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// run runs the handler with the operation, keeping the message and the
// leases alive, and returns its error and, if its context was cancelled,
// why.
func (r *Runtime) run(d *delivery) (herr, cause error) {
	op := newOperation(r, d.wf, d.rec, d.rev, d.holder, d.ev.Keys.Locks, d.leases)
	d.op = op
	if d.rec.CancelRequested {
		op.markCancelled(d.rec.CancelReason)
	}
	hctx, cancel := context.WithCancelCause(d.ctx)
	defer cancel(nil)
	op.cancelRun = cancel
	r.mu.Lock()
	r.inflight[op.Key()] = op
	r.mu.Unlock()
	defer func() {
		r.mu.Lock()
		delete(r.inflight, op.Key())
		r.mu.Unlock()
	}()

	if d.rec.Attempts > 1 || d.rec.Generation > 1 || len(d.rec.Summary) > 0 {
		lctx, lcancel := context.WithTimeout(hctx, 4*r.cfg.CallTimeout+5*time.Second)
		err := op.progress.load(lctx, r.progKV)
		lcancel()
		if err != nil {
			return err, nil
		}
	}
	k := r.keep(hctx, cancel, d, op)
	op.startProgress = func() { go func() { defer close(op.progressDone); r.publishProgress(hctx, op) }() }
	r.metrics.InFlight.WithLabelValues(d.wf.Name).Inc()
	started := time.Now()
	d.log.Debug().Int("attempt", d.rec.Attempts).Msg("handler started")
	herr = call(hctx, d.wf.Handler, op, d.ev)
	r.metrics.Duration.WithLabelValues(d.wf.Name).Observe(time.Since(started).Seconds())
	r.metrics.InFlight.WithLabelValues(d.wf.Name).Dec()
	if hctx.Err() != nil {
		cause = context.Cause(hctx)
	}
	k.stop()
	op.stopProgress(cancel)
	op.stopYieldTimer()
	if herr != nil {
		var p *panicError
		if errors.As(herr, &p) {
			d.log.Error().Interface("panic", p.value).Str("stack", string(p.stack)).Msg("handler panicked")
		}
	}
	return herr, cause
}

// call runs the handler, turning a panic into an error so one bad event
// cannot take the process down.
func call(ctx context.Context, h Handler, op *Operation, ev Event) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = &panicError{value: p, stack: debug.Stack()}
		}
	}()
	return h.Handle(ctx, op, ev)
}

func (r *Runtime) loseLease(d *delivery, cancel context.CancelCauseFunc, op *Operation, err error) {
	op.kill(err)
	r.metrics.LeasesLost.WithLabelValues(op.wf.Name).Inc()
	log := r.log
	if d != nil {
		log = d.log
	}
	log.Error().Err(err).Str("op", op.Key()).Msg("lease lost; stopping the handler before another replica can take over")
	cancel(fmt.Errorf("%w: %v", ErrLeaseLost, err))
}

// publishProgress writes and publishes per-target progress in batches while
// the handler runs: at most one batch per StatusInterval. It starts with the
// first Progress call.
func (r *Runtime) publishProgress(ctx context.Context, op *Operation) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-op.dirty:
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(r.cfg.StatusInterval):
		}
		if err := r.flushProgress(ctx, op, false); err != nil {
			if errors.Is(err, ErrFenced) || ctx.Err() != nil {
				return
			}
			r.log.Warn().Err(err).Str("op", op.Key()).Msg("could not write progress; will retry")
			select {
			case op.dirty <- struct{}{}:
			default:
			}
		}
	}
}

// flushProgress writes unwritten progress, keeps the record's summary up to
// date and, unless final, publishes the changed targets as a status delta.
func (r *Runtime) flushProgress(ctx context.Context, op *Operation, final bool) error {
	cctx, cancel := context.WithTimeout(ctx, 4*r.cfg.CallTimeout+5*time.Second)
	defer cancel()
	if err := op.progress.write(cctx, op.Generation(), op.Attempt(), op.Fence); err != nil {
		return err
	}
	counts := op.progress.counts()
	op.mu.Lock()
	same := equalCounts(counts, op.rec.Summary)
	op.mu.Unlock()
	if !same {
		if err := op.write(cctx, func(rec *Record) { rec.Summary = counts }); err != nil {
			return err
		}
	}
	if final {
		return nil
	}
	op.mu.Lock()
	rec := op.rec
	op.mu.Unlock()
	if deltas := vmDeltas(op, op.progress.takeUnsent()); len(deltas) > 0 {
		r.status.publish(rec, schemas.PhaseRunning, rec.Message, op.nextStatusSeq, deltas)
	}
	return nil
}

func equalCounts(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// settle maps the handler's result onto the record, the leases and the
// message: the one place that decides ack, nak, wait, suspend or dead letter.
func (r *Runtime) settle(d *delivery, herr, cause error) {
	op := d.op
	var wait *WaitError
	var yield *YieldError
	preempted := errors.Is(cause, ErrPreempted) || (errors.As(herr, &yield) && yield != nil)
	switch {
	case errors.Is(cause, ErrLeaseLost):
		// Someone else may own the node now: touch neither the record nor the message.
		d.log.Warn().AnErr("handler", herr).Err(cause).Msg("lease lost; handler stopped, message left for redelivery")
		r.settled(d, ResultAbandoned)
		return
	case errors.Is(cause, ErrShuttingDown):
		r.handBack(d, "interrupted by shutdown")
		return
	}
	// Whatever the outcome, what the handler reported must be stored first.
	if err := r.flushProgress(r.final, op, true); err != nil {
		if errors.Is(err, ErrFenced) {
			d.log.Warn().Err(err).Msg("attempt fenced while settling; message left for redelivery")
			r.settled(d, ResultAbandoned)
			return
		}
		if herr == nil || IsTerminal(herr) {
			herr = fmt.Errorf("store progress: %w", err)
		}
	}
	switch {
	case herr == nil:
		r.succeed(d)
	case IsTerminal(herr):
		r.deadLetter(d, "handler failed: "+errorText(herr), "terminal")
	case errors.As(herr, &wait):
		gate := wait.Gate
		if gate == "" {
			gate = GateOther
		}
		r.metrics.GateWaits.WithLabelValues(d.wf.Name, gate).Inc()
		r.suspend(d, StateWaiting, wait.Reason, wait.After, op.Key(), 0)
	case preempted:
		y := op.PreemptedBy()
		reason := "pre-empted by " + y.By
		if yield != nil && yield.Reason != "" {
			reason += ": " + yield.Reason
		}
		r.suspend(d, StateSuspended, reason, r.jitter(r.cfg.LeaseRetry), y.By, y.Priority)
	default:
		r.retry(d, herr)
	}
}

// finish writes the attempt's last record change if this attempt still
// holds the operation.
func (r *Runtime) finish(d *delivery, fn func(rec *Record)) (Record, error) {
	ctx, cancel := context.WithTimeout(r.final, 4*r.cfg.CallTimeout+5*time.Second)
	defer cancel()
	op := d.op
	op.mu.Lock()
	cur, rev := op.rec, op.rev
	op.mu.Unlock()
	rec, _, err := r.ops.mutateFrom(ctx, op.Key(), cur, rev, true, func(rec *Record) error {
		if err := op.owns(*rec); err != nil {
			return err
		}
		fn(rec)
		rec.Holder = ""
		return nil
	})
	return rec, err
}

// succeed records the operation finished and acknowledges its message at
// the same time, then gives the leases back and publishes the final status,
// in the background: the worker goes on with its next message meanwhile (at
// most two settles behind). The leases go back only after the record says
// finished, so that a duplicate delivered meanwhile waits and is then
// skipped. Should the process die between the ack and the record, the
// reconciler finds the operation running without a holder or a message and
// publishes its request again: the (idempotent) handler runs once more.
func (r *Runtime) succeed(d *delivery) {
	d.trailSlot <- struct{}{}
	r.trailing.Add(1)
	go func() {
		defer r.trailing.Done()
		defer func() { <-d.trailSlot }()
		for _, l := range d.leases {
			if !l.Valid() {
				d.log.Warn().Str("lease", l.key).Msg("lease ran out before the success was recorded; message left for redelivery")
				r.settled(d, ResultAbandoned)
				return
			}
		}
		ctx, cancel := context.WithTimeout(r.final, 4*r.cfg.CallTimeout+5*time.Second)
		defer cancel()
		acked := make(chan error, 1)
		go func() { acked <- d.msg.DoubleAck(ctx) }()
		rec, err := r.finish(d, func(rec *Record) {
			rec.State = StateSucceeded
			if rec.CancelRequested || isClosed(d.op.Cancelled()) {
				rec.State = StateCancelled
			}
			rec.LastError, rec.WaitReason, rec.Finished, rec.Due = "", "", time.Now().UTC(), time.Time{}
		})
		if ackErr := <-acked; ackErr != nil {
			d.log.Warn().Err(ackErr).Msg("ack not confirmed; a redelivery finds the operation finished and is skipped")
		}
		if err != nil {
			d.log.Error().Err(err).Msg("the work is done but its record could not say so; the reconciler will run the operation once more")
			r.releaseAll(d, "", 0)
			r.settled(d, ResultAcked)
			return
		}
		r.settled(d, ResultAcked)
		r.metrics.finished(d.wf.Name, rec.State)
		d.log.Info().Str("state", string(rec.State)).Int("attempt", rec.Attempts).Msg("operation finished; message acknowledged")
		futs := r.status.publish(rec, phaseOf[rec.State], statusNote(rec, ""), d.op.nextStatusSeq, vmDeltas(d.op, d.op.progress.takeUnsent()))
		r.releaseAsync(d, "", 0)(ctx)
		r.status.wait(ctx, rec.Key, futs)
	}()
}

// trail releases the leases, settles the message and publishes the final
// status in parallel; the worker goes on with its next message meanwhile.
func (r *Runtime) trail(d *delivery, rec Record, reserveFor string, priority int, settle func(ctx context.Context) error, result string) {
	deltas := vmDeltas(d.op, d.op.progress.takeUnsent())
	seq := d.op.nextStatusSeq
	r.trailing.Add(1)
	go func() {
		defer r.trailing.Done()
		ctx, cancel := context.WithTimeout(r.final, 4*r.cfg.CallTimeout+5*time.Second)
		defer cancel()
		futs := r.status.publish(rec, phaseOf[rec.State], statusNote(rec, ""), seq, deltas)
		released := r.releaseAsync(d, reserveFor, priority)
		if err := settle(ctx); err != nil {
			d.log.Warn().Err(err).Str("result", result).Msg("settling the message not confirmed; a redelivery finds the record and acts on it")
		}
		released(ctx)
		r.status.wait(ctx, rec.Key, futs)
		r.settled(d, result)
	}()
}

// suspend records a waiting or pre-empted operation, keeps its leases
// reserved (for itself, or for the operation that pre-empted it) and sends
// the message back to be delivered after delay. Neither uses budget.
func (r *Runtime) suspend(d *delivery, state State, reason string, delay time.Duration, reserveFor string, priority int) {
	if priority == 0 {
		for _, l := range d.ev.Keys.Locks {
			priority = max(priority, l.Priority)
		}
	}
	rec, err := r.finish(d, func(rec *Record) {
		rec.State, rec.WaitReason = state, reason
		rec.Charged = max(rec.Charged-1, 0)
		rec.Due, rec.LastSeen = time.Now().Add(delay).UTC(), time.Now().UTC()
		rec.Yield = nil
	})
	if err != nil {
		if errors.Is(err, ErrFenced) {
			r.settled(d, ResultAbandoned)
			return
		}
		r.retry(d, fmt.Errorf("record %s: %w", state, err))
		return
	}
	result := ResultWaiting
	if state == StateSuspended {
		result = ResultSuspended
		d.log.Info().Str("by", reserveFor).Msg("operation suspended; its lease goes to the pre-empting operation")
	} else {
		d.log.Info().Str("reason", reason).Dur("checkAgainIn", delay).Msg("operation waits")
	}
	r.trail(d, rec, reserveFor, priority, func(context.Context) error { return d.msg.NakWithDelay(delay) }, result)
}

// retry records a failed attempt and sends the message back with backoff,
// or dead-letters it when the operation's attempts are spent.
func (r *Runtime) retry(d *delivery, herr error) {
	text := errorText(herr)
	delay := r.jitter(r.cfg.backoff(max(d.rec.Charged, 1)))
	rec, err := r.finish(d, func(rec *Record) {
		rec.State, rec.LastError = StatePending, text
		rec.Due, rec.LastSeen = time.Now().Add(delay).UTC(), time.Now().UTC()
	})
	if errors.Is(err, ErrFenced) {
		r.settled(d, ResultAbandoned)
		return
	}
	if err == nil && rec.Charged >= d.wf.MaxAttempts {
		r.deadLetter(d, fmt.Sprintf("handler attempts exhausted (%d of %d); last error: %s", rec.Charged, d.wf.MaxAttempts, text), "budget")
		return
	}
	d.log.Warn().Str("error", text).Dur("retryIn", delay).Msg("handler failed; will retry")
	if err != nil {
		d.log.Warn().Err(err).Msg("could not record the failed attempt")
		rec = d.rec
	}
	r.trail(d, rec, "", 0, func(context.Context) error { return d.msg.NakWithDelay(delay) }, ResultRetried)
}

// handBack returns an interrupted operation to pending and the message to
// the stream at once, for another replica.
func (r *Runtime) handBack(d *delivery, why string) {
	rec, err := r.finish(d, func(rec *Record) {
		rec.State, rec.LastError = StatePending, why
		rec.Charged = max(rec.Charged-1, 0)
	})
	if err != nil {
		d.log.Warn().Err(err).Msg("could not record the interruption")
		rec = d.rec
	}
	d.log.Warn().Msg(why + "; message handed back for another replica")
	r.trail(d, rec, "", 0, func(context.Context) error { return d.msg.Nak() }, ResultAbandoned)
}

// later sends a message back without touching its operation (it did not start).
func (r *Runtime) later(d *delivery, delay time.Duration, err error, result string) {
	d.log.Warn().Err(err).Dur("retryIn", delay).Msg("cannot start the operation now; will retry")
	if nerr := d.msg.NakWithDelay(delay); nerr != nil {
		d.log.Warn().Err(nerr).Msg("nak failed; the message is redelivered after the ack wait")
	}
	r.settled(d, result)
}

// skip acknowledges a message whose operation already finished.
func (r *Runtime) skip(d *delivery, rec Record) {
	ctx, cancel := context.WithTimeout(d.ctx, 5*time.Second)
	defer cancel()
	if err := d.msg.DoubleAck(ctx); err != nil {
		d.log.Warn().Err(err).Msg("ack of a finished operation's message not confirmed")
	}
	d.log.Info().Str("state", string(rec.State)).Msg("operation already finished; acknowledged without acting")
	r.settled(d, ResultSkipped)
}

// deadLetter stores the message in DROVER_DLQ, waits for the store's ack,
// marks the operation failed (labelled with its workflow and target, so its
// status is valid) and terminates the message. If the DLQ cannot take it,
// the message is sent back instead: nothing is dropped.
func (r *Runtime) deadLetter(d *delivery, reason, cause string) {
	k := d.ev.Keys
	ctx, cancel := context.WithTimeout(r.final, 4*r.cfg.CallTimeout+5*time.Second)
	defer cancel()
	dl := deadLetterMsg(d.wf.Name, k.Target, k.Operation, d.msg.Subject(), d.meta.Sequence.Stream, d.meta.NumDelivered, d.msg.Headers(), d.msg.Data(), reason)
	if err := publishDeadLetter(ctx, r.js, dl); err != nil {
		d.log.Error().Err(err).Msg("could not dead-letter; will retry the message")
		_ = d.msg.NakWithDelay(r.jitter(r.cfg.BackoffBase))
		r.settled(d, ResultRetried)
		return
	}
	var rec Record
	marked := false // this delivery marked the operation failed
	if k.Operation != "" {
		var err error
		rec, err = r.ops.Mutate(ctx, k.Operation, func(rec *Record) error {
			marked = false
			if rec.State.Terminal() {
				return errNoChange
			}
			marked = true
			rec.Workflow, rec.Target = d.wf.Name, k.Target
			rec.State, rec.Holder, rec.LastError, rec.Finished = StateFailed, "", reason, time.Now().UTC()
			rec.Due = time.Time{}
			if d.op != nil {
				rec.Summary = d.op.progress.counts()
			}
			return nil
		})
		if err != nil {
			marked = false
			d.log.Warn().Err(err).Msg("could not mark the operation failed")
		}
	}
	settle := func(context.Context) error { return d.msg.TermWithReason(truncate(reason, 256)) }
	r.metrics.DeadLetters.WithLabelValues(d.wf.Name, cause).Inc()
	if marked {
		r.metrics.finished(d.wf.Name, StateFailed)
	}
	d.log.Error().Str("reason", reason).Msg("message dead-lettered")
	if rec.State == StateFailed {
		if d.op == nil {
			d.op = &Operation{progress: newProgressBook(r.js, r.progKV, rec.Key)}
		}
		r.trail(d, rec, "", 0, settle, ResultDeadLettered)
		return
	}
	r.releaseAll(d, "", 0)
	if err := settle(ctx); err != nil {
		d.log.Warn().Err(err).Msg("term failed; a redelivery will be dead-lettered again under the same id")
	}
	r.settled(d, ResultDeadLettered)
}

// releaseAll gives back every lease the delivery holds.
func (r *Runtime) releaseAll(d *delivery, reserveFor string, priority int) {
	ctx, cancel := context.WithTimeout(r.final, 4*r.cfg.CallTimeout+time.Second)
	defer cancel()
	r.releaseAsync(d, reserveFor, priority)(ctx)
}

// releaseAsync sends the release of every lease the delivery holds and
// returns a function that waits for them.
func (r *Runtime) releaseAsync(d *delivery, reserveFor string, priority int) func(context.Context) {
	var waits []func(context.Context) error
	for _, l := range d.leases {
		waits = append(waits, l.releaseAsync(reserveFor, priority))
	}
	d.leases = nil
	return func(ctx context.Context) {
		for _, wait := range waits {
			if err := wait(ctx); err != nil {
				d.log.Warn().Err(err).Msg("could not release lease; it expires with its TTL")
			}
		}
	}
}

// routePrefix prefixes the drover-ops keys that pin a message (by stream
// sequence) to the operation a Resolver first gave it.
const routePrefix = "route."

func routeKey(seq uint64) string { return routePrefix + strconv.FormatUint(seq, 10) }

// pinnedOperation is the operation an earlier delivery of the message was
// resolved to, "" on its first delivery or if none was kept.
func (r *Runtime) pinnedOperation(ctx context.Context, d *delivery) string {
	if d.meta.NumDelivered <= 1 {
		return ""
	}
	e, err := r.opsKV.Get(ctx, routeKey(d.ev.StreamSeq))
	if err != nil {
		return ""
	}
	return string(e.Value())
}

// pinOperation keeps the message's operation for its redeliveries. It is
// sent without waiting: lost, a redelivery resolves again.
func (r *Runtime) pinOperation(d *delivery, op string) {
	m := nats.NewMsg("$KV." + BucketOps + "." + routeKey(d.ev.StreamSeq))
	m.Data = []byte(op)
	if _, err := r.js.PublishMsgAsync(m); err != nil {
		d.log.Debug().Err(err).Msg("could not pin the message to its operation")
	}
}

// unpin forgets the message's operation once the message is gone.
func (r *Runtime) unpin(d *delivery) {
	m := nats.NewMsg("$KV." + BucketOps + "." + routeKey(d.ev.StreamSeq))
	m.Header.Set("KV-Operation", "PURGE")
	m.Header.Set("Nats-Rollup", "sub")
	if _, err := r.js.PublishMsgAsync(m); err != nil {
		d.log.Debug().Err(err).Msg("could not unpin the message")
	}
}

// settled counts the result and tells Config.Settled.
func (r *Runtime) settled(d *delivery, result string) {
	if d.wf.Resolver != nil && d.ev.StreamSeq > 0 {
		switch result {
		case ResultAcked, ResultSkipped, ResultDeadLettered:
			r.unpin(d)
		}
	}
	r.metrics.Messages.WithLabelValues(d.wf.Name, result).Inc()
	if r.cfg.Settled != nil {
		r.cfg.Settled(Settlement{Workflow: d.wf.Name, EventID: d.ev.CloudEvent.ID(), Operation: d.ev.Keys.Operation, Result: result})
	}
}

// watchRequests follows the operations bucket: it signals cancel and yield
// requests to the handlers running here, and keeps the index of unfinished
// operations the reconciler works from. If the watch fails, the heartbeat's
// read of the record still finds the requests.
func (r *Runtime) watchRequests(ctx context.Context) {
	var lastErr string
	for ctx.Err() == nil {
		w, err := r.opsKV.WatchAll(ctx)
		if err != nil {
			if err.Error() != lastErr {
				r.log.Warn().Err(err).Msg("cannot watch operation records; cancel and yield requests are seen at the next heartbeat")
			}
			lastErr = err.Error()
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			continue
		}
		lastErr = ""
		// The index keeps raw values: decoding every write of every replica
		// would cost more than the reconciler's pass, which decodes them.
		fresh := map[string][]byte{}
		loading := true
		for e := range w.Updates() {
			if e == nil {
				r.mu.Lock()
				r.unfinished, r.indexed = fresh, true
				r.mu.Unlock()
				loading = false
				continue
			}
			key := e.Key()
			if strings.HasPrefix(key, nodeStatePrefix) || strings.HasPrefix(key, routePrefix) {
				continue
			}
			var value []byte
			if e.Operation() == jetstream.KeyValuePut {
				value = e.Value()
			}
			if loading {
				if value != nil {
					fresh[key] = value
				}
				continue
			}
			r.mu.Lock()
			if value == nil {
				delete(r.unfinished, key)
			} else {
				r.unfinished[key] = value
			}
			op := r.inflight[key]
			r.mu.Unlock()
			var rec Record
			if op != nil && !op.wrote(e.Revision()) && json.Unmarshal(value, &rec) == nil {
				r.signal(op, rec)
			}
		}
		_ = w.Stop()
		r.mu.Lock()
		r.indexed = false
		r.mu.Unlock()
	}
}

// signal passes cancel and yield requests found on rec to its running handler.
func (r *Runtime) signal(op *Operation, rec Record) {
	if rec.Holder != op.holder || rec.Attempts != op.Attempt() {
		return
	}
	if rec.CancelRequested && !isClosed(op.Cancelled()) {
		r.log.Info().Str("op", rec.Key).Str("reason", rec.CancelReason).Msg("cancel requested; signalling the handler")
		op.markCancelled(rec.CancelReason)
	}
	if rec.Yield != nil && op.markPreempted(*rec.Yield) {
		r.log.Info().Str("op", rec.Key).Str("by", rec.Yield.By).Dur("grace", r.cfg.YieldGrace).Msg("pre-empted; asking the handler to yield")
		op.armYieldTimer(r.cfg.YieldGrace)
	}
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// leaseRetry is how soon a message that found its lease busy comes back:
// jittered, growing with its deliveries, capped.
func (r *Runtime) leaseRetry(delivery uint64) time.Duration {
	d := r.cfg.LeaseRetry
	for i := uint64(1); i < delivery && d < r.cfg.LeaseRetryMax; i++ {
		d *= 2
	}
	return r.jitter(min(d, r.cfg.LeaseRetryMax))
}

// jitter adds up to a quarter to d, so that replicas do not retry in step.
func (r *Runtime) jitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return d + time.Duration(mrand.Int64N(int64(d)/4+1))
}

func nonce() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
