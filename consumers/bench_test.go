package consumers_test

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/schemas"
)

const benchWorkers = 4

// latencies collects publish -> acknowledged durations.
type latencies struct {
	mu   sync.Mutex
	sent map[string]time.Time
	got  []time.Duration
	done chan struct{}
	each chan struct{} // one token per handled event
	want int
}

func newLatencies(n int) *latencies {
	return &latencies{sent: make(map[string]time.Time, n), done: make(chan struct{}), each: make(chan struct{}, n), want: n}
}

func (l *latencies) publish(id string) { l.mu.Lock(); l.sent[id] = time.Now(); l.mu.Unlock() }

func (l *latencies) handled(id string) {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if t, ok := l.sent[id]; ok {
		l.got = append(l.got, now.Sub(t))
		delete(l.sent, id)
		l.each <- struct{}{}
		if len(l.got) == l.want {
			close(l.done)
		}
	}
}

func (l *latencies) percentile(p float64) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := append([]time.Duration(nil), l.got...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	if len(s) == 0 {
		return 0
	}
	return s[min(len(s)-1, int(p*float64(len(s))))]
}

// rawLoop is the baseline: publish to a work-queue stream, Fetch(1) per
// worker, no-op, double ack. No CloudEvents, records, leases or status.
// With sequential, each event is published only after the previous one was
// handled: latency without queueing.
func rawLoop(b *testing.B, js jetstream.JetStream, url string, n int, sequential bool) (time.Duration, *latencies, float64) {
	ctx := context.Background()
	_, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: "RAW", Subjects: []string{"raw.>"}, Retention: jetstream.WorkQueuePolicy, Storage: jetstream.FileStorage})
	require.NoError(b, err)
	wnc := natstest.Connect(b, url) // the workers' own connection, to count what they send
	wjs, err := jetstream.New(wnc)
	require.NoError(b, err)
	cons, err := wjs.CreateOrUpdateConsumer(ctx, "RAW", jetstream.ConsumerConfig{Durable: "raw", AckPolicy: jetstream.AckExplicitPolicy})
	require.NoError(b, err)
	sent := wnc.Stats().OutMsgs
	lat := newLatencies(n)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < benchWorkers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				batch, err := cons.Fetch(1, jetstream.FetchMaxWait(200*time.Millisecond))
				if err != nil {
					continue
				}
				for m := range batch.Messages() {
					_ = m.DoubleAck(ctx)
					lat.handled(string(m.Data()))
				}
			}
		}()
	}
	start := time.Now()
	for i := 0; i < n; i++ {
		id := "raw-" + strconv.Itoa(i)
		lat.publish(id)
		_, err := js.PublishAsync("raw."+strconv.Itoa(i%64), []byte(id))
		require.NoError(b, err)
		if sequential {
			<-lat.each
		}
	}
	<-lat.done
	elapsed := time.Since(start)
	close(stop)
	wg.Wait()
	return elapsed, lat, float64(wnc.Stats().OutMsgs-sent) / float64(n)
}

// droverLoop publishes valid CloudEvents through the same kind of stream and
// lets the runtime run a no-op handler: decode and validate, node lease,
// operation record, heartbeat, final status event, double ack. An event is
// timed from its publish until its ack was confirmed, as in rawLoop.
func droverLoop(b *testing.B, js jetstream.JetStream, url string, n int, sequential bool) (time.Duration, *latencies, float64) {
	lat := newLatencies(n)
	nc := natstest.Connect(b, url) // the runtime's own connection, to count what it sends
	cfg := testConfig()
	cfg.AckWait = 30 * time.Second
	cfg.OrphanAfter = 0 // derived from the longer ack wait
	cfg.LeaseTTL = 30 * time.Second
	cfg.Reconfigure = true
	cfg.ReconcileInterval = 30 * time.Second // as in production, not the tests' 500ms
	cfg.StatusInterval = 250 * time.Millisecond
	cfg.Settled = func(s consumers.Settlement) {
		if s.Result == consumers.ResultAcked {
			lat.handled(s.EventID)
		}
	}
	rt, err := consumers.NewRuntime(nc, cfg, zerolog.Nop(), nil, consumers.Workflow{
		Name: schemas.WorkflowMaintenance, Concurrency: benchWorkers,
		Handler: consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, e consumers.Event) error {
			return nil
		})})
	require.NoError(b, err)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- rt.Start(ctx) }()
	require.Eventually(b, func() bool {
		_, err := js.Consumer(ctx, consumers.StreamRequests, schemas.WorkflowMaintenance)
		return err == nil
	}, 10*time.Second, 10*time.Millisecond)

	msgs := make([]*nats.Msg, n)
	for i := range msgs {
		id := fmt.Sprintf("bench-%t-%d", sequential, i)
		node := "node-" + strconv.Itoa(i%64)
		e, err := schemas.New("bench", id, &schemas.MaintenanceRequested{Node: node, RequestID: id, Reason: "bench", RequestedBy: "bench", Mode: schemas.ModeLiveMigrate})
		require.NoError(b, err)
		subject, err := schemas.RequestSubject(schemas.KindMaintenanceRequested, node)
		require.NoError(b, err)
		msgs[i], err = schemas.ToMsg(subject, e)
		require.NoError(b, err)
	}
	sent := nc.Stats().OutMsgs
	start := time.Now()
	for i, m := range msgs {
		lat.publish(fmt.Sprintf("bench-%t-%d", sequential, i))
		_, err := js.PublishMsgAsync(m)
		require.NoError(b, err)
		if sequential {
			<-lat.each
		}
	}
	<-lat.done
	elapsed := time.Since(start)
	perEvent := float64(nc.Stats().OutMsgs-sent) / float64(n)
	cancel()
	require.NoError(b, <-errc)
	return elapsed, lat, perEvent
}

// BenchmarkPipeline measures publish -> consumer -> no-op handler -> ack
// confirmed for drover's runtime and for a raw JetStream loop in the same
// run, with the same worker count, and reports both and their ratio. It
// asserts nothing about time.
func BenchmarkPipeline(b *testing.B) {
	n := b.N
	if n < 200 {
		n = 200
	}
	srv := natstest.Start(b)
	nc := natstest.Connect(b, srv.URL())
	js, err := jetstream.New(nc)
	require.NoError(b, err)
	b.ResetTimer()
	rawElapsed, rawLat, rawReqs := rawLoop(b, js, srv.URL(), n, false)
	drvElapsed, drvLat, drvReqs := droverLoop(b, js, srv.URL(), n, false)
	seq := min(n, 300)
	_, rawSeq, _ := rawLoop(b, js, srv.URL(), seq, true)
	_, drvSeq, _ := droverLoop(b, js, srv.URL(), seq, true)
	b.StopTimer()

	rawRate := float64(n) / rawElapsed.Seconds()
	drvRate := float64(n) / drvElapsed.Seconds()
	b.ReportMetric(rawRate, "raw-events/s")
	b.ReportMetric(drvRate, "drover-events/s")
	b.ReportMetric(float64(drvSeq.percentile(0.5).Microseconds())/1000, "drover-p50-ms")
	b.ReportMetric(float64(drvSeq.percentile(0.99).Microseconds())/1000, "drover-p99-ms")
	b.ReportMetric(rawRate/drvRate, "raw/drover")
	r := func(d time.Duration) time.Duration { return d.Round(10 * time.Microsecond) }
	fmt.Printf("\npipeline: publish -> consumer -> no-op handler -> ack confirmed, %d workers each\n", benchWorkers)
	fmt.Printf("  throughput, burst of %d events:\n", n)
	fmt.Printf("    raw JetStream  %8.0f events/s   (p50 %s, p99 %s incl. queueing)\n", rawRate, r(rawLat.percentile(0.5)), r(rawLat.percentile(0.99)))
	fmt.Printf("    drover runtime %8.0f events/s   (p50 %s, p99 %s incl. queueing)\n", drvRate, r(drvLat.percentile(0.5)), r(drvLat.percentile(0.99)))
	fmt.Printf("  latency, %d events one at a time:\n", seq)
	fmt.Printf("    raw JetStream  p50 %10s  p99 %10s\n", r(rawSeq.percentile(0.5)), r(rawSeq.percentile(0.99)))
	fmt.Printf("    drover runtime p50 %10s  p99 %10s\n", r(drvSeq.percentile(0.5)), r(drvSeq.percentile(0.99)))
	fmt.Printf("  messages the consumer side sends to the server per event: raw %.1f, drover %.1f\n", rawReqs, drvReqs)
	fmt.Printf("  drover vs raw: throughput %.2f of raw (target >= 0.33), p50 latency %.2fx raw (target <= 2)\n", drvRate/rawRate,
		float64(drvSeq.percentile(0.5))/float64(rawSeq.percentile(0.5)))
	fmt.Printf("  (drover adds per event: one CloudEvent validation, a node lease take and release, an operation\n")
	fmt.Printf("   record create and update, a final status event)\n")
}
