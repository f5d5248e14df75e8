package consumers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// leaseValue is what a lease key holds. Expiry is the bucket's TTL, counted
// by the server from the last write, so clock skew between replicas cannot
// make two of them believe they hold one lease. A free lease may be reserved
// for one operation: the waiter that pre-empted the last holder, or an
// operation that waits between two checks. Only that operation, or one of
// higher priority, may take it until the reservation expires with the TTL.
type leaseValue struct {
	Holder           string    `json:"holder,omitempty"` // runtime/workflow/slot; "" when free
	Operation        string    `json:"operation,omitempty"`
	Workflow         string    `json:"workflow,omitempty"`
	Priority         int       `json:"priority,omitempty"`
	Attempt          int       `json:"attempt,omitempty"`
	Nonce            string    `json:"nonce,omitempty"` // unique per acquisition
	Acquired         time.Time `json:"acquired,omitzero"`
	ReservedFor      string    `json:"reservedFor,omitempty"`
	ReservedPriority int       `json:"reservedPriority,omitempty"`
}

func (v leaseValue) held() bool { return v.Holder != "" }

// takeableBy reports whether an operation wanting the lease at priority may
// take it now.
func (v leaseValue) takeableBy(operation string, priority int) bool {
	if v.held() {
		return false
	}
	return v.ReservedFor == "" || v.ReservedFor == operation || priority > v.ReservedPriority
}

func decodeLease(b []byte) leaseValue {
	var v leaseValue
	if json.Unmarshal(b, &v) != nil {
		// Unreadable: treat as held by an unknown holder until it expires.
		return leaseValue{Holder: "unknown", Operation: "unknown", Priority: 1 << 30}
	}
	return v
}

// leaseStore takes and gives back leases in the drover-locks bucket. It
// remembers the revision of the free value it last wrote for each key, so
// that taking a key this process released before is one update, not a read
// and an update.
type leaseStore struct {
	js          jetstream.JetStream
	kv          jetstream.KeyValue
	ttl, margin time.Duration
	callTimeout time.Duration

	mu    sync.Mutex
	freed map[string]freed
}

type freed struct {
	rev uint64
	v   leaseValue
}

func newLeaseStore(js jetstream.JetStream, kv jetstream.KeyValue, ttl, margin, callTimeout time.Duration) *leaseStore {
	return &leaseStore{js: js, kv: kv, ttl: ttl, margin: margin, callTimeout: callTimeout, freed: map[string]freed{}}
}

// errLeaseHeld is returned by acquire when another holder has the key.
var errLeaseHeld = errors.New("lease held by another operation")

// acquire takes key for want, or returns errLeaseHeld and the value that
// stands in the way.
func (s *leaseStore) acquire(ctx context.Context, key string, want leaseValue) (*Lease, leaseValue, error) {
	b, err := json.Marshal(want)
	if err != nil {
		return nil, leaseValue{}, err
	}
	s.mu.Lock()
	f, cached := s.freed[key]
	delete(s.freed, key)
	s.mu.Unlock()
	if cached && f.v.takeableBy(want.Operation, want.Priority) {
		sent := time.Now()
		if rev, err := s.kv.Update(ctx, key, b, f.rev); err == nil {
			return s.lease(key, b, want, rev, sent), want, nil
		}
	}
	for range 3 {
		e, err := s.kv.Get(ctx, key)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound), errors.Is(err, jetstream.ErrKeyDeleted):
			sent := time.Now()
			rev, err := s.kv.Create(ctx, key, b)
			if err == nil {
				return s.lease(key, b, want, rev, sent), want, nil
			}
			if !errors.Is(err, jetstream.ErrKeyExists) {
				return nil, leaseValue{}, fmt.Errorf("acquire lease %s: %w", key, err)
			}
			continue
		case err != nil:
			return nil, leaseValue{}, fmt.Errorf("read lease %s: %w", key, err)
		}
		cur := decodeLease(e.Value())
		if !cur.takeableBy(want.Operation, want.Priority) {
			return nil, cur, errLeaseHeld
		}
		sent := time.Now()
		rev, err := s.kv.Update(ctx, key, b, e.Revision())
		if err == nil {
			return s.lease(key, b, want, rev, sent), want, nil
		}
		if !isRevisionConflict(err) {
			return nil, leaseValue{}, fmt.Errorf("acquire lease %s: %w", key, err)
		}
	}
	return nil, leaseValue{Holder: "contended"}, errLeaseHeld
}

func (s *leaseStore) lease(key string, b []byte, v leaseValue, rev uint64, sent time.Time) *Lease {
	l := &Lease{store: s, key: key, value: b, v: v, revision: rev}
	l.validUntil = sent.Add(s.ttl - s.margin)
	return l
}

// Lease is a held lock on one key of the drover-locks bucket.
type Lease struct {
	store *leaseStore
	key   string
	value []byte
	v     leaseValue

	mu         sync.Mutex
	revision   uint64
	validUntil time.Time
	lost       bool
}

// ValidUntil is when this holder must have stopped acting unless a renewal
// succeeds first: the send time of the last successful write, plus the TTL,
// minus the safety margin. The key cannot expire on the server before it.
func (l *Lease) ValidUntil() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lost {
		return time.Time{}
	}
	return l.validUntil
}

// Valid reports whether the holder may still act.
func (l *Lease) Valid() bool { return time.Now().Before(l.ValidUntil()) }

// Renew extends the lease by rewriting it at its known revision, within the
// store's call timeout. A renewal that was committed but whose answer was
// lost is recognised by reading the key back. If another holder has the key,
// or it is gone, it returns an error wrapping ErrLeaseLost; any other error
// leaves the lease valid until ValidUntil.
func (l *Lease) Renew(ctx context.Context) error {
	l.mu.Lock()
	rev := l.revision
	l.mu.Unlock()
	sent := time.Now()
	cctx, cancel := context.WithTimeout(ctx, l.store.callTimeout)
	nrev, err := l.store.kv.Update(cctx, l.key, l.value, rev)
	cancel()
	if err == nil {
		l.renewed(nrev, sent)
		return nil
	}
	if ctx.Err() != nil {
		return err
	}
	// Either someone else wrote the key, or our write went through and its
	// answer was lost (a timeout), or it never arrived: read it back.
	rctx, rcancel := context.WithTimeout(ctx, l.store.callTimeout)
	e, gerr := l.store.kv.Get(rctx, l.key)
	rcancel()
	switch {
	case gerr == nil && e.Revision() > rev && decodeLease(e.Value()).Nonce == l.v.Nonce:
		l.renewed(e.Revision(), sent)
		return nil
	case gerr == nil && e.Revision() == rev:
		return fmt.Errorf("renew lease %s: %w", l.key, err) // not committed; still ours until ValidUntil
	case gerr == nil, errors.Is(gerr, jetstream.ErrKeyNotFound), errors.Is(gerr, jetstream.ErrKeyDeleted):
		l.markLost()
		return fmt.Errorf("renew lease %s: %w: %v", l.key, ErrLeaseLost, err)
	default:
		return fmt.Errorf("renew lease %s: %w (read back: %v)", l.key, err, gerr)
	}
}

func (l *Lease) renewed(rev uint64, sent time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if rev > l.revision {
		l.revision = rev
	}
	if until := sent.Add(l.store.ttl - l.store.margin); until.After(l.validUntil) {
		l.validUntil = until
	}
}

func (l *Lease) markLost() {
	l.mu.Lock()
	l.lost = true
	l.mu.Unlock()
}

// Release gives the lease up if it is still ours, reserving it for
// reserveFor (at priority) when that is not empty. A lease that already
// expired or moved on is not an error.
func (l *Lease) Release(ctx context.Context, reserveFor string, priority int) error {
	return l.releaseAsync(reserveFor, priority)(ctx)
}

// releaseAsync sends the release (a compare-and-set publish at the lease's
// revision) and returns a function that waits for its answer, so that a
// caller can release and acknowledge in parallel.
func (l *Lease) releaseAsync(reserveFor string, priority int) func(context.Context) error {
	l.mu.Lock()
	rev, lost := l.revision, l.lost
	l.lost = true
	l.mu.Unlock()
	if lost {
		return func(context.Context) error { return nil }
	}
	free := leaseValue{ReservedFor: reserveFor, ReservedPriority: priority}
	b, err := json.Marshal(free)
	if err != nil {
		return func(context.Context) error { return err }
	}
	m := nats.NewMsg("$KV." + BucketLocks + "." + l.key)
	m.Data = b
	m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(rev, 10))
	fut, err := l.store.js.PublishMsgAsync(m)
	if err != nil {
		return func(context.Context) error { return fmt.Errorf("release lease %s: %w", l.key, err) }
	}
	return func(ctx context.Context) error {
		select {
		case ack := <-fut.Ok():
			l.store.mu.Lock()
			l.store.freed[l.key] = freed{rev: ack.Sequence, v: free}
			l.store.mu.Unlock()
			return nil
		case err := <-fut.Err():
			if isRevisionConflict(err) {
				return nil // expired or taken over meanwhile: not ours to release
			}
			return fmt.Errorf("release lease %s: %w", l.key, err)
		case <-ctx.Done():
			return fmt.Errorf("release lease %s: %w", l.key, ctx.Err())
		}
	}
}

// isRevisionConflict reports a compare-and-set that lost: the key moved on or is gone.
func isRevisionConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists) ||
		errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted)
}
