package consumers

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/integration/natstest"
)

// lostAnswerKV commits updates on the server but, when armed, reports the
// next one as timed out, as a client does whose answer got lost.
type lostAnswerKV struct {
	jetstream.KeyValue
	armed atomic.Bool
}

func (k *lostAnswerKV) Update(ctx context.Context, key string, value []byte, rev uint64) (uint64, error) {
	n, err := k.KeyValue.Update(ctx, key, value, rev)
	if err == nil && k.armed.CompareAndSwap(true, false) {
		return 0, context.DeadlineExceeded
	}
	return n, err
}

func locksBucket(t *testing.T, ttl time.Duration) (jetstream.JetStream, jetstream.KeyValue) {
	t.Helper()
	srv := natstest.Start(t)
	js, err := jetstream.New(natstest.Connect(t, srv.URL()))
	require.NoError(t, err)
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: BucketLocks, TTL: ttl, Storage: jetstream.MemoryStorage})
	require.NoError(t, err)
	return js, kv
}

// A renewal that was committed but whose answer was lost is recognised as
// ours: the lease stays valid and the next renewal works, instead of a false
// loss (which would stop a healthy handler) or a stale revision (which
// would fail every later renewal).
func TestRenewalCommittedButAnswerLost(t *testing.T) {
	js, locks := locksBucket(t, 3*time.Second)
	kv := &lostAnswerKV{KeyValue: locks}
	store := newLeaseStore(js, kv, 3*time.Second, 300*time.Millisecond, time.Second)
	ctx := context.Background()
	l, _, err := store.acquire(ctx, "node.node-1", leaseValue{Holder: "a/maintenance/0", Operation: "op-1", Priority: PriorityMaintenance, Nonce: nonce()})
	require.NoError(t, err)
	before := l.ValidUntil()

	kv.armed.Store(true)
	require.NoError(t, l.Renew(ctx), "the committed renewal is recognised")
	require.True(t, l.ValidUntil().After(before), "and extends the lease")
	require.NoError(t, l.Renew(ctx), "the next renewal uses the committed revision")
	require.True(t, l.Valid())
}

// A renewal that finds another holder reports the loss, and the lease is no
// longer valid.
func TestRenewalAfterTakeoverIsLost(t *testing.T) {
	js, kv := locksBucket(t, 3*time.Second)
	store := newLeaseStore(js, kv, 3*time.Second, 300*time.Millisecond, time.Second)
	ctx := context.Background()
	l, _, err := store.acquire(ctx, "node.node-1", leaseValue{Holder: "a", Operation: "op-1", Priority: PriorityMaintenance, Nonce: nonce()})
	require.NoError(t, err)
	_, err = kv.Put(ctx, "node.node-1", []byte(`{"holder":"b","operation":"op-2","priority":40,"nonce":"x"}`))
	require.NoError(t, err)
	err = l.Renew(ctx)
	require.ErrorIs(t, err, ErrLeaseLost)
	require.False(t, l.Valid())
}

// Reservations: a lease released for a waiter can be taken by that waiter
// or a higher priority, not by a lower one; an expired lease is free.
func TestLeaseReservations(t *testing.T) {
	js, kv := locksBucket(t, time.Second)
	store := newLeaseStore(js, kv, time.Second, 100*time.Millisecond, 200*time.Millisecond)
	ctx := context.Background()
	take := func(op string, prio int) (*Lease, leaseValue, error) {
		return store.acquire(ctx, "node.node-1", leaseValue{Holder: "h-" + op, Operation: op, Priority: prio, Nonce: nonce()})
	}
	m, _, err := take("maintenance-1", PriorityMaintenance)
	require.NoError(t, err)
	_, cur, err := take("recovery-1", PriorityRecovery)
	require.True(t, errors.Is(err, errLeaseHeld))
	require.Equal(t, "maintenance-1", cur.Operation, "the waiter learns who holds it")

	require.NoError(t, m.Release(ctx, "recovery-1", PriorityRecovery))
	_, cur, err = take("maintenance-2", PriorityMaintenance)
	require.ErrorIs(t, err, errLeaseHeld, "a lower priority cannot take a lease reserved for recovery")
	require.Equal(t, "recovery-1", cur.ReservedFor)
	r, _, err := take("recovery-1", PriorityRecovery)
	require.NoError(t, err, "the operation it was reserved for takes it")
	require.NoError(t, r.Release(ctx, "", 0))
	m2, _, err := take("maintenance-2", PriorityMaintenance)
	require.NoError(t, err, "a free lease is taken by anyone")

	// A holder that dies: its lease expires with the bucket TTL.
	require.Eventually(t, func() bool {
		_, _, err := take("recovery-2", PriorityRecovery)
		return err == nil
	}, 10*time.Second, 50*time.Millisecond, "an unrenewed lease expires")
	require.False(t, m2.Valid(), "the dead holder's lease is past its validity by then")
}

// A progress write whose caller stopped waiting (the handler returned while
// a batch was in flight) still learns the revision it wrote, so the next
// batch of the same attempt is not mistaken for another attempt's.
func TestProgressWriteOutlivesItsCaller(t *testing.T) {
	srv := natstest.Start(t)
	js, err := jetstream.New(natstest.Connect(t, srv.URL()))
	require.NoError(t, err)
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: BucketProgress})
	require.NoError(t, err)
	b := newProgressBook(js, kv, "maintenance.node-1.r1")
	ok := func() error { return nil }
	for i := 0; i < 20; i++ {
		gone, cancel := context.WithCancel(context.Background())
		cancel()
		b.set("ns/vm-1", TargetProgress{Phase: "Migrating"})
		_ = b.write(gone, 1, 1, ok)
		b.set("ns/vm-1", TargetProgress{Phase: "Running"})
		require.NoError(t, b.write(context.Background(), 1, 1, ok), "round %d", i)
	}
	got, err := ReadProgress(context.Background(), kv, "maintenance.node-1.r1")
	require.NoError(t, err)
	require.Equal(t, "Running", got["ns/vm-1"].Phase)
}
