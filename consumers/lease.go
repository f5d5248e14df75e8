package consumers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// leaseValue is what a lease key holds: who holds it and since when. Expiry is
// the bucket's TTL (server clock), not a timestamp in the value, so clock skew
// between replicas cannot make two of them believe they hold the same lease.
type leaseValue struct {
	Holder    string    `json:"holder"`
	Operation string    `json:"operation"`
	Acquired  time.Time `json:"acquired"`
}

// Lease is a held lock on one key of the drover-locks bucket.
type Lease struct {
	kv       jetstream.KeyValue
	key      string
	value    []byte
	revision uint64
}

// errLeaseHeld is returned by tryAcquire when another holder has the key.
var errLeaseHeld = errors.New("lease held by another worker")

func tryAcquire(ctx context.Context, kv jetstream.KeyValue, key string, v leaseValue) (*Lease, leaseValue, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, leaseValue{}, err
	}
	rev, err := kv.Create(ctx, key, b)
	if err == nil {
		return &Lease{kv: kv, key: key, value: b, revision: rev}, v, nil
	}
	if !errors.Is(err, jetstream.ErrKeyExists) {
		return nil, leaseValue{}, fmt.Errorf("acquire lease %s: %w", key, err)
	}
	var cur leaseValue
	if e, gerr := kv.Get(ctx, key); gerr == nil {
		_ = json.Unmarshal(e.Value(), &cur)
	}
	return nil, cur, errLeaseHeld
}

// acquireLease takes the lease on key, waiting while another worker holds it
// (its TTL frees the key if that worker died). It polls rather than watches
// because TTL expiry leaves no delete marker to watch. While it waits it calls
// tick at the heartbeat cadence so the caller can keep its message alive. It
// returns errLeaseHeld when wait runs out.
func acquireLease(ctx context.Context, kv jetstream.KeyValue, key string, v leaseValue, wait, poll, hb time.Duration, tick func()) (*Lease, leaseValue, error) {
	deadline := time.Now().Add(wait)
	lastTick := time.Now()
	for {
		l, holder, err := tryAcquire(ctx, kv, key, v)
		if !errors.Is(err, errLeaseHeld) {
			return l, holder, err
		}
		if time.Now().After(deadline) {
			return nil, holder, err
		}
		t := time.NewTimer(poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, holder, ctx.Err()
		case <-t.C:
		}
		if tick != nil && time.Since(lastTick) >= hb {
			tick()
			lastTick = time.Now()
		}
	}
}

// Renew extends the lease by rewriting it at its known revision. If another
// holder took the key (because this one's TTL ran out) it returns an error
// wrapping ErrLeaseLost.
func (l *Lease) Renew(ctx context.Context) error {
	rev, err := l.kv.Update(ctx, l.key, l.value, l.revision)
	if err != nil {
		if isRevisionConflict(err) {
			return fmt.Errorf("renew lease %s: %w: %v", l.key, ErrLeaseLost, err)
		}
		return fmt.Errorf("renew lease %s: %w", l.key, err)
	}
	l.revision = rev
	return nil
}

// Release gives the lease up if it is still ours; a lease that already
// expired or moved on is not an error.
func (l *Lease) Release(ctx context.Context) error {
	err := l.kv.Delete(ctx, l.key, jetstream.LastRevision(l.revision))
	if err != nil && !isRevisionConflict(err) {
		return fmt.Errorf("release lease %s: %w", l.key, err)
	}
	return nil
}

// isRevisionConflict reports a compare-and-set that lost: the key moved on or is gone.
func isRevisionConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists) ||
		errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted)
}
