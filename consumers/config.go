package consumers

import (
	"fmt"
	"time"
)

// Stream, bucket and subject names shared by every replica.
const (
	StreamRequests = "DROVER"
	StreamStatus   = "DROVER_STATUS"
	StreamDLQ      = "DROVER_DLQ"
	BucketOps      = "drover-ops"
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
	HeaderDLQTime       = "Drover-Dlq-Time"
	HeaderDLQMsgID      = "Drover-Dlq-Original-Msg-Id"
)

// Config holds the runtime's tunables. Zero fields take the defaults that
// (*Config).withDefaults documents; NewRuntime applies them.
type Config struct {
	// Replicas of every stream and bucket: 1 for an embedded server, 3 in a cluster.
	Replicas int
	// DuplicateWindow is the JetStream de-duplication window of the request stream (default 30m).
	DuplicateWindow time.Duration
	// MaxPending bounds the request stream; when full, publishes are refused
	// (discard-new), which producers see as back-pressure (default 100000 messages, 1 GiB).
	MaxPending      int64
	MaxPendingBytes int64
	// StatusMaxAge is how long status history is kept (default 7 days).
	StatusMaxAge time.Duration
	// DLQMaxAge is how long dead letters are kept (default 30 days).
	DLQMaxAge time.Duration
	// AckWait is the consumer's ack deadline; InProgress and lease renewal run at AckWait/3 (default 30s).
	AckWait time.Duration
	// MaxDeliver bounds deliveries of one message before it is dead-lettered (default 10).
	MaxDeliver int
	// BackoffBase and BackoffMax shape NakWithDelay: base * 2^(delivery-1), capped (defaults 1s, 2m).
	BackoffBase time.Duration
	BackoffMax  time.Duration
	// LeaseTTL is how long a node lease survives without renewal (default AckWait).
	LeaseTTL time.Duration
	// LeaseWait bounds how long a worker waits for a lease held elsewhere
	// before it naks the message with backoff (default 5m).
	LeaseWait time.Duration
	// ShutdownGrace bounds how long in-flight handlers may run after Stop is
	// requested; after it their contexts are cancelled and their messages are
	// left unacknowledged for another replica (default 20s).
	ShutdownGrace time.Duration
	// FetchWait is how long one pull request waits for a message (default 2s);
	// it bounds how quickly a worker notices shutdown.
	FetchWait time.Duration
	// Source is the CloudEvents source of status events (default "drover/runtime").
	Source string
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
	def(&c.StatusMaxAge, 7*24*time.Hour)
	def(&c.DLQMaxAge, 30*24*time.Hour)
	def(&c.AckWait, 30*time.Second)
	if c.MaxDeliver <= 0 {
		c.MaxDeliver = 10
	}
	def(&c.BackoffBase, time.Second)
	def(&c.BackoffMax, 2*time.Minute)
	def(&c.LeaseTTL, c.AckWait)
	def(&c.LeaseWait, 5*time.Minute)
	def(&c.ShutdownGrace, 20*time.Second)
	def(&c.FetchWait, 2*time.Second)
	if c.Source == "" {
		c.Source = "drover/runtime"
	}
	return c
}

func (c Config) validate() error {
	if c.Replicas != 1 && c.Replicas != 3 && c.Replicas != 5 {
		return fmt.Errorf("replicas must be 1, 3 or 5, got %d", c.Replicas)
	}
	if c.LeaseTTL < c.AckWait/3*2 {
		return fmt.Errorf("lease TTL %s must be at least two renewal periods (AckWait/3 = %s)", c.LeaseTTL, c.AckWait/3)
	}
	return nil
}

// heartbeat is the cadence of InProgress and lease renewal.
func (c Config) heartbeat() time.Duration { return c.AckWait / 3 }

// backoff returns the nak delay for a message that has been delivered n times.
func (c Config) backoff(n uint64) time.Duration {
	d := c.BackoffBase
	for i := uint64(1); i < n && d < c.BackoffMax; i++ {
		d *= 2
	}
	if d > c.BackoffMax {
		d = c.BackoffMax
	}
	return d
}
