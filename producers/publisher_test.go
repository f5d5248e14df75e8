package producers_test

import (
	"context"
	"testing"

	cloudevents "github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// TestPublisherCounts: a Publisher with Metrics counts under its source
// what it was given and what JetStream said: published, a duplicate, an
// invalid event (nothing stored).
func TestPublisherCounts(t *testing.T) {
	nc := natstest.Connect(t, natstest.Start(t).URL())
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	ctx := context.Background()
	_, err = consumers.Setup(ctx, js, consumers.Config{})
	require.NoError(t, err)
	m := producers.NewMetrics(prometheus.NewRegistry())
	pub := &producers.Publisher{JS: js, Metrics: m, Source: "gitops"}

	e, err := schemas.New("drover/gitops", "commit-1", &schemas.MaintenanceRequested{Node: "node-1", RequestID: "r1", Reason: "bios", RequestedBy: "git"})
	require.NoError(t, err)
	for range 2 {
		_, err := pub.Publish(ctx, e)
		require.NoError(t, err)
	}
	bad := cloudevents.New()
	bad.SetID("x")
	bad.SetSource("drover/gitops")
	bad.SetType(schemas.TypeMaintenanceRequested)
	require.NoError(t, bad.SetData("application/json", map[string]any{"node": "Not A Node"}))
	_, err = pub.Publish(ctx, bad)
	require.ErrorIs(t, err, schemas.ErrInvalid)

	typ := schemas.TypeMaintenanceRequested
	require.Equal(t, 3.0, testutil.ToFloat64(m.Received.WithLabelValues("gitops", typ)))
	require.Equal(t, 2.0, testutil.ToFloat64(m.Published.WithLabelValues("gitops", typ)))
	require.Equal(t, 1.0, testutil.ToFloat64(m.Duplicate.WithLabelValues("gitops", typ)))
	require.Equal(t, 1.0, testutil.ToFloat64(m.Rejected.WithLabelValues("gitops", "invalid")))
	info, err := js.Stream(ctx, consumers.StreamRequests)
	require.NoError(t, err)
	st, err := info.Info(ctx)
	require.NoError(t, err)
	require.Equal(t, uint64(1), st.State.Msgs, "one event stored: the duplicate and the invalid one were not")
}
