package consumers_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/schemas"
)

// TestMetricsFollowOperations: the runtime's metrics move as operations
// run: gate waits by the gate the handler names (a plain Wait is "other"),
// the reconciler's count of operations by checkpoint phase and its oldest
// unfinished operation, and operations finished by state, a dead-lettered
// one as failed.
func TestMetricsFollowOperations(t *testing.T) {
	e := newEnv(t)
	m := consumers.NewMetrics(prometheus.NewRegistry())
	var fenced, plainWaits atomic.Int32
	recov := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		if fenced.Load() == 0 {
			if err := op.Checkpoint(ctx, "gate", "waiting for node-1 to be fenced", nil); err != nil {
				return err
			}
			return consumers.WaitFor(50*time.Millisecond, "fencing", "waiting for node-1 to be fenced")
		}
		if plainWaits.Add(1) == 1 {
			return consumers.Wait(20*time.Millisecond, "one more look")
		}
		return op.Checkpoint(ctx, "done", "recovered", nil)
	})
	maint := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		return consumers.Terminalf("node-2 has no spare capacity")
	})
	nc := natstest.Connect(t, e.srv.URL(), nats.MaxReconnects(0))
	rt, err := consumers.NewRuntime(nc, testConfig(), zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel), m,
		consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: maint},
		consumers.Workflow{Name: schemas.WorkflowRecovery, Handler: recov})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rt.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			t.Errorf("runtime did not stop within 15s")
		}
	})

	nr := notReady("node-1", time.Now())
	e.publish("nr-1", nr)
	key := routeKey(t, nr, "nr-1")
	gauge := func(v *prometheus.GaugeVec, labels ...string) float64 {
		return testutil.ToFloat64(v.WithLabelValues(labels...))
	}
	counter := func(v *prometheus.CounterVec, labels ...string) float64 {
		return testutil.ToFloat64(v.WithLabelValues(labels...))
	}
	e.eventually(func() bool {
		return counter(m.GateWaits, schemas.WorkflowRecovery, "fencing") >= 2 &&
			gauge(m.InPhase, schemas.WorkflowRecovery, "gate") == 1 &&
			gauge(m.OldestOperation, schemas.WorkflowRecovery, string(consumers.StateWaiting)) > 0
	}, "the recovery waits at its gate: counted by gate and by phase")
	require.Zero(t, counter(m.Finished, schemas.WorkflowRecovery, string(consumers.StateSucceeded)))

	fenced.Store(1)
	e.eventually(func() bool { return e.state(key) == consumers.StateSucceeded }, "the recovery finishes")
	e.eventually(func() bool {
		return counter(m.Finished, schemas.WorkflowRecovery, string(consumers.StateSucceeded)) == 1 &&
			gauge(m.InPhase, schemas.WorkflowRecovery, "gate") == 0
	}, "the recovery counted finished, no longer at its gate")
	require.Equal(t, 1.0, counter(m.GateWaits, schemas.WorkflowRecovery, consumers.GateOther), "a plain Wait is counted as other")

	e.publish("m-1", maintenance("node-2", "req-1"))
	e.eventually(func() bool {
		return e.state(consumers.MaintenanceOperationKey("node-2", "req-1")) == consumers.StateFailed
	}, "the maintenance fails")
	e.eventually(func() bool {
		return counter(m.Finished, schemas.WorkflowMaintenance, string(consumers.StateFailed)) == 1
	}, "the dead-lettered maintenance counted failed")
	require.Equal(t, 1.0, counter(m.DeadLetters, schemas.WorkflowMaintenance, "terminal"))
	require.Zero(t, counter(m.Finished, schemas.WorkflowMaintenance, string(consumers.StateSucceeded)))
}

// TestAlertedCountersStartAtZero: the counters alerts take increase() of
// exist at 0 for every registered workflow as soon as the runtime is built.
// A series born at 1 has no increase, so the first dead letter of a replica's
// life would never fire DroverDeadLetters.
func TestAlertedCountersStartAtZero(t *testing.T) {
	e := newEnv(t)
	reg := prometheus.NewRegistry()
	m := consumers.NewMetrics(reg)
	h := consumers.HandlerFunc(func(context.Context, *consumers.Operation, consumers.Event) error { return nil })
	_, err := consumers.NewRuntime(natstest.Connect(t, e.srv.URL()), testConfig(), zerolog.Nop(), m,
		consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: h}, consumers.Workflow{Name: schemas.WorkflowRecovery, Handler: h})
	require.NoError(t, err)
	n, err := testutil.GatherAndCount(reg, "drover_dead_letters_total")
	require.NoError(t, err)
	require.Equal(t, 8, n, "a series per workflow and cause")
	for _, wf := range []string{schemas.WorkflowMaintenance, schemas.WorkflowRecovery} {
		for _, cause := range []string{"invalid", "terminal", "budget", "orphan"} {
			require.Zero(t, testutil.ToFloat64(m.DeadLetters.WithLabelValues(wf, cause)))
		}
		for _, state := range []string{"succeeded", "failed", "cancelled"} {
			require.Zero(t, testutil.ToFloat64(m.Finished.WithLabelValues(wf, state)))
		}
	}
	n, err = testutil.GatherAndCount(reg, "drover_operations_finished_total")
	require.NoError(t, err)
	require.Equal(t, 6, n, "a series per workflow and final state")
}

// TestCancelledBeforeItRanIsCounted: an operation cancelled before it ever
// ran (here: the end of a maintenance arrives before its request) is final
// at once, and counted cancelled; its late request then runs nothing and is
// not counted again.
func TestCancelledBeforeItRanIsCounted(t *testing.T) {
	e := newEnv(t)
	m := consumers.NewMetrics(prometheus.NewRegistry())
	h := consumers.HandlerFunc(func(context.Context, *consumers.Operation, consumers.Event) error { return nil })
	rt, err := consumers.NewRuntime(natstest.Connect(t, e.srv.URL()), testConfig(), zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel), m,
		consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: h})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rt.Start(ctx) }()
	t.Cleanup(func() { cancel(); <-done })

	cancelled := func() float64 {
		return testutil.ToFloat64(m.Finished.WithLabelValues(schemas.WorkflowMaintenance, string(consumers.StateCancelled)))
	}
	e.publish("end-early", &schemas.MaintenanceEnded{Node: "node-2", RequestID: "req-late"})
	e.eventually(func() bool { return cancelled() == 1 }, "the operation cancelled before it ran is counted")
	e.publish("start-late", maintenance("node-2", "req-late"))
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "late request settled")
	require.Equal(t, consumers.StateCancelled, e.state(consumers.MaintenanceOperationKey("node-2", "req-late")))
	require.Equal(t, 1.0, cancelled(), "counted once")
}
