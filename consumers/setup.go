package consumers

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

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
		MaxMsgs:     cfg.MaxPending,
		MaxBytes:    cfg.MaxPendingBytes,
		MaxMsgSize:  int32(schemas.MaxEventBytes + 8*1024),
		Duplicates:  cfg.DuplicateWindow,
		Replicas:    cfg.Replicas,
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

// ConsumerConfig is the durable pull consumer of one workflow, shared by every replica.
func ConsumerConfig(cfg Config, workflow string) jetstream.ConsumerConfig {
	cfg = cfg.withDefaults()
	var filters []string
	for _, k := range WorkflowKinds[workflow] {
		filters = append(filters, schemas.RequestFilter(k))
	}
	return jetstream.ConsumerConfig{
		Durable:        workflow,
		Description:    "drover " + workflow + " workflow",
		FilterSubjects: filters,
		AckPolicy:      jetstream.AckExplicitPolicy,
		AckWait:        cfg.AckWait,
		MaxDeliver:     cfg.MaxDeliver,
		MaxAckPending:  1000,
		DeliverPolicy:  jetstream.DeliverAllPolicy,
		Replicas:       cfg.Replicas,
	}
}

// Setup creates or updates the streams, KV buckets and, for each workflow
// named, its durable consumer. Every replica calls it at start; it is idempotent.
func Setup(ctx context.Context, js jetstream.JetStream, cfg Config, workflows ...string) (ops, locks jetstream.KeyValue, err error) {
	cfg = cfg.withDefaults()
	for _, sc := range StreamConfigs(cfg) {
		if _, err := js.CreateOrUpdateStream(ctx, sc); err != nil {
			return nil, nil, fmt.Errorf("create stream %s: %w", sc.Name, err)
		}
	}
	ops, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      BucketOps,
		Description: "drover operation records, keyed by operation",
		History:     5,
		TTL:         cfg.DLQMaxAge,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("create bucket %s: %w", BucketOps, err)
	}
	locks, err = js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      BucketLocks,
		Description: "drover per-node leases; an entry not renewed within the TTL expires",
		History:     1,
		TTL:         cfg.LeaseTTL,
		Storage:     jetstream.FileStorage,
		Replicas:    cfg.Replicas,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("create bucket %s: %w", BucketLocks, err)
	}
	for _, wf := range workflows {
		if _, ok := WorkflowKinds[wf]; !ok {
			return nil, nil, fmt.Errorf("unknown workflow %q", wf)
		}
		if _, err := js.CreateOrUpdateConsumer(ctx, StreamRequests, ConsumerConfig(cfg, wf)); err != nil {
			return nil, nil, fmt.Errorf("create consumer %s: %w", wf, err)
		}
	}
	return ops, locks, nil
}
