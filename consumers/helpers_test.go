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
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// testConfig is a runtime configuration scaled down so that several ack
// deadlines fit in a test.
func testConfig() consumers.Config {
	return consumers.Config{
		AckWait:           1200 * time.Millisecond,
		LeaseTTL:          1200 * time.Millisecond,
		MaxAttempts:       5,
		BackoffBase:       50 * time.Millisecond,
		BackoffMax:        400 * time.Millisecond,
		LeaseRetry:        50 * time.Millisecond,
		LeaseRetryMax:     400 * time.Millisecond,
		PreemptRetry:      50 * time.Millisecond,
		YieldGrace:        2 * time.Second,
		FetchWait:         200 * time.Millisecond,
		ShutdownGrace:     500 * time.Millisecond,
		ReconcileInterval: 500 * time.Millisecond,
		OrphanAfter:       3 * time.Second, // a live message is seen again within 1.2+1.2+0.4 s
		StatusInterval:    50 * time.Millisecond,
	}
}

type env struct {
	t   *testing.T
	srv *natstest.Server
	js  jetstream.JetStream
	pub *producers.Publisher
}

func newEnv(t *testing.T) *env { return newEnvWith(t, testConfig()) }

// newEnvWith declares the streams, buckets and consumers with cfg.
func newEnvWith(t *testing.T, cfg consumers.Config) *env {
	srv := natstest.Start(t)
	nc := natstest.Connect(t, srv.URL())
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	_, err = consumers.Setup(context.Background(), js, cfg,
		schemas.WorkflowMaintenance, schemas.WorkflowRecovery, schemas.WorkflowMigration)
	require.NoError(t, err)
	return &env{t: t, srv: srv, js: js, pub: &producers.Publisher{JS: js}}
}

// runtime is one drover process: its own connection and runtime.
type runtime struct {
	nc     *nats.Conn
	rt     *consumers.Runtime
	cancel context.CancelFunc
	done   chan error
}

func (e *env) start(cfg consumers.Config, wfs ...consumers.Workflow) *runtime {
	e.t.Helper()
	return e.startVia(e.srv.URL(), cfg, wfs...)
}

// startVia is start through another URL (a proxy in front of the server).
func (e *env) startVia(url string, cfg consumers.Config, wfs ...consumers.Workflow) *runtime {
	e.t.Helper()
	return e.startWith(url, zerolog.New(zerolog.NewTestWriter(e.t)).Level(zerolog.InfoLevel), cfg, wfs...)
}

// startWith is start with its own logger.
func (e *env) startWith(url string, log zerolog.Logger, cfg consumers.Config, wfs ...consumers.Workflow) *runtime {
	e.t.Helper()
	nc := natstest.Connect(e.t, url, nats.MaxReconnects(0))
	rt, err := consumers.NewRuntime(nc, cfg, log, consumers.NewMetrics(prometheus.NewRegistry()), wfs...)
	require.NoError(e.t, err)
	ctx, cancel := context.WithCancel(context.Background())
	r := &runtime{nc: nc, rt: rt, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- rt.Start(ctx) }()
	e.t.Cleanup(func() { r.stop(e.t) })
	return r
}

// stop asks the runtime to shut down and waits for Start to return.
func (r *runtime) stop(t *testing.T) error {
	r.cancel()
	select {
	case err, ok := <-r.done:
		if ok {
			close(r.done)
		}
		return err
	case <-time.After(15 * time.Second):
		t.Fatalf("runtime did not stop within 15s")
		return nil
	}
}

func (e *env) publish(id string, p schemas.Payload) producers.Result {
	e.t.Helper()
	ev, err := schemas.New("test/"+e.t.Name(), id, p)
	require.NoError(e.t, err)
	res, err := e.pub.Publish(context.Background(), ev)
	require.NoError(e.t, err)
	return res
}

func (e *env) streamMsgs(name string) uint64 {
	e.t.Helper()
	s, err := e.js.Stream(context.Background(), name)
	require.NoError(e.t, err)
	info, err := s.Info(context.Background())
	require.NoError(e.t, err)
	return info.State.Msgs
}

func (e *env) op(key string) consumers.Record {
	e.t.Helper()
	kv, err := e.js.KeyValue(context.Background(), consumers.BucketOps)
	require.NoError(e.t, err)
	rec, _, found, err := consumers.NewOpStore(kv).Get(context.Background(), key)
	require.NoError(e.t, err)
	require.True(e.t, found, "operation %s has no record", key)
	return rec
}

// progress is every target's progress of an operation.
func (e *env) progress(key string) map[string]consumers.TargetProgress {
	e.t.Helper()
	kv, err := e.js.KeyValue(context.Background(), consumers.BucketProgress)
	require.NoError(e.t, err)
	p, err := consumers.ReadProgress(context.Background(), kv, key)
	require.NoError(e.t, err)
	return p
}

// state is the operation's state, "" while it has no record (safe inside Eventually).
func (e *env) state(key string) consumers.State {
	kv, err := e.js.KeyValue(context.Background(), consumers.BucketOps)
	if err != nil {
		return ""
	}
	rec, _, _, err := consumers.NewOpStore(kv).Get(context.Background(), key)
	if err != nil {
		return ""
	}
	return rec.State
}

func (e *env) eventually(cond func() bool, msg string, args ...any) {
	e.t.Helper()
	if !assert.Eventually(e.t, cond, 30*time.Second, 20*time.Millisecond, append([]any{msg}, args...)...) {
		e.dump()
		e.t.FailNow()
	}
}

// dump logs every operation record and what the request stream holds, to
// explain a condition that never came true.
func (e *env) dump() {
	ctx := context.Background()
	if kv, err := e.js.KeyValue(ctx, consumers.BucketOps); err == nil {
		recs, err := consumers.NewOpStore(kv).List(ctx, ">")
		e.t.Logf("operations (err %v):", err)
		for _, r := range recs {
			e.t.Logf("  %s %s attempts=%d charged=%d holder=%q seq=%d wait=%q err=%q updated=%s",
				r.Key, r.State, r.Attempts, r.Charged, r.Holder, r.Seq, r.WaitReason, r.LastError, r.Updated.Format(time.StampMilli))
		}
	}
	if s, err := e.js.Stream(ctx, consumers.StreamRequests); err == nil {
		if info, err := s.Info(ctx); err == nil {
			e.t.Logf("stream %s: %d messages, first %d, last %d", consumers.StreamRequests, info.State.Msgs, info.State.FirstSeq, info.State.LastSeq)
		}
	}
	for _, wf := range []string{schemas.WorkflowMaintenance, schemas.WorkflowRecovery, schemas.WorkflowMigration} {
		if c, err := e.js.Consumer(ctx, consumers.StreamRequests, wf); err == nil {
			if info, err := c.Info(ctx); err == nil {
				e.t.Logf("consumer %s: pending %d, ack pending %d, redelivered %d, delivered %d", wf, info.NumPending, info.NumAckPending, info.NumRedelivered, info.Delivered.Stream)
			}
		}
	}
}

func maintenance(node, req string) *schemas.MaintenanceRequested {
	return &schemas.MaintenanceRequested{Node: node, RequestID: req, Reason: "test", RequestedBy: "tester", Mode: schemas.ModeLiveMigrate}
}

// recorder counts what handlers did, safely across goroutines.
type recorder struct {
	mu     sync.Mutex
	counts map[string]int
	order  []string
}

func (r *recorder) add(k string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.counts == nil {
		r.counts = map[string]int{}
	}
	r.counts[k]++
	r.order = append(r.order, k)
	return r.counts[k]
}

func (r *recorder) get(k string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.counts[k]
}
