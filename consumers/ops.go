package consumers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// State is the lifecycle state of an operation record.
type State string

// Operation states. Succeeded, Failed and Cancelled are terminal: a redelivered
// or duplicate event for a terminal operation is acknowledged without acting.
const (
	StatePending   State = "pending"
	StateRunning   State = "running"
	StateSucceeded State = "succeeded"
	StateFailed    State = "failed"
	StateCancelled State = "cancelled"
)

// Terminal reports whether no further work happens for an operation in s.
func (s State) Terminal() bool {
	return s == StateSucceeded || s == StateFailed || s == StateCancelled
}

// TargetProgress is the per-target (usually per-VM) progress of an operation.
type TargetProgress struct {
	Phase   string    `json:"phase"`
	Node    string    `json:"node,omitempty"`
	Message string    `json:"message,omitempty"`
	Updated time.Time `json:"updated"`
}

// Record is an operation record as stored in the drover-ops bucket under its
// operation key. It survives the process: a replica that picks up a
// redelivered message resumes from Progress instead of starting over.
type Record struct {
	Key             string                    `json:"key"`
	Workflow        string                    `json:"workflow"`
	Target          string                    `json:"target"`
	State           State                     `json:"state"`
	EventID         string                    `json:"eventID,omitempty"`
	EventType       string                    `json:"eventType,omitempty"`
	Holder          string                    `json:"holder,omitempty"`
	Attempts        int                       `json:"attempts"`
	CancelRequested bool                      `json:"cancelRequested,omitempty"`
	CancelReason    string                    `json:"cancelReason,omitempty"`
	LastError       string                    `json:"lastError,omitempty"`
	Message         string                    `json:"message,omitempty"`
	Progress        map[string]TargetProgress `json:"progress,omitempty"`
	Created         time.Time                 `json:"created"`
	Updated         time.Time                 `json:"updated"`
	Started         time.Time                 `json:"started,omitempty"`
	Finished        time.Time                 `json:"finished,omitempty"`
}

// OpStore reads and writes operation records with compare-and-set, so that a
// cancel request and the running handler's progress never overwrite each other.
type OpStore struct {
	kv  jetstream.KeyValue
	now func() time.Time
}

// NewOpStore wraps the drover-ops bucket.
func NewOpStore(kv jetstream.KeyValue) *OpStore { return &OpStore{kv: kv, now: time.Now} }

// Get returns the record under key and its revision. A missing record is not
// an error: it returns found == false.
func (s *OpStore) Get(ctx context.Context, key string) (rec Record, rev uint64, found bool, err error) {
	e, err := s.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return Record{}, 0, false, nil
	}
	if err != nil {
		return Record{}, 0, false, fmt.Errorf("get operation %s: %w", key, err)
	}
	if err := json.Unmarshal(e.Value(), &rec); err != nil {
		return Record{}, 0, false, fmt.Errorf("decode operation %s: %w", key, err)
	}
	return rec, e.Revision(), true, nil
}

// errNoChange lets a mutate function decline to write.
var errNoChange = errors.New("no change")

// Mutate applies fn to the current record (a zero Record with Key set when
// none exists) and writes it back with compare-and-set, retrying on conflict.
// If fn returns errNoChange nothing is written and the current record is
// returned.
func (s *OpStore) Mutate(ctx context.Context, key string, fn func(r *Record) error) (Record, error) {
	for attempt := 0; ; attempt++ {
		cur, rev, found, err := s.Get(ctx, key)
		if err != nil {
			return Record{}, err
		}
		next := cur
		if !found {
			next = Record{Key: key, State: StatePending, Created: s.now().UTC()}
		}
		next.Progress = cloneProgress(cur.Progress)
		if err := fn(&next); err != nil {
			if errors.Is(err, errNoChange) {
				return cur, nil
			}
			return cur, err
		}
		next.Updated = s.now().UTC()
		b, err := json.Marshal(next)
		if err != nil {
			return cur, fmt.Errorf("encode operation %s: %w", key, err)
		}
		if found {
			_, err = s.kv.Update(ctx, key, b, rev)
		} else {
			_, err = s.kv.Create(ctx, key, b)
		}
		if err == nil {
			return next, nil
		}
		if !isRevisionConflict(err) || attempt >= 20 {
			return cur, fmt.Errorf("write operation %s: %w", key, err)
		}
	}
}

// List returns the records whose keys match the KV filter (wildcards allowed),
// sorted by creation time.
func (s *OpStore) List(ctx context.Context, filter string) ([]Record, error) {
	lister, err := s.kv.ListKeysFiltered(ctx, filter)
	if err != nil {
		return nil, fmt.Errorf("list operations %s: %w", filter, err)
	}
	var out []Record
	seen := map[string]bool{}
	for key := range lister.Keys() {
		if seen[key] {
			continue
		}
		seen[key] = true
		rec, _, found, err := s.Get(ctx, key)
		if err != nil {
			return nil, err
		}
		if found {
			out = append(out, rec)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Created.Before(out[j].Created) })
	return out, nil
}

// RequestCancel marks every pending or running operation matching filter as
// cancel-requested; the handler running it sees Operation.Cancelled close and
// finishes cleanly. When filter names one key (no wildcard) and no record
// exists yet, it records the operation as cancelled so that its request, if it
// arrives later, is skipped; workflow and target label that record. It
// returns the keys it marked.
func (s *OpStore) RequestCancel(ctx context.Context, filter, reason, workflow, target string) ([]string, error) {
	var keys []string
	if !hasWildcard(filter) {
		keys = []string{filter}
	} else {
		recs, err := s.List(ctx, filter)
		if err != nil {
			return nil, err
		}
		for _, r := range recs {
			if !r.State.Terminal() {
				keys = append(keys, r.Key)
			}
		}
	}
	var marked []string
	for _, key := range keys {
		_, err := s.Mutate(ctx, key, func(r *Record) error {
			switch {
			case r.State.Terminal(), r.CancelRequested:
				return errNoChange
			case r.Attempts == 0 && r.State == StatePending:
				// Never started: nothing to abort, so it is cancelled outright.
				r.State = StateCancelled
				r.Finished = s.now().UTC()
				if r.Workflow == "" {
					r.Workflow, r.Target = workflow, target
				}
			}
			r.CancelRequested = true
			r.CancelReason = reason
			return nil
		})
		if err != nil {
			return marked, err
		}
		marked = append(marked, key)
	}
	return marked, nil
}

func hasWildcard(s string) bool {
	for _, c := range s {
		if c == '*' || c == '>' {
			return true
		}
	}
	return false
}

func cloneProgress(p map[string]TargetProgress) map[string]TargetProgress {
	if p == nil {
		return nil
	}
	out := make(map[string]TargetProgress, len(p))
	for k, v := range p {
		out[k] = v
	}
	return out
}

// Operation is a handler's view of its operation record: the state it resumes
// from, a way to record per-target progress, and a signal when a cancel
// request arrives. It hides the KV bucket from handlers.
type Operation struct {
	store     *OpStore
	start     Record
	onUpdate  func(context.Context, Record)
	cancelled chan struct{}
	once      sync.Once
}

// Key is the operation key.
func (o *Operation) Key() string { return o.start.Key }

// Resumed is the record as it stood when this attempt started: Attempts > 1
// and a non-empty Progress mean an earlier attempt did part of the work.
func (o *Operation) Resumed() Record { return o.start }

// Done reports whether an earlier attempt recorded target as finished with phase.
func (o *Operation) Done(target, phase string) bool {
	p, ok := o.start.Progress[target]
	return ok && p.Phase == phase
}

// Progress records the progress of one target and publishes a status event.
func (o *Operation) Progress(ctx context.Context, target string, p TargetProgress) error {
	if p.Updated.IsZero() {
		p.Updated = o.store.now().UTC()
	}
	rec, err := o.store.Mutate(ctx, o.start.Key, func(r *Record) error {
		if r.Progress == nil {
			r.Progress = map[string]TargetProgress{}
		}
		r.Progress[target] = p
		return nil
	})
	if err != nil {
		return err
	}
	o.start.Progress = cloneProgress(rec.Progress)
	if o.onUpdate != nil {
		o.onUpdate(ctx, rec)
	}
	return nil
}

// Cancelled is closed when a cancel request for this operation arrives
// (maintenance.ended, vm.migrate.cancelled). The handler should abort what is
// still in flight and return nil; the runtime then records it cancelled.
func (o *Operation) Cancelled() <-chan struct{} { return o.cancelled }

func (o *Operation) markCancelled() { o.once.Do(func() { close(o.cancelled) }) }
