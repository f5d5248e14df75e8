package consumers

import (
	"errors"
	"fmt"
	"time"
)

// Stream, bucket and subject names shared by every replica.
const (
	StreamRequests = "DROVER"
	StreamStatus   = "DROVER_STATUS"
	StreamDLQ      = "DROVER_DLQ"
	BucketOps      = "drover-ops"
	BucketProgress = "drover-progress"
	BucketLocks    = "drover-locks"
	// DLQSubjectPrefix prefixes dead letters: drover.dlq.<workflow>.
	DLQSubjectPrefix = "drover.dlq."
)

// Headers the runtime adds to a dead letter, beside the original headers.
const (
	HeaderDLQReason     = "Drover-Dlq-Reason"
	HeaderDLQDeliveries = "Drover-Dlq-Deliveries"
	HeaderDLQSubject    = "Drover-Dlq-Subject"
	HeaderDLQStreamSeq  = "Drover-Dlq-Stream-Seq"
	HeaderDLQWorkflow   = "Drover-Dlq-Workflow"
	HeaderDLQTarget     = "Drover-Dlq-Target"
	HeaderDLQOperation  = "Drover-Dlq-Operation"
	HeaderDLQTime       = "Drover-Dlq-Time"
	HeaderDLQMsgID      = "Drover-Dlq-Original-Msg-Id"
)

// Config holds the runtime's tunables. Zero fields take the defaults that
// (Config).withDefaults documents; NewRuntime applies them. Per-workflow
// settings (ack wait, attempts, age) live on Workflow and default to the
// values here.
type Config struct {
	// Replicas of every stream and bucket: 1 for an embedded server, 3 in a cluster.
	Replicas int
	// DuplicateWindow is the JetStream de-duplication window of the request stream (default 30m).
	DuplicateWindow time.Duration
	// MaxPending bounds the request stream; when full, publishes are refused
	// (discard-new), which producers see as back-pressure (default 100000 messages, 1 GiB).
	MaxPending      int64
	MaxPendingBytes int64
	// MaxPerSubject bounds the messages one request subject (one kind, one
	// node or VM) may hold in the request stream, so that one flapping node
	// cannot fill it for every producer (default 100).
	MaxPerSubject int64
	// StatusMaxAge is how long status history is kept (default 7 days).
	StatusMaxAge time.Duration
	// DLQMaxAge is how long dead letters and operation records are kept (default 30 days).
	DLQMaxAge time.Duration

	// AckWait is the default ack deadline of a workflow's consumer (default 30s).
	AckWait time.Duration
	// LeaseTTL is how long a node lease survives on the server without a
	// renewal (default AckWait). Leases are renewed every heartbeat
	// (min(AckWait, LeaseTTL)/3); a holder stops acting LeaseMargin before
	// its lease could expire.
	LeaseTTL time.Duration
	// CallTimeout bounds each renewal, InProgress and record write made on a
	// running handler's behalf (default heartbeat/4).
	CallTimeout time.Duration
	// LeaseMargin is how long before the earliest possible expiry on the
	// server a holder considers its lease lost (default LeaseTTL/10, at least 100ms).
	LeaseMargin time.Duration
	// MaxAttempts is the default budget of handler runs of one operation
	// (default 10). Waiting for a lease, a Wait outcome or a pre-emption does
	// not count; a crash does.
	MaxAttempts int
	// MaxAge is the default age after which an unfinished operation is
	// dead-lettered (default 24h).
	MaxAge time.Duration
	// BackoffBase and BackoffMax shape the delay before a failed attempt is
	// retried: base * 2^(attempt-1), capped, with jitter (defaults 1s, 2m).
	BackoffBase time.Duration
	BackoffMax  time.Duration
	// LeaseRetry and LeaseRetryMax shape how soon a message that found its
	// lease busy is delivered again: jittered, growing with the wait (defaults
	// 500ms, 10s). Waiting holds no worker slot.
	LeaseRetry    time.Duration
	LeaseRetryMax time.Duration
	// PreemptRetry is how soon a higher-priority operation that asked the
	// holder to yield looks again (default 200ms, jittered).
	PreemptRetry time.Duration
	// YieldGrace is how long a pre-empted handler may take to checkpoint and
	// return; after it its context is cancelled with ErrPreempted (default 10s).
	YieldGrace time.Duration
	// ShutdownGrace bounds how long in-flight handlers may run after Stop is
	// requested; after it their contexts are cancelled and their messages are
	// handed back (default 20s).
	ShutdownGrace time.Duration
	// FetchWait is how long one pull request waits for a message (default 2s);
	// it bounds how quickly a worker notices shutdown.
	FetchWait time.Duration
	// ReconcileInterval is how often one replica looks for orphaned messages
	// and operations stuck without a live holder (default 30s).
	ReconcileInterval time.Duration
	// OrphanAfter is how long a delivered message may go unseen by every
	// replica before the reconciler takes it as orphaned (default
	// 2 x max(AckWait, BackoffMax, LeaseRetryMax)).
	OrphanAfter time.Duration
	// StatusInterval is how often per-target progress is coalesced into
	// status events (default 250ms).
	StatusInterval time.Duration
	// Source is the CloudEvents source of status events (default "drover/runtime").
	Source string
	// Reconfigure makes this replica write its ack waits and lease TTL over
	// the values existing consumers and buckets hold. Without it a replica
	// adopts the server's values, so that one started with other flags
	// cannot shorten the deadlines the running replicas heartbeat against.
	Reconfigure bool
	// Settled, if set, is called after a message was settled (acked,
	// dead-lettered, handed back): benchmarks time the pipeline with it.
	Settled func(Settlement)
}

// Settlement tells Config.Settled how a message ended.
type Settlement struct {
	Workflow  string
	EventID   string
	Operation string
	Result    string // one of the Result* constants
}

func (c Config) withDefaults() Config {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	if c.Replicas <= 0 {
		c.Replicas = 1
	}
	def(&c.DuplicateWindow, 30*time.Minute)
	if c.MaxPending <= 0 {
		c.MaxPending = 100000
	}
	if c.MaxPendingBytes <= 0 {
		c.MaxPendingBytes = 1 << 30
	}
	if c.MaxPerSubject <= 0 {
		c.MaxPerSubject = 100
	}
	def(&c.StatusMaxAge, 7*24*time.Hour)
	def(&c.DLQMaxAge, 30*24*time.Hour)
	def(&c.AckWait, 30*time.Second)
	def(&c.LeaseTTL, c.AckWait)
	def(&c.CallTimeout, c.heartbeat(c.AckWait)/4)
	def(&c.LeaseMargin, max(c.LeaseTTL/10, 100*time.Millisecond))
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = 10
	}
	def(&c.MaxAge, 24*time.Hour)
	def(&c.BackoffBase, time.Second)
	def(&c.BackoffMax, 2*time.Minute)
	def(&c.LeaseRetry, 500*time.Millisecond)
	def(&c.LeaseRetryMax, 10*time.Second)
	def(&c.PreemptRetry, 200*time.Millisecond)
	def(&c.YieldGrace, 10*time.Second)
	def(&c.ShutdownGrace, 20*time.Second)
	def(&c.FetchWait, 2*time.Second)
	def(&c.ReconcileInterval, 30*time.Second)
	def(&c.OrphanAfter, 2*c.redeliveryBound())
	def(&c.StatusInterval, 250*time.Millisecond)
	if c.Source == "" {
		c.Source = "drover/runtime"
	}
	return c
}

// redeliveryBound is the longest a live message can go unseen: a holder's
// lease running out plus its ack wait, then the longest delay a message is
// sent back with.
func (c Config) redeliveryBound() time.Duration {
	return max(c.AckWait, c.LeaseTTL) + c.LeaseTTL + max(c.BackoffMax, c.LeaseRetryMax)
}

// heartbeat is the cadence of InProgress and lease renewal for a workflow
// whose consumer has ackWait.
func (c Config) heartbeat(ackWait time.Duration) time.Duration {
	if c.LeaseTTL > 0 && c.LeaseTTL < ackWait {
		return c.LeaseTTL / 3
	}
	return ackWait / 3
}

// validate checks that a lease cannot outlive its holder's belief in it:
// the holder must get a renewal through (heartbeat, then a call that may take
// CallTimeout, possibly twice with the re-read of a timed-out renewal) and
// still stop LeaseMargin before the key can expire.
func (c Config) validate(ackWaits ...time.Duration) error {
	if c.Replicas != 1 && c.Replicas != 3 && c.Replicas != 5 {
		return fmt.Errorf("replicas must be 1, 3 or 5, got %d", c.Replicas)
	}
	var errs []error
	for _, aw := range append([]time.Duration{c.AckWait}, ackWaits...) {
		hb := c.heartbeat(aw)
		if need := hb + 2*c.CallTimeout + c.LeaseMargin; c.LeaseTTL < need {
			errs = append(errs, fmt.Errorf("lease TTL %s is too short for ack wait %s: it must cover a heartbeat (%s), two call timeouts (2 x %s) and the margin (%s) = %s",
				c.LeaseTTL, aw, hb, c.CallTimeout, c.LeaseMargin, need))
		}
		if c.CallTimeout >= hb {
			errs = append(errs, fmt.Errorf("call timeout %s must be shorter than the heartbeat %s", c.CallTimeout, hb))
		}
	}
	if c.OrphanAfter < c.redeliveryBound() {
		errs = append(errs, fmt.Errorf("orphan-after %s is shorter than a live message can go unseen (%s): the reconciler would resend messages JetStream still delivers",
			c.OrphanAfter, c.redeliveryBound()))
	}
	if c.BackoffMax < c.BackoffBase {
		errs = append(errs, fmt.Errorf("backoff max %s is below backoff base %s", c.BackoffMax, c.BackoffBase))
	}
	return errors.Join(errs...)
}

// backoff returns the delay before retrying an operation that failed n
// times: base * 2^(n-1), capped at BackoffMax.
func (c Config) backoff(n int) time.Duration {
	d := c.BackoffBase
	for i := 1; i < n && d < c.BackoffMax; i++ {
		d *= 2
	}
	return min(d, c.BackoffMax)
}
