package consumers_test

// The handler contract for long workflows: cooperative pre-emption with a
// checkpoint, waiting outcomes, fencing, replays that really re-run, cancel
// rules, node state, keys that make one incident or request one operation.

import (
	"bytes"
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/schemas"
)

// statuses decodes every status event of one workflow and target.
func (e *env) statuses(workflow, target string) []*schemas.Status {
	e.t.Helper()
	subject, err := schemas.StatusSubject(workflow, target)
	require.NoError(e.t, err)
	var out []*schemas.Status
	for _, m := range statusMsgs(e.t, e.js, subject) {
		ce, err := schemas.FromHeaders(m.Headers(), m.Data())
		require.NoError(e.t, err)
		p, err := schemas.Decode(ce)
		require.NoError(e.t, err, "status events are valid")
		out = append(out, p.(*schemas.Status))
	}
	return out
}

func phases(sts []*schemas.Status, op string) []string {
	var out []string
	for _, s := range sts {
		if s.Operation == op {
			out = append(out, s.Phase)
		}
	}
	return out
}

type maintenanceData struct {
	Step int `json:"step"`
}

// A maintenance that watches Preempted checkpoints and yields at once; it
// resumes from its checkpoint after the recovery, and the yield costs it no
// attempt.
func TestCooperativeYieldResumesFromCheckpoint(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	cfg.YieldGrace = time.Minute // a cooperative handler never needs it
	var yieldedCleanly atomic.Bool
	var resumedStep atomic.Int32
	var resumedDone atomic.Bool
	holding := make(chan struct{}, 1)
	maint := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		if op.Attempt() == 1 {
			if err := op.Progress(ctx, "ns/vm-a", consumers.TargetProgress{Phase: "Running", Node: "node-2"}); err != nil {
				return err
			}
			if err := op.Checkpoint(ctx, "migrating", "1 of 2 VMs moved", maintenanceData{Step: 1}); err != nil {
				return err
			}
			holding <- struct{}{}
			select {
			case <-op.Preempted():
				yieldedCleanly.Store(ctx.Err() == nil)
				return consumers.Yield("checkpointed after " + op.PreemptedBy().By)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		var d maintenanceData
		if ok, err := op.Data(&d); err != nil || !ok {
			return errors.New("resumed without the checkpoint")
		}
		resumedStep.Store(int32(d.Step))
		resumedDone.Store(op.Done("ns/vm-a", "Running"))
		return nil
	})
	var recoveries atomic.Int32
	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: maint},
		consumers.Workflow{Name: schemas.WorkflowRecovery, Handler: consumers.HandlerFunc(
			func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
				recoveries.Add(1)
				return nil
			})})
	e.publish("m-1", maintenance("node-1", "req-1"))
	<-holding
	nr := notReady("node-1", time.Now())
	e.publish("nr-1", nr)
	mKey := consumers.MaintenanceOperationKey("node-1", "req-1")
	e.eventually(func() bool { return e.state(mKey) == consumers.StateSucceeded }, "maintenance resumes and finishes")

	require.True(t, yieldedCleanly.Load(), "the handler yielded on Preempted, before any cancellation")
	require.Equal(t, int32(1), resumedStep.Load(), "the resumed attempt read the checkpoint")
	require.True(t, resumedDone.Load(), "the resumed attempt saw the progress of the first")
	require.Equal(t, int32(1), recoveries.Load())
	rec := e.op(mKey)
	require.Equal(t, 2, rec.Attempts)
	require.Equal(t, 1, rec.Charged, "a yield costs no attempt")
	e.eventually(func() bool {
		return strings.Contains(strings.Join(phases(e.statuses(schemas.WorkflowMaintenance, "node-1"), mKey), ","), schemas.PhaseSuspended)
	}, "a Suspended status was published")
	recRec := e.op(routeKey(t, nr, "nr-1"))
	require.Equal(t, consumers.StateSucceeded, recRec.State)
}

// Wait outcomes cost no attempt, and keep the node reserved: a maintenance
// of the node does not slip in between two checks of a waiting recovery.
func TestWaitKeepsTheNodeAndCostsNoBudget(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	cfg.MaxAttempts = 2
	var mu sync.Mutex
	var order []string
	checks := 0
	fenced := make(chan struct{})
	recov := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		mu.Lock()
		checks++
		n := checks
		mu.Unlock()
		if n == 2 {
			close(fenced) // the maintenance is published while the recovery waits
		}
		if n < 5 {
			return consumers.Wait(100*time.Millisecond, "waiting for node-1 to be fenced")
		}
		mu.Lock()
		order = append(order, "recovery-done")
		mu.Unlock()
		return nil
	})
	maint := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		mu.Lock()
		order = append(order, "maintenance")
		mu.Unlock()
		return nil
	})
	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: maint},
		consumers.Workflow{Name: schemas.WorkflowRecovery, Handler: recov})
	nr := notReady("node-1", time.Now())
	e.publish("nr-1", nr)
	<-fenced
	e.publish("m-1", maintenance("node-1", "req-1"))
	key := routeKey(t, nr, "nr-1")
	e.eventually(func() bool {
		return e.state(key) == consumers.StateSucceeded &&
			e.state(consumers.MaintenanceOperationKey("node-1", "req-1")) == consumers.StateSucceeded
	}, "recovery then maintenance finish")
	mu.Lock()
	require.Equal(t, []string{"recovery-done", "maintenance"}, order, "the maintenance ran between two checks of the waiting recovery")
	mu.Unlock()
	rec := e.op(key)
	require.Equal(t, 5, rec.Attempts)
	require.Equal(t, 1, rec.Charged, "waiting used none of the 2 attempts")
	require.Contains(t, phases(e.statuses(schemas.WorkflowRecovery, "node-1"), key), schemas.PhaseWaiting)
}

// `drover dlq replay` and `drover op retry` start a new generation that
// really runs again, after a failure and after a success.
func TestReplayAndRetryRunAgain(t *testing.T) {
	e := newEnv(t)
	var runs recorder
	var fixed atomic.Bool
	e.start(testConfig(), consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			runs.add(op.Key())
			if !fixed.Load() {
				return consumers.Terminalf("node-1 has no spare capacity")
			}
			return nil
		})})
	e.publish("m-1", maintenance("node-1", "req-1"))
	key := consumers.MaintenanceOperationKey("node-1", "req-1")
	e.eventually(func() bool { return e.state(key) == consumers.StateFailed }, "first run fails terminally")
	dls, err := consumers.ListDeadLetters(context.Background(), e.js, 0)
	require.NoError(t, err)
	require.Len(t, dls, 1)
	require.Equal(t, key, dls[0].Operation)

	// The same request re-sent under a new event id is the same, finished operation.
	e.publish("m-1-again", maintenance("node-1", "req-1"))
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "re-sent request settled")
	require.Equal(t, 1, runs.get(key), "a re-sent request does not run a finished operation")

	fixed.Store(true)
	res, _, err := consumers.ReplayDeadLetter(context.Background(), e.js, dls[0].Seq)
	require.NoError(t, err)
	require.Equal(t, key, res.Operation)
	require.Equal(t, 2, res.Generation)
	e.eventually(func() bool { return e.state(key) == consumers.StateSucceeded }, "the replay runs the operation again")
	require.Equal(t, 2, runs.get(key))
	dls, err = consumers.ListDeadLetters(context.Background(), e.js, 0)
	require.NoError(t, err)
	require.Empty(t, dls)

	res, err = consumers.RetryOperation(context.Background(), e.js, key)
	require.NoError(t, err)
	require.Equal(t, 3, res.Generation)
	e.eventually(func() bool { return runs.get(key) == 3 && e.state(key) == consumers.StateSucceeded }, "op retry runs it once more")
	rec := e.op(key)
	require.Equal(t, 3, rec.Generation)
	require.Equal(t, 1, rec.Attempts, "a new generation starts counting attempts again")
}

// node.ready cancels a recovery that waits at its fencing gate, but not one
// that passed it.
func TestNodeReadyCancelsRecoveryOnlyBeforeItsGate(t *testing.T) {
	for _, passed := range []bool{false, true} {
		name := "before the gate"
		if passed {
			name = "past the gate"
		}
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			atGate := make(chan struct{}, 1)
			release := make(chan struct{})
			recov := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
				if _, ok := ev.Payload.(*schemas.NodeReady); ok {
					return nil
				}
				select {
				case <-op.Cancelled():
					return nil // nothing was done yet: stop
				default:
				}
				if passed {
					if err := op.Uncancellable(ctx, "fencing gate passed: node-1's pods are being deleted"); err != nil {
						return err
					}
					select {
					case atGate <- struct{}{}:
					default:
					}
					<-release
					return nil
				}
				select {
				case atGate <- struct{}{}:
				default:
				}
				return consumers.Wait(100*time.Millisecond, "waiting for node-1 to be fenced")
			})
			e.start(testConfig(), consumers.Workflow{Name: schemas.WorkflowRecovery, Concurrency: 2, Handler: recov})
			nr := notReady("node-1", time.Now())
			e.publish("nr-1", nr)
			<-atGate
			e.publish("ready-1", &schemas.NodeReady{Node: "node-1", Since: time.Now()})
			key := routeKey(t, nr, "nr-1")
			if passed {
				e.eventually(func() bool {
					return len(e.statuses(schemas.WorkflowRecovery, "node-1")) > 0
				}, "statuses published")
				close(release)
				e.eventually(func() bool { return e.state(key) == consumers.StateSucceeded }, "the recovery past its gate finishes")
				require.False(t, e.op(key).CancelRequested)
				return
			}
			close(release)
			e.eventually(func() bool { return e.state(key) == consumers.StateCancelled }, "the waiting recovery is cancelled")
		})
	}
}

// Node state is written only by the holder of the node's lease and read by everyone.
func TestNodeStateBelongsToTheLeaseHolder(t *testing.T) {
	e := newEnv(t)
	var errOther error
	e.start(testConfig(), consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			if _, err := op.UpdateNodeState(ctx, "node-1", func(st *consumers.NodeState) error {
				st.Maintenance, st.CordonedByDrover = op.Key(), true
				st.Taints = append(st.Taints, consumers.Taint{Key: "drover.io/maintenance", Value: "req-1", Effect: "NoSchedule"})
				return nil
			}); err != nil {
				return err
			}
			_, errOther = op.UpdateNodeState(ctx, "node-2", func(st *consumers.NodeState) error { return nil })
			return nil
		})})
	e.publish("m-1", maintenance("node-1", "req-1"))
	key := consumers.MaintenanceOperationKey("node-1", "req-1")
	e.eventually(func() bool { return e.state(key) == consumers.StateSucceeded }, "done")
	require.ErrorContains(t, errOther, "does not hold node node-2's lease")
	kv, err := e.js.KeyValue(context.Background(), consumers.BucketOps)
	require.NoError(t, err)
	st, _, found, err := consumers.GetNodeState(context.Background(), kv, "node-1")
	require.NoError(t, err)
	require.True(t, found)
	require.Equal(t, key, st.Maintenance)
	require.True(t, st.CordonedByDrover)
	require.Equal(t, key, st.UpdatedBy)
	_, _, found, err = consumers.GetNodeState(context.Background(), kv, "node-2")
	require.NoError(t, err)
	require.False(t, found)
}

// A bot retrying a migration under new event ids but the same request id
// asks for one migration; a resolver names one incident for events with
// different since.
func TestOneRequestOrIncidentIsOneOperation(t *testing.T) {
	e := newEnv(t)
	var runs recorder
	count := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		runs.add(op.Key())
		return nil
	})
	incident := consumers.ResolverFunc(func(ctx context.Context, ev consumers.Event, keys consumers.Keys) (consumers.Keys, error) {
		if _, ok := ev.Payload.(*schemas.NodeNotReady); ok {
			keys.Operation = consumers.RecoveryOperationKey(keys.Target, "uid-1-spell-1700000000") // as the Node shows it
		}
		return keys, nil
	})
	e.start(testConfig(), consumers.Workflow{Name: schemas.WorkflowMigration, Handler: count},
		consumers.Workflow{Name: schemas.WorkflowRecovery, Handler: count, Resolver: incident})
	for _, id := range []string{"bot-try-1", "bot-try-2"} {
		e.publish(id, &schemas.VMMigrateRequested{Namespace: "prod", Name: "db-0", RequestID: "CHG-7"})
	}
	t0 := time.Now()
	e.publish("nodewatch-1", notReady("node-1", t0))
	e.publish("alertmanager-1", notReady("node-1", t0.Add(15*time.Minute))) // KubeNodeNotReady fires after `for: 15m`
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "all settled")
	require.Equal(t, 1, runs.get(consumers.MigrationOperationKey("prod", "db-0", "CHG-7")))
	require.Equal(t, 1, runs.get(consumers.RecoveryOperationKey("node-1", "uid-1-spell-1700000000")))
	require.Len(t, runs.counts, 2)
}

// A handler that runs for several ack waits of the server's consumer is not
// redelivered, although this replica was configured with a longer ack wait:
// it heartbeats against the server's value.
func TestReplicaAdoptsTheServersAckWait(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	cfg.AckWait, cfg.LeaseTTL = 30*time.Second, 30*time.Second
	cfg.OrphanAfter = 0 // derived from the longer ack wait
	done := make(chan struct{})
	var runs atomic.Int32
	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Concurrency: 2, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			runs.Add(1)
			select {
			case <-time.After(4 * testConfig().AckWait): // longer than the server's ack wait
			case <-ctx.Done():
				return ctx.Err()
			}
			close(done)
			return nil
		})})
	e.publish("m-1", maintenance("node-1", "req-1"))
	<-done
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "acked")
	cons, err := e.js.Consumer(context.Background(), consumers.StreamRequests, schemas.WorkflowMaintenance)
	require.NoError(t, err)
	info, err := cons.Info(context.Background())
	require.NoError(t, err)
	require.Equal(t, testConfig().AckWait, info.Config.AckWait, "the server's ack wait was kept")
	require.Zero(t, info.NumRedelivered, "heartbeats kept the message")
	require.Equal(t, int32(1), runs.Load())
}

// A configuration that would let a lease expire before its holder notices
// is refused.
func TestUnsafeLeaseConfigurationIsRefused(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	cfg.CallTimeout = cfg.LeaseTTL / 2 // a renewal and its read-back could outlast the lease
	_, err := consumers.NewRuntime(natstest.Connect(t, e.srv.URL()), cfg, zerolog.Nop(), nil, consumers.Workflow{Name: schemas.WorkflowMaintenance,
		Handler: consumers.HandlerFunc(func(context.Context, *consumers.Operation, consumers.Event) error { return nil })})
	require.ErrorContains(t, err, "lease TTL 1.2s is too short")
}

// A panic is a failed attempt whose one-line reason reaches the record and
// status; its stack goes to the log only.
func TestPanicStackStaysInTheLog(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	cfg.MaxAttempts = 1
	var logs syncBuffer
	e.startWith(e.srv.URL(), zerolog.New(&logs), cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			panic(errors.New("VM db-0 has no status"))
		})})
	e.publish("m-1", maintenance("node-1", "req-1"))
	key := consumers.MaintenanceOperationKey("node-1", "req-1")
	e.eventually(func() bool { return e.state(key) == consumers.StateFailed }, "dead-lettered after its one attempt")
	rec := e.op(key)
	require.Contains(t, rec.LastError, "handler panicked: VM db-0 has no status")
	require.NotContains(t, rec.LastError, "goroutine")
	var final *schemas.Status
	e.eventually(func() bool {
		for _, s := range e.statuses(schemas.WorkflowMaintenance, "node-1") {
			if s.Phase == schemas.PhaseFailed {
				final = s
			}
		}
		return final != nil
	}, "failed status published")
	require.NotContains(t, final.Message, "goroutine")
	require.Contains(t, logs.String(), "goroutine", "the stack is in the log")
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// One subject (one flapping node) cannot fill the request stream for every producer.
func TestPerSubjectLimit(t *testing.T) {
	cfg := testConfig()
	cfg.MaxPerSubject = 3
	e := newEnvWith(t, cfg)
	for i := 0; i < 3; i++ {
		e.publish("flap-"+string(rune('a'+i)), notReady("node-1", time.Now().Add(time.Duration(i)*time.Second)))
	}
	ev, err := schemas.New("test", "flap-d", notReady("node-1", time.Now().Add(time.Hour)))
	require.NoError(t, err)
	_, err = e.pub.Publish(context.Background(), ev)
	require.Error(t, err, "the fourth message on one subject is refused")
	e.publish("other-node", notReady("node-2", time.Now()))
}

// A message keeps the operation a resolver first gave it: when the cluster
// changes while the operation waits (the resolver now names another), the
// redelivery resumes the same operation instead of starting a second one.
func TestRedeliveryKeepsItsResolvedOperation(t *testing.T) {
	e := newEnv(t)
	var calls atomic.Int32
	drifting := consumers.ResolverFunc(func(ctx context.Context, ev consumers.Event, keys consumers.Keys) (consumers.Keys, error) {
		n := calls.Add(1)
		keys.Operation = consumers.RecoveryOperationKey(keys.Target, "spell-"+strconv.Itoa(int(n)))
		return keys, nil
	})
	var runs recorder
	e.start(testConfig(), consumers.Workflow{Name: schemas.WorkflowRecovery, Resolver: drifting, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			if runs.add(op.Key()) == 1 {
				return consumers.Wait(50*time.Millisecond, "waiting for node-1 to be fenced")
			}
			return nil
		})})
	e.publish("nr-1", notReady("node-1", time.Now()))
	first := consumers.RecoveryOperationKey("node-1", "spell-1")
	e.eventually(func() bool { return e.state(first) == consumers.StateSucceeded }, "the waiting operation resumes and finishes")
	require.GreaterOrEqual(t, calls.Load(), int32(2), "the message was resolved again on its redelivery")
	require.Equal(t, 2, runs.get(first))
	require.Len(t, runs.counts, 1, "no second operation was started")
	kv, err := e.js.KeyValue(context.Background(), consumers.BucketOps)
	require.NoError(t, err)
	e.eventually(func() bool {
		keys, err := consumers.BucketKeys(context.Background(), e.js, consumers.BucketOps, "route.>")
		if err != nil {
			return false
		}
		for _, k := range keys {
			if _, err := kv.Get(context.Background(), k); err == nil {
				return false
			}
		}
		return true
	}, "the pin is forgotten once the message is acknowledged")
}
