package consumers_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/schemas"
)

// buckets is a server with drover's streams and buckets and no runtime.
func buckets(t *testing.T) (jetstream.JetStream, *consumers.Resources) {
	t.Helper()
	s := natstest.Start(t)
	js, err := jetstream.New(natstest.Connect(t, s.ClientURL()))
	require.NoError(t, err)
	res, err := consumers.Setup(context.Background(), js, consumers.Config{})
	require.NoError(t, err)
	return js, res
}

// TestBucketKeys lists keys from the stream's subject index, filtered, and
// creates no consumer doing it (see natsauth: readers get none).
func TestBucketKeys(t *testing.T) {
	js, res := buckets(t)
	ctx := context.Background()
	for _, k := range []string{"maintenance.node-1.r1", "maintenance.node-1.r2", "maintenance.node-2.r1", "recovery.node-1.i1", consumers.NodeStateKey("node-1")} {
		_, err := res.Ops.Put(ctx, k, []byte(`{"key":"`+k+`"}`))
		require.NoError(t, err)
	}
	require.NoError(t, res.Ops.Delete(ctx, "maintenance.node-1.r2"))

	keys, err := consumers.BucketKeys(ctx, js, consumers.BucketOps, "maintenance.node-1.*")
	require.NoError(t, err)
	require.Equal(t, []string{"maintenance.node-1.r1", "maintenance.node-1.r2"}, keys, "a deleted key is listed; readers skip it")

	ops, err := consumers.OpenOpStore(ctx, js)
	require.NoError(t, err)
	recs, err := ops.List(ctx, ">")
	require.NoError(t, err)
	var got []string
	for _, r := range recs {
		got = append(got, r.Key)
	}
	require.ElementsMatch(t, []string{"maintenance.node-1.r1", "maintenance.node-2.r1", "recovery.node-1.i1"}, got, "deleted keys and node state records are not operations")

	none, err := consumers.BucketKeys(ctx, js, consumers.BucketProgress, ">")
	require.NoError(t, err)
	require.Empty(t, none)

	st, err := js.Stream(ctx, "KV_"+consumers.BucketOps)
	require.NoError(t, err)
	require.Zero(t, st.CachedInfo().State.Consumers, "listing created a consumer")
}

// TestRetryPurgesProgress: a new generation starts without the progress of
// the last one (listed through the subject index), and other operations keep
// theirs.
func TestRetryPurgesProgress(t *testing.T) {
	js, res := buckets(t)
	ctx := context.Background()
	key, other := consumers.MaintenanceOperationKey("node-1", "r1"), consumers.MaintenanceOperationKey("node-2", "r1")
	e, err := schemas.New("test", "e1", &schemas.MaintenanceRequested{Node: "node-1", RequestID: "r1", Reason: "x", RequestedBy: "t", Mode: schemas.ModeLiveMigrate})
	require.NoError(t, err)
	ce, err := json.Marshal(e)
	require.NoError(t, err)
	rec, err := json.Marshal(consumers.Record{Key: key, Workflow: schemas.WorkflowMaintenance, Target: "node-1", State: consumers.StateFailed, Generation: 1, Request: ce, Created: time.Now()})
	require.NoError(t, err)
	_, err = res.Ops.Put(ctx, key, rec)
	require.NoError(t, err)
	for _, k := range []string{key + ".vm-1", key + ".vm-2", other + ".vm-1"} {
		_, err := res.Progress.Put(ctx, k, []byte(`{}`))
		require.NoError(t, err)
	}
	_, err = consumers.RetryOperation(ctx, js, key)
	require.NoError(t, err)
	for _, k := range []string{key + ".vm-1", key + ".vm-2"} {
		_, err := res.Progress.Get(ctx, k)
		require.ErrorIs(t, err, jetstream.ErrKeyNotFound, k)
	}
	_, err = res.Progress.Get(ctx, other+".vm-1")
	require.NoError(t, err, "another operation's progress stays")
}
