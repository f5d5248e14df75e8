package consumers

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/drover-io/drover/schemas"
)

// RequestSubjectFilters lists the request subjects the DROVER stream accepts:
// one per known kind, so a publish to an unknown kind is refused at the edge
// instead of sitting in a work queue no consumer reads.
func RequestSubjectFilters() []string {
	var out []string
	for _, wf := range []string{schemas.WorkflowMaintenance, schemas.WorkflowRecovery, schemas.WorkflowMigration} {
		for _, k := range WorkflowKinds[wf] {
			out = append(out, schemas.RequestFilter(k))
		}
	}
	return out
}

// StreamConfigs returns the three streams' configurations for cfg.
func StreamConfigs(cfg Config) []jetstream.StreamConfig {
	cfg = cfg.withDefaults()
	return []jetstream.StreamConfig{{
		Name:        StreamRequests,
		Description: "drover requests: node signals, maintenance and migration requests",
		Subjects:    RequestSubjectFilters(),
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.WorkQueuePolicy,
		Discard:     jetstream.DiscardNew,
		// A flapping node or a looping bot fills its own subject, not the stream.
		DiscardNewPerSubject: true,
		MaxMsgsPerSubject:    cfg.MaxPerSubject,
		MaxMsgs:              cfg.MaxPending,
		MaxBytes:             cfg.MaxPendingBytes,
		MaxMsgSize:           int32(schemas.MaxEventBytes + 8*1024),
		Duplicates:           cfg.DuplicateWindow,
		Replicas:             cfg.Replicas,
	}, {
		Name:        StreamStatus,
		Description: "drover status history",
		Subjects:    []string{schemas.StatusSubjects},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		MaxAge:      cfg.StatusMaxAge,
		MaxBytes:    cfg.MaxPendingBytes,
		Duplicates:  2 * time.Minute,
		Replicas:    cfg.Replicas,
	}, {
		Name:        StreamDLQ,
		Description: "drover dead letters: the original message, its headers, the reason and the delivery count",
		Subjects:    []string{DLQSubjectPrefix + ">"},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		MaxAge:      cfg.DLQMaxAge,
		MaxBytes:    cfg.MaxPendingBytes,
		Duplicates:  10 * time.Minute,
		Replicas:    cfg.Replicas,
	}}
}

// ConsumerConfig is the durable pull consumer of one workflow, shared by
// every replica. Deliveries are unlimited: waiting for a lease is a delivery
// too, so the runtime keeps each operation's budget itself.
func ConsumerConfig(cfg Config, workflow string) jetstream.ConsumerConfig {
	cfg = cfg.withDefaults()
	return consumerConfig(cfg, workflow, cfg.AckWait)
}

func consumerConfig(cfg Config, workflow string, ackWait time.Duration) jetstream.ConsumerConfig {
	var filters []string
	for _, k := range WorkflowKinds[workflow] {
		filters = append(filters, schemas.RequestFilter(k))
	}
	return jetstream.ConsumerConfig{
		Durable:        workflow,
		Description:    "drover " + workflow + " workflow",
		FilterSubjects: filters,
		AckPolicy:      jetstream.AckExplicitPolicy,
		AckWait:        ackWait,
		MaxDeliver:     -1,
		MaxAckPending:  10000,
		DeliverPolicy:  jetstream.DeliverAllPolicy,
		Replicas:       cfg.Replicas,
	}
}

// Resources are the buckets and consumers every replica shares, and the
// timing the server holds for them.
type Resources struct {
	Ops, Progress, Locks jetstream.KeyValue
	// LeaseTTL is the locks bucket's TTL as the server has it.
	LeaseTTL time.Duration
	// AckWait of each workflow's consumer as the server has it.
	AckWait   map[string]time.Duration
	Consumers map[string]jetstream.Consumer
}

// Setup creates the streams, KV buckets and, for each workflow named, its
// durable consumer, and returns them with the timing the server holds. Every
// replica calls it at start; it is idempotent. Existing consumers and the
// locks bucket keep the server's ack wait and TTL (a replica started with
// other flags must not change the deadlines the running ones heartbeat
// against) unless Config.Reconfigure is set.
func Setup(ctx context.Context, js jetstream.JetStream, cfg Config, workflows ...string) (*Resources, error) {
	cfg = cfg.withDefaults()
	var wfs []*workflow
	for _, name := range workflows {
		wfs = append(wfs, &workflow{Workflow: Workflow{Name: name, AckWait: cfg.AckWait}})
	}
	return setup(ctx, js, cfg, wfs, zerolog.Nop())
}

func setup(ctx context.Context, js jetstream.JetStream, cfg Config, wfs []*workflow, log zerolog.Logger) (*Resources, error) {
	for _, sc := range StreamConfigs(cfg) {
		if _, err := js.CreateOrUpdateStream(ctx, sc); err != nil {
			return nil, fmt.Errorf("create stream %s: %w", sc.Name, err)
		}
	}
	res := &Resources{AckWait: map[string]time.Duration{}, Consumers: map[string]jetstream.Consumer{}}
	var err error
	res.Ops, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      BucketOps,
		Description: "drover operation records (keyed by operation) and node state records (node.<name>)",
		History:     5,
		TTL:         cfg.DLQMaxAge,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("create bucket %s: %w", BucketOps, err)
	}
	res.Progress, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      BucketProgress,
		Description: "drover per-target progress of operations: <operation>.<target>",
		History:     1,
		TTL:         cfg.DLQMaxAge,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("create bucket %s: %w", BucketProgress, err)
	}
	if res.Locks, res.LeaseTTL, err = setupLocks(ctx, js, cfg); err != nil {
		return nil, err
	}
	for _, wf := range wfs {
		if _, ok := WorkflowKinds[wf.Name]; !ok {
			return nil, fmt.Errorf("unknown workflow %q", wf.Name)
		}
		cons, err := setupConsumer(ctx, js, cfg, wf.Name, wf.AckWait, log)
		if err != nil {
			return nil, err
		}
		res.Consumers[wf.Name] = cons
		res.AckWait[wf.Name] = cons.CachedInfo().Config.AckWait
	}
	return res, nil
}

func setupLocks(ctx context.Context, js jetstream.JetStream, cfg Config) (jetstream.KeyValue, time.Duration, error) {
	want := jetstream.KeyValueConfig{
		Bucket:      BucketLocks,
		Description: "drover leases of nodes and VMs; an entry not renewed within the TTL expires",
		History:     1,
		TTL:         cfg.LeaseTTL,
		// In memory: a lease lives for seconds, and one lost with the whole
		// server is safe, since its holder cannot renew it and stops.
		Storage:  jetstream.MemoryStorage,
		Replicas: cfg.Replicas,
	}
	kv, err := js.KeyValue(ctx, BucketLocks)
	switch {
	case errors.Is(err, jetstream.ErrBucketNotFound):
		kv, err = js.CreateKeyValue(ctx, want)
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = js.KeyValue(ctx, BucketLocks)
		}
	case err == nil && cfg.Reconfigure:
		// The storage type of a bucket cannot change; keep what it has.
		if st, serr := kv.Status(ctx); serr == nil {
			if info, ok := st.(*jetstream.KeyValueBucketStatus); ok {
				want.Storage = info.StreamInfo().Config.Storage
			}
		}
		kv, err = js.UpdateKeyValue(ctx, want)
	}
	if err != nil {
		return nil, 0, fmt.Errorf("create bucket %s: %w", BucketLocks, err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		return nil, 0, fmt.Errorf("read bucket %s: %w", BucketLocks, err)
	}
	return kv, st.TTL(), nil
}

// setupConsumer creates the workflow's consumer, or brings an existing one
// to the current shape (unlimited deliveries, filters) while keeping the
// server's ack wait unless cfg.Reconfigure.
func setupConsumer(ctx context.Context, js jetstream.JetStream, cfg Config, name string, ackWait time.Duration, log zerolog.Logger) (jetstream.Consumer, error) {
	want := consumerConfig(cfg, name, ackWait)
	cons, err := js.Consumer(ctx, StreamRequests, name)
	if errors.Is(err, jetstream.ErrConsumerNotFound) {
		cons, err = js.CreateConsumer(ctx, StreamRequests, want)
		if err == nil {
			return cons, nil
		}
		// Another replica created it first: fall through to the existing one.
		cons, err = js.Consumer(ctx, StreamRequests, name)
	}
	if err != nil {
		return nil, fmt.Errorf("open consumer %s: %w", name, err)
	}
	cur := cons.CachedInfo().Config
	if !cfg.Reconfigure {
		want.AckWait = cur.AckWait
	}
	if cur.AckWait == want.AckWait && cur.MaxDeliver == want.MaxDeliver && cur.MaxAckPending == want.MaxAckPending &&
		slices.Equal(cur.FilterSubjects, want.FilterSubjects) {
		return cons, nil
	}
	if cur.MaxDeliver != want.MaxDeliver {
		log.Info().Str("consumer", name).Int("was", cur.MaxDeliver).Msg("consumer now delivers without limit; the runtime keeps each operation's budget")
	}
	cons, err = js.UpdateConsumer(ctx, StreamRequests, want)
	if err != nil {
		return nil, fmt.Errorf("update consumer %s: %w", name, err)
	}
	return cons, nil
}
