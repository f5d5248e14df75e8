package schemas

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"
)

// startJetStream runs a real in-process nats-server with JetStream, its store in t.TempDir().
// (schemas imports nothing from this repository, tests included, so it does not use
// integration/natstest.)
func startJetStream(t *testing.T) *nats.Conn {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true})
	require.NoError(t, err)
	go s.Start()
	t.Cleanup(s.Shutdown)
	require.True(t, s.ReadyForConnections(10*time.Second), "nats-server not ready")
	nc, err := nats.Connect(s.ClientURL())
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	return nc
}

// TestJetStreamWire sends events through a real server: percent-encoded headers survive the wire,
// a re-published event (same source and id) is dropped as a duplicate, and a structured-mode
// message published by a plain client is accepted on the consuming side.
func TestJetStreamWire(t *testing.T) {
	nc := startJetStream(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "DROVER", Subjects: []string{RequestSubjects}, Duplicates: time.Minute})
	require.NoError(t, err)

	p := MaintenanceRequested{Node: "1.1.1.211", RequestID: "CHG 42 ✓", Reason: "firmware", RequestedBy: "Zoë"}
	e, err := New("drover/chat ops", `id "1" 100% é`, p)
	require.NoError(t, err)
	e.SetExtension("requester", "Zoë O'Brien 50%")
	subject, err := SubjectFor(p)
	require.NoError(t, err)
	require.Equal(t, "drover.req.maintenance-requested.1_1_1_211", subject)

	m, err := ToMsg(subject, e)
	require.NoError(t, err)
	ack, err := js.PublishMsg(ctx, m)
	require.NoError(t, err)
	require.False(t, ack.Duplicate)

	// A retry builds a new event (new time) with the same source and id: JetStream drops it.
	e2, err := New("drover/chat ops", `id "1" 100% é`, p)
	require.NoError(t, err)
	m2, err := ToMsg(subject, e2)
	require.NoError(t, err)
	ack2, err := js.PublishMsg(ctx, m2)
	require.NoError(t, err)
	require.True(t, ack2.Duplicate, "same source+id must be deduplicated by Nats-Msg-Id")

	// Structured mode from a client that knows nothing of ce- headers.
	structured := []byte(`{"specversion":"1.0","type":"io.drover.node.fenced.v1","source":"fencer","id":"f1","datacontenttype":"application/json","subject":"worker-1.example.com","data":{"node":"worker-1.example.com","method":"pdu","by":"fencer"}}`)
	_, err = js.PublishMsg(ctx, &nats.Msg{Subject: "drover.req.node-fenced.worker-1_example_com", Header: nats.Header{"Content-Type": {"application/cloudevents+json"}}, Data: structured})
	require.NoError(t, err)

	cons, err := stream.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{Durable: "test", AckPolicy: jetstream.AckExplicitPolicy})
	require.NoError(t, err)
	batch, err := cons.Fetch(3, jetstream.FetchMaxWait(2*time.Second))
	require.NoError(t, err)
	var got []jetstream.Msg
	for msg := range batch.Messages() {
		got = append(got, msg)
	}
	require.NoError(t, batch.Error())
	require.Len(t, got, 2, "the duplicate was not stored")

	first, err := FromJetStreamMsg(got[0])
	require.NoError(t, err)
	requireSameEvent(t, e, first)
	dp, err := Decode(first)
	require.NoError(t, err)
	require.Equal(t, "CHG 42 ✓", dp.(*MaintenanceRequested).RequestID)
	viaHeaders, err := FromHeaders(got[0].Headers(), got[0].Data())
	require.NoError(t, err)
	requireSameEvent(t, e, viaHeaders)

	second, err := FromJetStreamMsg(got[1])
	require.NoError(t, err)
	fp, err := Decode(second)
	require.NoError(t, err)
	require.Equal(t, &NodeFenced{Node: "worker-1.example.com", Method: "pdu", By: "fencer"}, fp)
}
