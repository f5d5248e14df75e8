package consumers_test

// The five scenarios of the runtime review (issue 7): each lost an event, a
// worker slot or a guarantee before the runtime was redesigned.

import (
	"context"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/schemas"
)

func notReady(node string, since time.Time) *schemas.NodeNotReady {
	return &schemas.NodeNotReady{Node: node, Since: since.UTC().Truncate(time.Second), Reason: "test"}
}

func routeKey(t *testing.T, p schemas.Payload, id string) string {
	t.Helper()
	keys, err := consumers.Route(p, id)
	require.NoError(t, err)
	return keys.Operation
}

// Row 1: a maintenance holds node-1's lease when node-1 fails. Recovery must
// pre-empt it at once (not wait out the maintenance and be dead-lettered), and
// the maintenance resumes after the recovery.
func TestRecoveryPreemptsMaintenance(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	var runs recorder
	var inMaintenance, overlapped atomic.Bool
	holding := make(chan struct{}, 4)
	maint := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		n := runs.add("maintenance")
		inMaintenance.Store(true)
		defer inMaintenance.Store(false)
		holding <- struct{}{}
		if n == 1 {
			// A long evacuation that does not watch for pre-emption: only
			// the runtime ending its context stops it.
			<-ctx.Done()
			return context.Cause(ctx)
		}
		return nil
	})
	recov := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		runs.add("recovery")
		if inMaintenance.Load() {
			overlapped.Store(true)
		}
		return nil
	})
	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: maint},
		consumers.Workflow{Name: schemas.WorkflowRecovery, Handler: recov})

	e.publish("m-1", maintenance("node-1", "req-1"))
	<-holding
	nr := notReady("node-1", time.Now())
	e.publish("nr-1", nr)
	recKey := routeKey(t, nr, "nr-1")
	require.Eventually(t, func() bool { return e.state(recKey) == consumers.StateSucceeded }, 15*time.Second, 20*time.Millisecond,
		"recovery of node-1 must pre-empt the maintenance holding its lease")
	require.False(t, overlapped.Load(), "recovery ran while the maintenance handler was still inside node-1")
	mKey := consumers.MaintenanceOperationKey("node-1", "req-1")
	e.eventually(func() bool { return e.state(mKey) == consumers.StateSucceeded }, "the maintenance resumes after the recovery")
	require.Equal(t, 2, runs.get("maintenance"), "the pre-empted maintenance runs again once")
	require.Equal(t, 1, runs.get("recovery"))
	dls, err := consumers.ListDeadLetters(context.Background(), e.js, 0)
	require.NoError(t, err)
	require.Empty(t, dls, "nothing is dead-lettered")
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "every message acknowledged")
}

// Row 2: a message waiting for a busy lease must not hold a worker slot: a
// recovery of node-2 (free) runs while node-1's recovery waits.
func TestWaitingForALeaseHoldsNoSlot(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	release := make(chan struct{})
	holding := make(chan struct{})
	var once sync.Once
	maint := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		once.Do(func() { close(holding) })
		<-release // stuck in a step that cannot be interrupted
		return nil
	})
	var runs recorder
	recov := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		runs.add(ev.Keys.Target)
		return nil
	})
	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: maint},
		consumers.Workflow{Name: schemas.WorkflowRecovery, Concurrency: 1, Handler: recov})
	defer close(release)
	e.publish("m-1", maintenance("node-1", "req-1"))
	<-holding
	now := time.Now()
	e.publish("nr-1", notReady("node-1", now))
	e.publish("nr-2", notReady("node-2", now))
	require.Eventually(t, func() bool { return runs.get("node-2") == 1 }, 10*time.Second, 20*time.Millisecond,
		"node-2's recovery must not queue behind node-1's, which waits for a lease")
	require.Zero(t, runs.get("node-1"), "node-1 is still held by the maintenance")
}

// Row 3: JetStream stopped delivering a message (an earlier configuration's
// MaxDeliver ran out) while no replica was running, so its advisory reached
// nobody. A runtime started later finds the orphan and finishes it.
func TestOrphanedMessageIsRecoveredAfterRestart(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	ctx := context.Background()
	legacy := consumers.ConsumerConfig(cfg, schemas.WorkflowMaintenance)
	legacy.MaxDeliver = 2
	_, err := e.js.UpdateConsumer(ctx, consumers.StreamRequests, legacy)
	require.NoError(t, err)

	e.publish("crash-1", maintenance("node-1", "req-crash"))
	key := consumers.MaintenanceOperationKey("node-1", "req-crash")
	cons, err := e.js.Consumer(ctx, consumers.StreamRequests, schemas.WorkflowMaintenance)
	require.NoError(t, err)
	kv, err := e.js.KeyValue(ctx, consumers.BucketOps)
	require.NoError(t, err)
	// Crash loop: each worker takes the message, marks its operation running
	// and dies before it can settle anything.
	for i := 0; i < legacy.MaxDeliver; i++ {
		batch, err := cons.Fetch(1, jetstream.FetchMaxWait(2*cfg.AckWait))
		require.NoError(t, err)
		got := 0
		for range batch.Messages() {
			got++
		}
		require.Equal(t, 1, got, "delivery %d", i+1)
		_, err = consumers.NewOpStore(kv).Mutate(ctx, key, func(r *consumers.Record) error {
			r.Workflow, r.Target, r.State, r.Holder = schemas.WorkflowMaintenance, "node-1", consumers.StateRunning, "crashed-worker"
			r.Attempts++
			return nil
		})
		require.NoError(t, err)
	}
	// The next process of the crash loop pulls once more: JetStream finds the
	// message out of deliveries, gives it up and sends its advisory to
	// nobody, because that process dies too.
	e.eventually(func() bool {
		batch, err := cons.Fetch(1, jetstream.FetchMaxWait(200*time.Millisecond))
		require.NoError(t, err)
		for range batch.Messages() {
		}
		info, err := cons.Info(ctx)
		return err == nil && info.NumAckPending == 0 && info.NumPending == 0
	}, "JetStream gives the message up")
	require.Equal(t, uint64(1), e.streamMsgs(consumers.StreamRequests), "the message is still in the work queue")

	var calls recorder
	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			calls.add(ev.CloudEvent.ID())
			return nil
		})})
	e.eventually(func() bool { return e.state(key) == consumers.StateSucceeded }, "the orphaned operation is resumed and finishes")
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "and its message leaves the work queue")
	require.Equal(t, 1, calls.get("crash-1"))
}

// Row 4: an operation over 150 VMs. Status events stay valid and bounded
// (not a whole snapshot per update), and the final phase always arrives.
func TestStatusOfManyVMsIsBoundedAndFinalArrives(t *testing.T) {
	e := newEnv(t)
	const vms = 150
	detail := strings.Repeat("x", 300) // migration detail people read: target, speed, remaining
	e.start(testConfig(), consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			for _, phase := range []string{"Migrating", "Running"} {
				for i := 0; i < vms; i++ {
					if err := op.Progress(ctx, "ns/vm-"+strconv.Itoa(i), consumers.TargetProgress{Phase: phase, Node: "node-2", Message: detail}); err != nil {
						return err
					}
				}
			}
			return nil
		})})
	e.publish("big-1", maintenance("node-1", "req-big"))
	key := consumers.MaintenanceOperationKey("node-1", "req-big")
	e.eventually(func() bool { return e.state(key) == consumers.StateSucceeded }, "operation finishes")

	subject, err := schemas.StatusSubject(schemas.WorkflowMaintenance, "node-1")
	require.NoError(t, err)
	var final *schemas.Status
	var total int
	last := map[string]string{}
	e.eventually(func() bool {
		final, total, last = nil, 0, map[string]string{}
		for _, m := range statusMsgs(t, e.js, subject) {
			total += len(m.Data())
			ce, err := schemas.FromHeaders(m.Headers(), m.Data())
			require.NoError(t, err)
			p, err := schemas.Decode(ce)
			require.NoError(t, err, "every status event is valid")
			st := p.(*schemas.Status)
			for _, vm := range st.VMs {
				last[vm.Namespace+"/"+vm.Name] = vm.Phase
			}
			if st.Phase == schemas.PhaseSucceeded {
				final = st
			}
		}
		return final != nil
	}, "the final Succeeded status arrives")
	require.Len(t, last, vms, "every VM's progress was published before the final phase")
	require.NotNil(t, final.Summary, "the final status summarises the VMs")
	require.Equal(t, vms, final.Summary.Total)
	require.Equal(t, vms, final.Summary.Phases["Running"])
	for vm, phase := range last {
		require.Equal(t, "Running", phase, "%s: last published phase", vm)
	}
	// Each progress update is published about once: linear, not quadratic.
	require.Less(t, total, 2*vms*(len(detail)+200)+64*1024, "status bytes for %d VMs", vms)
}

// statusMsgs reads every status event on subject.
func statusMsgs(t *testing.T, js jetstream.JetStream, subject string) []jetstream.Msg {
	t.Helper()
	ctx := context.Background()
	c, err := js.OrderedConsumer(ctx, consumers.StreamStatus, jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}})
	require.NoError(t, err)
	var out []jetstream.Msg
	for {
		batch, err := c.FetchNoWait(500)
		require.NoError(t, err)
		n := 0
		for m := range batch.Messages() {
			out = append(out, m)
			n++
		}
		if n == 0 {
			return out
		}
	}
}

// Row 5: NATS becomes slow while a handler holds a lease. The holder must stop
// before its lease can expire on the server, so that the replica that takes
// the lease over never acts beside it, and nothing it writes afterwards lands
// in the record its successor resumes from.
func TestSlowNATSNeverMakesTwoHolders(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	cfg.AckWait = 6 * time.Second
	cfg.OrphanAfter = 0 // derived from the longer ack wait
	cfg.LeaseTTL = 6 * time.Second
	cfg.Reconfigure = true // the deadlines under test, over the environment's defaults
	proxy := natstest.StartProxy(t, e.srv.Addr().String())

	var mu sync.Mutex
	var stoppedA, startedB time.Time
	var lateWrite error
	aStarted := make(chan struct{})
	aDone := make(chan struct{})
	handlerA := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		close(aStarted)
		<-ctx.Done()
		mu.Lock()
		stoppedA = time.Now()
		mu.Unlock()
		// A handler that keeps going after its context ended.
		wctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		err := op.Progress(wctx, "ns/late", consumers.TargetProgress{Phase: "written-after-loss"})
		mu.Lock()
		lateWrite = err
		mu.Unlock()
		close(aDone)
		return context.Cause(ctx)
	})
	handlerB := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		mu.Lock()
		if startedB.IsZero() {
			startedB = time.Now()
		}
		mu.Unlock()
		return op.Progress(ctx, "ns/vm-1", consumers.TargetProgress{Phase: "done"})
	})
	a := e.startVia(proxy.URL(), cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: handlerA})
	e.publish("slow-1", maintenance("node-1", "req-slow"))
	<-aStarted
	proxy.SetDelay(3 * cfg.LeaseTTL) // NATS answers A three lease lifetimes late
	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: handlerB})

	key := consumers.MaintenanceOperationKey("node-1", "req-slow")
	require.Eventually(t, func() bool { return e.state(key) == consumers.StateSucceeded }, 60*time.Second, 50*time.Millisecond,
		"the second replica finishes the operation")
	proxy.SetDelay(0)
	select {
	case <-aDone:
	case <-time.After(60 * time.Second):
		t.Fatal("handler A never returned")
	}
	mu.Lock()
	defer mu.Unlock()
	require.False(t, stoppedA.IsZero(), "A's handler must be stopped")
	require.True(t, stoppedA.Before(startedB), "A was stopped at %s, after B started at %s: two holders acted",
		stoppedA.Format(time.StampMilli), startedB.Format(time.StampMilli))
	require.Error(t, lateWrite, "a write after the lease was lost must be refused")
	_, late := e.progress(key)["ns/late"]
	require.False(t, late, "the successor's record must not contain the lost holder's write")
	_ = a
}
