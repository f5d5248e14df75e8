package consumers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TargetProgress is the progress of one target (usually a VM) of an operation.
type TargetProgress struct {
	Phase   string    `json:"phase"`
	Node    string    `json:"node,omitempty"`
	Message string    `json:"message,omitempty"`
	Updated time.Time `json:"updated,omitzero"`
}

// progressEntry is what the drover-progress bucket holds for one target.
type progressEntry struct {
	Target string `json:"target"`
	TargetProgress
	Generation int `json:"generation"`
	Attempt    int `json:"attempt"`
}

// ProgressKey is the drover-progress key of one target of an operation.
func ProgressKey(op, target string) string { return op + "." + keyToken(target) }

// progressBook keeps an operation's per-target progress: what an earlier
// attempt left, what this attempt changed, what is still to be written and
// what is still to be published. Writes go out in batches, each target under
// its own key with compare-and-set, pipelined.
type progressBook struct {
	js     jetstream.JetStream
	kv     jetstream.KeyValue
	bucket string
	op     string

	mu        sync.Mutex
	cur       map[string]TargetProgress
	revs      map[string]uint64
	unwritten map[string]bool
	unsent    map[string]bool
	uncertain map[string]bool // last write timed out: landed or not?
}

func newProgressBook(js jetstream.JetStream, kv jetstream.KeyValue, op string) *progressBook {
	return &progressBook{js: js, kv: kv, bucket: BucketProgress, op: op, cur: map[string]TargetProgress{},
		revs: map[string]uint64{}, unwritten: map[string]bool{}, unsent: map[string]bool{}, uncertain: map[string]bool{}}
}

// load reads what earlier attempts recorded.
func (b *progressBook) load(ctx context.Context, kv jetstream.KeyValue) error {
	w, err := kv.Watch(ctx, b.op+".*", jetstream.IgnoreDeletes())
	if err != nil {
		return fmt.Errorf("read progress of %s: %w", b.op, err)
	}
	defer func() { _ = w.Stop() }()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case e, ok := <-w.Updates():
			if !ok {
				return fmt.Errorf("read progress of %s: watcher closed", b.op)
			}
			if e == nil {
				return nil
			}
			var pe progressEntry
			if json.Unmarshal(e.Value(), &pe) != nil || pe.Target == "" {
				continue
			}
			b.mu.Lock()
			b.cur[pe.Target] = pe.TargetProgress
			b.revs[pe.Target] = e.Revision()
			b.mu.Unlock()
		}
	}
}

func (b *progressBook) set(target string, p TargetProgress) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.cur[target] = p
	b.unwritten[target] = true
	b.unsent[target] = true
}

func (b *progressBook) get(target string) (TargetProgress, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	p, ok := b.cur[target]
	return p, ok
}

func (b *progressBook) all() map[string]TargetProgress {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make(map[string]TargetProgress, len(b.cur))
	for k, v := range b.cur {
		out[k] = v
	}
	return out
}

// counts is the summary by phase.
func (b *progressBook) counts() map[string]int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.cur) == 0 {
		return nil
	}
	out := map[string]int{}
	for _, p := range b.cur {
		out[p.Phase]++
	}
	return out
}

// takeUnsent returns the targets changed since the last call, sorted.
func (b *progressBook) takeUnsent() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]string, 0, len(b.unsent))
	for t := range b.unsent {
		out = append(out, t)
	}
	clear(b.unsent)
	sort.Strings(out)
	return out
}

// write persists every unwritten target: one compare-and-set publish per
// target, pipelined, then it waits for all of them (each answer is bounded
// by the JetStream context's publish timeout, not by ctx: a write that
// lands must update the revision this attempt expects next). check runs
// first and refuses the batch when this attempt no longer holds the
// operation. A target another attempt wrote meanwhile fails the batch with
// ErrFenced.
func (b *progressBook) write(ctx context.Context, gen, attempt int, check func() error) error {
	if err := b.learnUncertain(ctx, gen, attempt); err != nil {
		return err
	}
	b.mu.Lock()
	if len(b.unwritten) == 0 {
		b.mu.Unlock()
		return nil
	}
	type pending struct {
		target string
		fut    jetstream.PubAckFuture
	}
	var batch []pending
	var errs []error
	if err := check(); err != nil {
		b.mu.Unlock()
		return err
	}
	for target := range b.unwritten {
		data, err := json.Marshal(progressEntry{Target: target, TargetProgress: b.cur[target], Generation: gen, Attempt: attempt})
		if err != nil {
			errs = append(errs, err)
			continue
		}
		m := nats.NewMsg("$KV." + b.bucket + "." + ProgressKey(b.op, target))
		m.Data = data
		m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(b.revs[target], 10))
		fut, err := b.js.PublishMsgAsync(m)
		if err != nil {
			errs = append(errs, fmt.Errorf("write progress %s of %s: %w", target, b.op, err))
			continue
		}
		batch = append(batch, pending{target, fut})
	}
	clear(b.unwritten)
	b.mu.Unlock()

	for _, p := range batch {
		select {
		case ack := <-p.fut.Ok():
			b.mu.Lock()
			b.revs[p.target] = ack.Sequence
			b.mu.Unlock()
		case err := <-p.fut.Err():
			b.mu.Lock()
			b.unwritten[p.target] = true
			if errors.Is(err, jetstream.ErrAsyncPublishTimeout) {
				b.uncertain[p.target] = true // it may have landed: learn its revision before the next write
			}
			b.mu.Unlock()
			if isRevisionConflict(err) {
				err = fmt.Errorf("%w: progress of %s was written by another attempt", ErrFenced, p.target)
			}
			errs = append(errs, fmt.Errorf("write progress %s of %s: %w", p.target, b.op, err))
		}
	}
	return errors.Join(errs...)
}

// learnUncertain reads back the targets whose last write timed out: a
// write of this attempt that landed gives its revision; another attempt's
// write fences this one.
func (b *progressBook) learnUncertain(ctx context.Context, gen, attempt int) error {
	b.mu.Lock()
	var targets []string
	for t := range b.uncertain {
		targets = append(targets, t)
	}
	b.mu.Unlock()
	for _, t := range targets {
		e, err := b.kv.Get(ctx, ProgressKey(b.op, t))
		if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			return fmt.Errorf("read back progress %s of %s: %w", t, b.op, err)
		}
		b.mu.Lock()
		delete(b.uncertain, t)
		if err == nil {
			var pe progressEntry
			if json.Unmarshal(e.Value(), &pe) != nil || pe.Generation != gen || pe.Attempt != attempt {
				b.mu.Unlock()
				return fmt.Errorf("%w: progress of %s was written by another attempt", ErrFenced, t)
			}
			b.revs[t] = e.Revision()
		}
		b.mu.Unlock()
	}
	return nil
}

// purgeProgress removes every target of an operation (a new generation starts clean).
func purgeProgress(ctx context.Context, js jetstream.JetStream, kv jetstream.KeyValue, op string) error {
	keys, err := BucketKeys(ctx, js, BucketProgress, op+".*")
	if err != nil {
		return fmt.Errorf("list progress of %s: %w", op, err)
	}
	for _, key := range keys {
		if err := kv.Purge(ctx, key); err != nil {
			return fmt.Errorf("purge progress %s: %w", key, err)
		}
	}
	return nil
}

// ReadProgressKeys returns every target's progress of an operation the way
// a client without consumer permissions can: the keys from the bucket's
// subject index, then a direct get of each (drover status OPERATION).
func ReadProgressKeys(ctx context.Context, js jetstream.JetStream, kv jetstream.KeyValue, op string) (map[string]TargetProgress, error) {
	keys, err := BucketKeys(ctx, js, BucketProgress, op+".*")
	if err != nil {
		return nil, fmt.Errorf("list progress of %s: %w", op, err)
	}
	out := make(map[string]TargetProgress, len(keys))
	for _, key := range keys {
		e, err := kv.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue // purged meanwhile (a new generation)
		}
		if err != nil {
			return nil, fmt.Errorf("read progress %s: %w", key, err)
		}
		var pe progressEntry
		if json.Unmarshal(e.Value(), &pe) != nil || pe.Target == "" {
			continue
		}
		out[pe.Target] = pe.TargetProgress
	}
	return out, nil
}

// ReadProgress returns every target's progress of an operation.
func ReadProgress(ctx context.Context, kv jetstream.KeyValue, op string) (map[string]TargetProgress, error) {
	b := &progressBook{op: op, cur: map[string]TargetProgress{}, revs: map[string]uint64{}}
	if err := b.load(ctx, kv); err != nil {
		return nil, err
	}
	return b.cur, nil
}
