package consumers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// State is the lifecycle state of an operation record.
type State string

// Operation states. Succeeded, Failed and Cancelled are terminal: a redelivered
// or duplicate event for a terminal operation is acknowledged without acting
// (until `drover op retry` or `drover dlq replay` starts a new generation).
const (
	StatePending   State = "pending"   // not started, or between attempts after a failure
	StateRunning   State = "running"   // a handler runs it now, holding its leases
	StateWaiting   State = "waiting"   // waits for something outside drover; checked again at Due
	StateSuspended State = "suspended" // pre-empted by a higher-priority operation; resumes later
	StateSucceeded State = "succeeded"
	StateFailed    State = "failed"
	StateCancelled State = "cancelled"
)

// Terminal reports whether no further work happens for an operation in s.
func (s State) Terminal() bool {
	return s == StateSucceeded || s == StateFailed || s == StateCancelled
}

// YieldRequest records that a higher-priority operation asked the holder of
// a shared lease to yield.
type YieldRequest struct {
	By       string    `json:"by"`
	Workflow string    `json:"workflow,omitempty"`
	Priority int       `json:"priority"`
	At       time.Time `json:"at"`
}

// Record is an operation record as stored in the drover-ops bucket under its
// operation key. It survives the process: a replica that picks up a
// redelivered message resumes from the checkpoint (Phase, Data) and the
// per-target progress (drover-progress bucket) instead of starting over.
type Record struct {
	Key      string `json:"key"`
	Workflow string `json:"workflow"`
	Target   string `json:"target"`
	State    State  `json:"state"`
	// Generation starts at 1 and grows each time the operation is retried
	// by hand or its dead letter is replayed: a new generation runs again.
	Generation int `json:"generation"`
	// Attempts counts handler runs in this generation; with Generation and
	// the key it is the fencing token of the current run.
	Attempts int `json:"attempts"`
	// Charged counts the runs that used the operation's budget (runs that
	// ended waiting, pre-empted or by shutdown are refunded).
	Charged   int    `json:"charged"`
	Holder    string `json:"holder,omitempty"`
	EventID   string `json:"eventID,omitempty"`
	EventType string `json:"eventType,omitempty"`
	// Request is the CloudEvent (structured JSON) that created the
	// operation, so that a retry can re-publish it.
	Request json.RawMessage `json:"request,omitempty"`
	// Seq is the request-stream sequence of the message that drives the
	// operation now; LastSeen is when a replica last took it and Due when
	// the next delivery is expected. The reconciler finds orphans with them.
	Seq uint64 `json:"seq,omitempty"`
	// Leases are the lease keys the running attempt holds.
	Leases   []string  `json:"leases,omitempty"`
	LastSeen time.Time `json:"lastSeen,omitzero"`
	Due      time.Time `json:"due,omitzero"`

	CancelRequested bool   `json:"cancelRequested,omitempty"`
	CancelReason    string `json:"cancelReason,omitempty"`
	// Uncancellable says why a cancel request is refused now (a recovery
	// past its fencing gate).
	Uncancellable string        `json:"uncancellable,omitempty"`
	Yield         *YieldRequest `json:"yield,omitempty"`

	// Phase, Message and Data are the handler's checkpoint.
	Phase   string          `json:"phase,omitempty"`
	Message string          `json:"message,omitempty"`
	Data    json.RawMessage `json:"data,omitempty"`
	// Summary counts the operation's targets by phase.
	Summary   map[string]int `json:"summary,omitempty"`
	LastError string         `json:"lastError,omitempty"`
	// WaitReason says what a waiting or suspended operation waits for.
	WaitReason string `json:"waitReason,omitempty"`

	Created  time.Time `json:"created"`
	Updated  time.Time `json:"updated"`
	Started  time.Time `json:"started,omitzero"`
	Finished time.Time `json:"finished,omitzero"`
}

// Token is the fencing token of the record's current attempt.
func (r Record) Token() string {
	return fmt.Sprintf("%s/g%d/a%d", r.Key, max(r.Generation, 1), r.Attempts)
}

// Total is the number of targets the summary counts.
func (r Record) Total() int {
	n := 0
	for _, c := range r.Summary {
		n += c
	}
	return n
}

// OpStore reads and writes operation records with compare-and-set, so that a
// cancel request and the running handler's checkpoint never overwrite each other.
type OpStore struct {
	kv jetstream.KeyValue
	// js, when set (OpenOpStore), lists keys from the stream's subject
	// index instead of with a KV watcher.
	js  jetstream.JetStream
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

// put writes next at rev (0: create) and returns the new revision.
func (s *OpStore) put(ctx context.Context, next *Record, rev uint64) (uint64, error) {
	next.Updated = s.now().UTC()
	b, err := json.Marshal(next)
	if err != nil {
		return 0, fmt.Errorf("encode operation %s: %w", next.Key, err)
	}
	if rev == 0 {
		return s.kv.Create(ctx, next.Key, b)
	}
	return s.kv.Update(ctx, next.Key, b, rev)
}

// Mutate applies fn to the current record (a zero Record with Key set when
// none exists) and writes it back with compare-and-set, retrying on conflict.
// If fn returns errNoChange nothing is written and the current record is
// returned; any other error from fn is returned as is.
func (s *OpStore) Mutate(ctx context.Context, key string, fn func(r *Record) error) (Record, error) {
	rec, _, err := s.mutateFrom(ctx, key, Record{}, 0, false, fn)
	return rec, err
}

// mutateFrom is Mutate starting from a record the caller already read at
// rev (known), which saves the first read when nobody wrote in between. It
// returns the written record and its revision.
func (s *OpStore) mutateFrom(ctx context.Context, key string, cur Record, rev uint64, known bool, fn func(r *Record) error) (Record, uint64, error) {
	for attempt := 0; ; attempt++ {
		found := rev > 0
		if !known {
			var err error
			cur, rev, found, err = s.Get(ctx, key)
			if err != nil {
				return Record{}, 0, err
			}
		}
		known = false
		next := cur
		if !found {
			next = Record{Key: key, State: StatePending, Generation: 1, Created: s.now().UTC()}
		}
		next.Summary = cloneCounts(cur.Summary)
		if err := fn(&next); err != nil {
			if errors.Is(err, errNoChange) {
				return cur, rev, nil
			}
			return cur, rev, err
		}
		nrev, err := s.put(ctx, &next, rev)
		if err == nil {
			return next, nrev, nil
		}
		if !isRevisionConflict(err) || attempt >= 20 {
			return cur, rev, fmt.Errorf("write operation %s: %w", key, err)
		}
	}
}

// List returns the records whose keys match the KV filter (wildcards allowed),
// sorted by creation time. Node state records are not operations and are left out.
func (s *OpStore) List(ctx context.Context, filter string) ([]Record, error) {
	keys, err := s.keys(ctx, filter)
	if err != nil {
		return nil, fmt.Errorf("list operations %s: %w", filter, err)
	}
	var out []Record
	seen := map[string]bool{}
	for _, key := range keys {
		if seen[key] || strings.HasPrefix(key, nodeStatePrefix) || strings.HasPrefix(key, routePrefix) {
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

// CancelResult says what RequestCancel did.
type CancelResult struct {
	Marked  []string          // operations marked cancel-requested (or cancelled outright)
	Refused map[string]string // operation -> why it can no longer be cancelled
	// Cancelled are the marked operations that never started and so were
	// cancelled outright (final now), by workflow.
	Cancelled map[string][]string
}

// RequestCancel marks every pending, waiting, suspended or running operation
// matching filter as cancel-requested; the handler running it sees
// Operation.Cancelled close and finishes cleanly. An operation that marked
// itself uncancellable (a recovery past its fencing gate) is left alone and
// reported in Refused. When filter names one key (no wildcard) and no record
// exists yet, it records the operation as cancelled so that its request, if
// it arrives later, is skipped; workflow and target label that record.
func (s *OpStore) RequestCancel(ctx context.Context, filter, reason, workflow, target string) (CancelResult, error) {
	res := CancelResult{Refused: map[string]string{}}
	var keys []string
	if !hasWildcard(filter) {
		keys = []string{filter}
	} else {
		recs, err := s.List(ctx, filter)
		if err != nil {
			return res, err
		}
		for _, r := range recs {
			if !r.State.Terminal() {
				keys = append(keys, r.Key)
			}
		}
	}
	for _, key := range keys {
		var refused, outright string
		_, err := s.Mutate(ctx, key, func(r *Record) error {
			outright = ""
			switch {
			case r.State.Terminal(), r.CancelRequested:
				return errNoChange
			case r.Uncancellable != "":
				refused = r.Uncancellable
				return errNoChange
			case r.Attempts == 0 && r.State == StatePending:
				// Never started: nothing to abort, so it is cancelled outright.
				r.State = StateCancelled
				r.Finished = s.now().UTC()
				if r.Workflow == "" {
					r.Workflow, r.Target = workflow, target
				}
				outright = r.Workflow
			}
			r.CancelRequested = true
			r.CancelReason = reason
			return nil
		})
		if err != nil {
			return res, err
		}
		if refused != "" {
			res.Refused[key] = refused
			continue
		}
		res.Marked = append(res.Marked, key)
		if outright != "" {
			if res.Cancelled == nil {
				res.Cancelled = map[string][]string{}
			}
			res.Cancelled[outright] = append(res.Cancelled[outright], key)
		}
	}
	return res, nil
}

// requestYield asks the operation holding a lease to yield to by. It returns
// false when the record does not exist, is not running, or already has a
// request from an operation of the same or higher priority.
func (s *OpStore) requestYield(ctx context.Context, key string, by YieldRequest) (bool, error) {
	asked := false
	_, err := s.Mutate(ctx, key, func(r *Record) error {
		if r.State != StateRunning || (r.Yield != nil && r.Yield.Priority >= by.Priority) {
			return errNoChange
		}
		r.Yield = &by
		asked = true
		return nil
	})
	return asked, err
}

// Reset starts a new generation of the operation: pending, budget and
// checkpoint cleared, so that its next delivery really runs it again. It
// returns the new record.
func (s *OpStore) Reset(ctx context.Context, key, why string) (Record, error) {
	if _, _, found, err := s.Get(ctx, key); err != nil || !found {
		return Record{}, err // nothing to reset: the replayed message creates it
	}
	return s.Mutate(ctx, key, func(r *Record) error {
		if r.State == StateRunning {
			return fmt.Errorf("operation %s is running (holder %s); it cannot be reset now", key, r.Holder)
		}
		r.Generation = max(r.Generation, 1) + 1
		r.State, r.Attempts, r.Charged, r.Holder = StatePending, 0, 0, ""
		r.CancelRequested, r.CancelReason, r.Uncancellable, r.Yield = false, "", "", nil
		r.Phase, r.Message, r.Data, r.Summary = "", why, nil, nil
		r.LastError, r.WaitReason = "", ""
		r.Started, r.Finished, r.Due = time.Time{}, time.Time{}, time.Time{}
		return nil
	})
}

// keys returns the keys matching filter.
func (s *OpStore) keys(ctx context.Context, filter string) ([]string, error) {
	if s.js != nil {
		return BucketKeys(ctx, s.js, BucketOps, filter)
	}
	lister, err := s.kv.ListKeysFiltered(ctx, filter)
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var keys []string
	for k := range lister.Keys() {
		keys = append(keys, k)
	}
	return keys, nil
}

func hasWildcard(s string) bool { return strings.ContainsAny(s, "*>") }

func cloneCounts(m map[string]int) map[string]int {
	if m == nil {
		return nil
	}
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
