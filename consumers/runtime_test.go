package consumers_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

// 1. A handler that runs for 5 x AckWait is invoked exactly once and its
// message is acknowledged only after it returns.
func TestLongHandlerRunsOnceAndAcksAfterReturn(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	var calls recorder
	var pendingBeforeReturn uint64
	returned := make(chan struct{})
	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			calls.add("handle")
			select {
			case <-time.After(5 * cfg.AckWait): // the behaviour under test: a handler longer than AckWait
			case <-ctx.Done():
				return ctx.Err()
			}
			pendingBeforeReturn = e.streamMsgs(consumers.StreamRequests)
			close(returned)
			return nil
		})})

	e.publish("long-1", maintenance("node-1", "req-1"))
	<-returned
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "message acked after the handler returned")

	require.Equal(t, uint64(1), pendingBeforeReturn, "message must still be in the work queue while the handler runs")
	require.Equal(t, 1, calls.get("handle"), "handler must run exactly once")
	cons, err := e.js.Consumer(context.Background(), consumers.StreamRequests, schemas.WorkflowMaintenance)
	require.NoError(t, err)
	info, err := cons.Info(context.Background())
	require.NoError(t, err)
	require.Zero(t, info.NumRedelivered, "InProgress must keep the message from being redelivered")
	rec := e.op(consumers.MaintenanceOperationKey("node-1", "req-1"))
	require.Equal(t, consumers.StateSucceeded, rec.State)
	require.Equal(t, 1, rec.Attempts)
}

// resumable returns a handler that works through targets in order, records
// each in the operation record and skips those an earlier attempt finished.
// When block(target) is true the handler stops before that target and waits
// for its context to end.
func resumable(targets []string, done *recorder, block func(target string, attempt int) bool) consumers.Handler {
	return consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		attempt := op.Resumed().Attempts
		for _, target := range targets {
			if op.Done(target, "done") {
				continue
			}
			if block != nil && block(target, attempt) {
				<-ctx.Done()
				return context.Cause(ctx)
			}
			done.add(target + "@" + strconv.Itoa(attempt))
			if err := op.Progress(ctx, target, consumers.TargetProgress{Phase: "done"}); err != nil {
				return err
			}
			if err := op.Flush(ctx); err != nil {
				return err
			}
		}
		return nil
	})
}

// 2. A worker that dies mid-handler (connection closed, no ack): the message
// is redelivered to a second worker, which resumes from the operation record.
func TestDeadWorkerIsTakenOverAndResumes(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	targets := []string{"ns/vm-1", "ns/vm-2", "ns/vm-3", "ns/vm-4"}
	var done recorder
	blocked := make(chan struct{})
	var causeA error
	var once sync.Once
	handlerA := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		err := resumable(targets, &done, func(target string, _ int) bool {
			if target == "ns/vm-3" {
				once.Do(func() { close(blocked) })
				return true
			}
			return false
		}).Handle(ctx, op, ev)
		causeA = context.Cause(ctx)
		return err
	})
	a := e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: handlerA})
	e.publish("die-1", maintenance("node-1", "req-die"))
	<-blocked
	a.nc.Close() // the worker's process dies: no ack, no lease renewal

	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: resumable(targets, &done, nil)})
	key := consumers.MaintenanceOperationKey("node-1", "req-die")
	e.eventually(func() bool { return e.state(key) == consumers.StateSucceeded }, "second worker finishes the operation")
	require.NoError(t, a.stop(t))

	require.ErrorIs(t, causeA, consumers.ErrLeaseLost, "the dead worker's handler must be stopped by the lost lease")
	for _, tgt := range targets[:2] {
		require.Equal(t, 1, done.get(tgt+"@1"), "%s done once by the first worker", tgt)
		require.Zero(t, done.get(tgt+"@2"), "%s must not be redone", tgt)
	}
	attempts := e.op(key).Attempts
	// 2 normally; more only if a starved machine let the survivor's own lease lapse.
	require.GreaterOrEqual(t, attempts, 2)
	for _, tgt := range targets[2:] {
		n := 0
		for a := 2; a <= attempts; a++ {
			n += done.get(tgt + "@" + strconv.Itoa(a))
		}
		require.Equal(t, 1, n, "%s done exactly once after the takeover", tgt)
	}
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "message acked")
}

// 3. The same event published twice (same id) inside the window: one message.
func TestDuplicateEventIsStoredOnce(t *testing.T) {
	e := newEnv(t)
	first := e.publish("dup-1", maintenance("node-1", "req-dup"))
	second := e.publish("dup-1", maintenance("node-1", "req-dup"))
	require.False(t, first.Duplicate)
	require.True(t, second.Duplicate, "JetStream must report the second publish as a duplicate")
	require.Equal(t, first.MsgID, second.MsgID)
	require.Equal(t, uint64(1), e.streamMsgs(consumers.StreamRequests))

	// A different id for the same request is a different message...
	third := e.publish("dup-2", maintenance("node-1", "req-dup"))
	require.False(t, third.Duplicate)
	require.Equal(t, uint64(2), e.streamMsgs(consumers.StreamRequests))
	// ...but the same operation: the handler runs once, the second message is skipped.
	var calls recorder
	e.start(testConfig(), consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			calls.add(op.Key())
			return nil
		})})
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "both messages acked")
	require.Equal(t, 1, calls.get(consumers.MaintenanceOperationKey("node-1", "req-dup")))
}

// rawMsg publishes bytes straight to a subject, bypassing every check.
func rawMsg(t *testing.T, js jetstream.JetStream, subject string, hdr nats.Header, data []byte) {
	t.Helper()
	_, err := js.PublishMsg(context.Background(), &nats.Msg{Subject: subject, Header: hdr, Data: data})
	require.NoError(t, err)
}

// 4. A poison message (not a CloudEvent; unknown type; schema violation) is
// dead-lettered with a reason; the consumer keeps serving the next message.
func TestPoisonMessagesAreDeadLettered(t *testing.T) {
	e := newEnv(t)
	subject, err := schemas.RequestSubject(schemas.KindMaintenanceRequested, "node-1")
	require.NoError(t, err)
	ceHeaders := func(typ string) nats.Header {
		return nats.Header{"ce-specversion": {"1.0"}, "ce-id": {"x-" + typ}, "ce-source": {"test"},
			"ce-type": {typ}, "Content-Type": {"application/json"}}
	}
	poison := []struct {
		name   string
		hdr    nats.Header
		data   string
		reason string
	}{
		{"not a CloudEvent", nil, "hello, world", "not a valid CloudEvent"},
		{"unknown type", ceHeaders("io.drover.bogus.v1"), `{"node":"node-1"}`, "io.drover.bogus.v1"},
		{"schema violation", ceHeaders(schemas.TypeMaintenanceRequested), `{"node":"node-1","reason":"r","requestedBy":"me","mode":"LiveMigrate"}`, "requestID"},
		{"wrong subject for type", ceHeaders(schemas.TypeMaintenanceEnded), `{"node":"node-1","requestID":"r"}`, "does not belong"},
	}
	for _, p := range poison {
		rawMsg(t, e.js, subject, p.hdr, []byte(p.data))
	}
	var calls recorder
	e.start(testConfig(), consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			calls.add(ev.CloudEvent.ID())
			return nil
		})})
	e.publish("good-1", maintenance("node-1", "req-good"))
	e.eventually(func() bool { return calls.get("good-1") == 1 }, "the valid event after the poison is handled")
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "nothing left in the work queue")

	dls, err := consumers.ListDeadLetters(context.Background(), e.js, 0)
	require.NoError(t, err)
	require.Len(t, dls, len(poison))
	for i, p := range poison {
		t.Run(p.name, func(t *testing.T) {
			require.Contains(t, dls[i].Reason, p.reason)
			require.Equal(t, subject, dls[i].Subject)
			require.Equal(t, uint64(1), dls[i].Deliveries, "poison is dead-lettered on its first delivery, not retried")
			require.Equal(t, p.data, string(dls[i].Data), "the original body is kept")
			for k := range p.hdr {
				require.Equal(t, p.hdr.Get(k), dls[i].Header.Get(k), "original header %s is kept", k)
			}
		})
	}
}

// 5. Two workers, two events for the same node: never concurrently inside the
// handler; lease expiry after a worker dies lets the other proceed.
func TestLeaseSerializesANode(t *testing.T) {
	t.Run("never concurrent", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig()
		var mu sync.Mutex
		inside, maxInside := 0, 0
		var calls recorder
		h := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			mu.Lock()
			inside++
			maxInside = max(maxInside, inside)
			mu.Unlock()
			defer func() { mu.Lock(); inside--; mu.Unlock() }()
			calls.add("call")
			select { // hold the node across heartbeats, as a real evacuation does
			case <-time.After(2 * cfg.AckWait):
			case <-ctx.Done():
				return ctx.Err()
			}
			return nil
		})
		e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Concurrency: 2, Handler: h})
		e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Concurrency: 2, Handler: h})
		e.publish("a", maintenance("node-1", "req-a"))
		e.publish("b", maintenance("node-1", "req-b"))
		e.publish("c", maintenance("node-2", "req-c"))
		e.eventually(func() bool { return calls.get("call") == 3 && e.streamMsgs(consumers.StreamRequests) == 0 }, "all three handled")
		// node-2 may run beside node-1, so at most 2; the per-node check is the next line.
		require.LessOrEqual(t, maxInside, 2)
		a, b := e.op(consumers.MaintenanceOperationKey("node-1", "req-a")), e.op(consumers.MaintenanceOperationKey("node-1", "req-b"))
		first, second := a, b
		if b.Started.Before(a.Started) {
			first, second = b, a
		}
		require.False(t, second.Started.Before(first.Finished),
			"the second operation on node-1 started (%s) before the first finished (%s)", second.Started, first.Finished)
	})
	t.Run("expiry after death", func(t *testing.T) {
		e := newEnv(t)
		cfg := testConfig()
		started := make(chan string, 4)
		h := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			started <- ev.CloudEvent.ID()
			if ev.CloudEvent.ID() == "first" && ev.Delivery == 1 {
				<-ctx.Done() // stuck until the worker dies
				return ctx.Err()
			}
			return nil
		})
		a := e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: h})
		e.publish("first", maintenance("node-1", "req-1"))
		require.Equal(t, "first", <-started)
		e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: h})
		e.publish("second", maintenance("node-1", "req-2"))
		select {
		case id := <-started:
			t.Fatalf("%s started while the first worker holds node-1", id)
		case <-time.After(3 * cfg.AckWait):
		}
		a.nc.Close()
		e.eventually(func() bool {
			return e.state(consumers.MaintenanceOperationKey("node-1", "req-2")) == consumers.StateSucceeded &&
				e.state(consumers.MaintenanceOperationKey("node-1", "req-1")) == consumers.StateSucceeded
		}, "the survivor takes the node once the dead worker's lease expires")
	})
}

// 6. Shutdown with a handler in flight: after restart the operation
// completes; nothing lost, nothing done twice.
func TestShutdownLeavesWorkForRestart(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	targets := []string{"ns/a", "ns/b", "ns/c"}
	var done recorder
	inFlight := make(chan struct{})
	var once sync.Once
	a := e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: resumable(targets, &done,
		func(target string, attempt int) bool {
			if target == "ns/b" && attempt == 1 {
				once.Do(func() { close(inFlight) })
				return true
			}
			return false
		})})
	e.publish("shutdown-1", maintenance("node-1", "req-s"))
	<-inFlight
	require.NoError(t, a.stop(t), "shutdown must finish within the grace and report no stuck handler")
	key := consumers.MaintenanceOperationKey("node-1", "req-s")
	require.Equal(t, consumers.StatePending, e.op(key).State, "interrupted operation is pending, not lost")
	require.Equal(t, uint64(1), e.streamMsgs(consumers.StreamRequests), "message stays in the queue")

	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: resumable(targets, &done, nil)})
	e.eventually(func() bool { return e.state(key) == consumers.StateSucceeded }, "restarted runtime completes")
	require.Equal(t, 1, done.get("ns/a@1"))
	require.Zero(t, done.get("ns/a@2"), "work done before the shutdown is not repeated")
	require.Equal(t, 1, done.get("ns/b@2"))
	require.Equal(t, 1, done.get("ns/c@2"))
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "message acked")
}

// 7. Transient errors are retried with backoff, then succeed; an operation
// whose attempts are spent, or that failed terminally, is dead-lettered.
func TestRetriesBackoffAndDeadLetters(t *testing.T) {
	cfg := testConfig()
	cfg.MaxAttempts = 3
	tests := []struct {
		name       string
		failures   int  // deliveries that fail before success
		terminal   bool // fail with a terminal error
		wantState  consumers.State
		wantDLQ    string // reason substring; "" for none
		deliveries int
	}{
		{name: "transient then success", failures: 2, wantState: consumers.StateSucceeded, deliveries: 3},
		{name: "attempts exhausted", failures: 100, wantState: consumers.StateFailed, wantDLQ: "handler attempts exhausted (3 of 3)", deliveries: 3},
		{name: "terminal", failures: 100, terminal: true, wantState: consumers.StateFailed, wantDLQ: "target gone", deliveries: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			var mu sync.Mutex
			var at []time.Time
			e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
				func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
					mu.Lock()
					at = append(at, time.Now())
					mu.Unlock()
					if int(ev.Delivery) > tt.failures {
						return nil
					}
					if tt.terminal {
						return consumers.Terminal(errors.New("target gone"))
					}
					return fmt.Errorf("apiserver unavailable (delivery %d)", ev.Delivery)
				})})
			e.publish("retry-1", maintenance("node-1", "req-r"))
			key := consumers.MaintenanceOperationKey("node-1", "req-r")
			e.eventually(func() bool { return e.state(key) == tt.wantState }, "operation reaches %s", tt.wantState)
			e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "message settled")

			mu.Lock()
			require.Len(t, at, tt.deliveries)
			for i := 1; i < len(at); i++ {
				require.GreaterOrEqual(t, at[i].Sub(at[i-1]), cfg.BackoffBase<<(i-1),
					"retry %d came before its backoff", i)
			}
			mu.Unlock()
			dls, err := consumers.ListDeadLetters(context.Background(), e.js, 0)
			require.NoError(t, err)
			if tt.wantDLQ == "" {
				require.Empty(t, dls)
				return
			}
			require.Len(t, dls, 1)
			require.Contains(t, dls[0].Reason, tt.wantDLQ)
			require.Equal(t, uint64(tt.deliveries), dls[0].Deliveries)
			require.Contains(t, e.op(key).LastError, tt.wantDLQ)
		})
	}
}

// maintenance.ended cancels the running maintenance: its handler sees
// Cancelled, stops, and the ended handler runs after it on the same node.
func TestCancelSignalsTheRunningHandler(t *testing.T) {
	e := newEnv(t)
	var order recorder
	running := make(chan struct{})
	e.start(testConfig(), consumers.Workflow{Name: schemas.WorkflowMaintenance, Concurrency: 2, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			switch ev.Payload.(type) {
			case *schemas.MaintenanceRequested:
				close(running)
				select {
				case <-op.Cancelled():
					order.add("requested-cancelled")
					return nil
				case <-ctx.Done():
					return ctx.Err()
				}
			case *schemas.MaintenanceEnded:
				order.add("ended")
			}
			return nil
		})})
	e.publish("start", maintenance("node-1", "req-c"))
	<-running
	e.publish("end", &schemas.MaintenanceEnded{Node: "node-1", RequestID: "req-c"})
	e.eventually(func() bool { return order.get("ended") == 1 }, "ended handler runs")
	require.Equal(t, []string{"requested-cancelled", "ended"}, order.order)
	require.Equal(t, consumers.StateCancelled, e.op(consumers.MaintenanceOperationKey("node-1", "req-c")).State)

	// An ended that arrives before its request: the request is skipped.
	e.publish("end-early", &schemas.MaintenanceEnded{Node: "node-2", RequestID: "req-late"})
	e.eventually(func() bool { return order.get("ended") == 2 }, "second ended handled")
	e.publish("start-late", maintenance("node-2", "req-late"))
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "late request settled")
	require.Equal(t, 1, order.get("requested-cancelled"), "a request cancelled before it started never runs")
	late := e.op(consumers.MaintenanceOperationKey("node-2", "req-late"))
	require.Equal(t, consumers.StateCancelled, late.State)
	require.Equal(t, schemas.WorkflowMaintenance, late.Workflow, "a record made by an early cancel says whose it is")
	require.Equal(t, "node-2", late.Target)
}

// Shutdown is bounded even when NATS went away under a settling message:
// settling is cut short after the grace (the message is redelivered to
// another replica), not waited for until every call times out.
func TestShutdownIsBoundedWhenNATSIsGone(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	release := make(chan struct{})
	running := make(chan struct{})
	nc, err := nats.Connect(e.srv.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	rt, err := consumers.NewRuntime(nc, cfg, zerolog.New(zerolog.NewTestWriter(t)), nil, consumers.Workflow{Name: schemas.WorkflowMaintenance,
		Handler: consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			close(running)
			<-release
			return nil
		})})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rt.Start(ctx) }()
	e.publish("m-1", maintenance("node-1", "req-1"))
	<-running
	e.srv.Shutdown() // NATS goes away; the client keeps trying to reconnect
	close(release)   // the handler finishes: its success cannot be recorded or acked
	cancel()
	select {
	case err := <-done:
		require.NoError(t, err, "shutdown gives up settling instead of reporting stuck handlers")
	case <-time.After(4*cfg.ShutdownGrace + 5*time.Second):
		t.Fatal("shutdown not bounded by the grace")
	}
}
