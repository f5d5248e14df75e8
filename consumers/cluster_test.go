package consumers_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/schemas"
)

// A three-node JetStream cluster with R3 streams and buckets: the server
// that leads the request stream dies while a handler runs; the operation
// completes, the message is acknowledged once, and nothing is lost.
func TestClusterFailoverMidHandler(t *testing.T) {
	c := natstest.StartCluster(t)
	cfg := testConfig()
	cfg.Replicas = 3
	// Leave room for an election (a few seconds) inside the ack wait.
	cfg.AckWait = 6 * time.Second
	cfg.OrphanAfter = 0 // derived from the longer ack wait
	cfg.LeaseTTL = 6 * time.Second
	cfg.Reconfigure = true

	nc := natstest.Connect(t, c.URLs(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	var calls recorder
	release := make(chan struct{})
	started := make(chan struct{})
	var once sync.Once
	rt, err := consumers.NewRuntime(nc, cfg, zerolog.New(zerolog.NewTestWriter(t)), consumers.NewMetrics(prometheus.NewRegistry()),
		consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
			func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
				calls.add(ev.CloudEvent.ID())
				once.Do(func() { close(started) })
				select {
				case <-release:
				case <-ctx.Done():
					return ctx.Err()
				}
				return op.Progress(ctx, "ns/vm-1", consumers.TargetProgress{Phase: "done"})
			})})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- rt.Start(ctx) }()
	defer func() { cancel(); <-done }()
	require.Eventually(t, func() bool {
		_, err := js.Consumer(ctx, consumers.StreamRequests, schemas.WorkflowMaintenance)
		return err == nil
	}, 30*time.Second, 50*time.Millisecond)
	s, err := js.Stream(ctx, consumers.StreamRequests)
	require.NoError(t, err)
	info, err := s.Info(ctx)
	require.NoError(t, err)
	require.Len(t, info.Cluster.Replicas, 2, "the request stream is replicated to the two other servers")

	ev, err := schemas.New("test", "failover-1", maintenance("node-1", "req-f"))
	require.NoError(t, err)
	m, err := schemas.ToMsg("drover.req.maintenance-requested.node-1", ev)
	require.NoError(t, err)
	_, err = js.PublishMsg(ctx, m)
	require.NoError(t, err)
	<-started

	leader := info.Cluster.Leader
	for _, srv := range c.Servers {
		if srv.Name() == leader {
			srv.Shutdown()
		}
	}
	close(release)

	key := consumers.MaintenanceOperationKey("node-1", "req-f")
	require.Eventually(t, func() bool {
		kv, err := js.KeyValue(ctx, consumers.BucketOps)
		if err != nil {
			return false
		}
		rec, _, _, err := consumers.NewOpStore(kv).Get(ctx, key)
		return err == nil && rec.State == consumers.StateSucceeded
	}, 60*time.Second, 100*time.Millisecond, "the operation completes after the stream leader died")
	pkv, err := js.KeyValue(ctx, consumers.BucketProgress)
	require.NoError(t, err)
	progress, err := consumers.ReadProgress(ctx, pkv, key)
	require.NoError(t, err)
	require.Equal(t, "done", progress["ns/vm-1"].Phase)
	require.Eventually(t, func() bool {
		info, err := s.Info(ctx)
		return err == nil && info.State.Msgs == 0 && info.Cluster.Leader != "" && info.Cluster.Leader != leader
	}, 60*time.Second, 100*time.Millisecond, "a new leader holds the stream and the message is acknowledged")
	// Usually once; a write refused during the election is retried, which
	// is the at-least-once contract idempotent handlers are written for.
	n := calls.get("failover-1")
	require.GreaterOrEqual(t, n, 1)
	require.LessOrEqual(t, n, 5, "retries stay bounded")
	t.Logf("handler ran %d time(s) across the failover", n)
}

// Every worker that takes a message dies (a crash loop): deliveries are
// unlimited, but each run uses the operation's budget, so the next delivery
// after the budget is spent dead-letters the message instead of running the
// handler yet again, and nothing stays in the work queue forever.
func TestCrashLoopEndsInTheDeadLetterQueue(t *testing.T) {
	e := newEnv(t)
	cfg := testConfig()
	cfg.MaxAttempts = 2

	hung := make(chan struct{}, 2)
	stuck := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		hung <- struct{}{}
		<-ctx.Done()
		return ctx.Err()
	})
	e.publish("doomed", maintenance("node-1", "req-doomed"))
	for i := 0; i < cfg.MaxAttempts; i++ {
		r := e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: stuck})
		<-hung
		r.nc.Close() // the worker dies mid-handler
	}
	var survivorCalls recorder
	e.start(cfg, consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: consumers.HandlerFunc(
		func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
			survivorCalls.add(ev.CloudEvent.ID())
			return nil
		})})
	e.eventually(func() bool {
		dls, err := consumers.ListDeadLetters(context.Background(), e.js, 0)
		return err == nil && len(dls) == 1
	}, "the crash-looping message is dead-lettered")
	dls, err := consumers.ListDeadLetters(context.Background(), e.js, 0)
	require.NoError(t, err)
	require.Contains(t, dls[0].Reason, "handler attempts exhausted (2 of 2)")
	key := consumers.MaintenanceOperationKey("node-1", "req-doomed")
	require.Equal(t, key, dls[0].Operation)
	require.Equal(t, schemas.WorkflowMaintenance, dls[0].Workflow)
	require.Equal(t, "node-1", dls[0].Target)
	e.eventually(func() bool { return e.streamMsgs(consumers.StreamRequests) == 0 }, "and removed from the work queue")
	require.Zero(t, survivorCalls.get("doomed"), "an operation out of attempts is not run again")
	require.Equal(t, consumers.StateFailed, e.op(key).State)
}
