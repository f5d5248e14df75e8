package consumers

import (
	"errors"
	"fmt"
	"time"
)

// TerminalError marks a failure that no retry can mend (a malformed event, a
// target that does not exist, a request the cluster refuses for good). The
// runtime dead-letters the message with the error as reason and terminates it.
type TerminalError struct{ Err error }

func (e *TerminalError) Error() string { return "terminal: " + e.Err.Error() }
func (e *TerminalError) Unwrap() error { return e.Err }

// Terminal wraps err so that the runtime dead-letters the message instead of
// retrying it. Terminal(nil) is nil.
func Terminal(err error) error {
	if err == nil {
		return nil
	}
	return &TerminalError{Err: err}
}

// Terminalf is Terminal(fmt.Errorf(format, args...)).
func Terminalf(format string, args ...any) error { return Terminal(fmt.Errorf(format, args...)) }

// IsTerminal reports whether err, or an error it wraps, is a TerminalError.
func IsTerminal(err error) bool {
	var t *TerminalError
	return errors.As(err, &t)
}

// WaitError is the outcome of a handler that cannot go on until something
// outside drover happens (a node is fenced, a disruption budget allows an
// eviction). The runtime records the operation waiting with Reason, releases
// the worker slot and runs the handler again After later. Waiting does not
// count against the operation's attempts (its age still does). The node
// leases stay reserved for the operation meanwhile, up to the lease TTL, so
// that a lower-priority workflow does not slip in between two checks.
type WaitError struct {
	After  time.Duration
	Reason string
	// Gate names what the handler waits for, in a word (the "reason" label
	// of drover_gate_waits_total): fencing, storm, eviction...; "" is "other".
	Gate string
}

func (e *WaitError) Error() string { return fmt.Sprintf("waiting %s: %s", e.After, e.Reason) }

// Wait returns the outcome "check again after d": see WaitError.
func Wait(d time.Duration, reason string) error { return &WaitError{After: d, Reason: reason} }

// WaitFor is Wait naming the gate the handler waits at (a short word, the
// metric label): drover_gate_waits_total counts the waits by gate.
func WaitFor(d time.Duration, gate, reason string) error {
	return &WaitError{After: d, Reason: reason, Gate: gate}
}

// YieldError is the outcome of a handler that saw Operation.Preempted,
// checkpointed and stopped so that a higher-priority operation can take its
// node. The runtime records the operation suspended, hands the lease to the
// waiter and runs the handler again once the lease is free; the handler then
// re-plans from the live cluster.
type YieldError struct{ Reason string }

func (e *YieldError) Error() string { return "yielded: " + e.Reason }

// Yield returns the outcome "pre-empted, checkpointed, resume later".
func Yield(reason string) error { return &YieldError{Reason: reason} }

// ErrLeaseLost is the cause of a handler context cancelled because the
// runtime could not renew the lease in time: another worker may act on the
// same node once the lease expires on the server, so the handler must stop
// touching it. It is cancelled LeaseMargin before that can happen.
var ErrLeaseLost = errors.New("lease lost")

// ErrPreempted is the cause of a handler context cancelled because a
// higher-priority operation asked for its node and the handler did not yield
// within Config.YieldGrace. The runtime treats it as a yield.
var ErrPreempted = errors.New("pre-empted by a higher-priority operation")

// ErrShuttingDown is the cause of a handler context cancelled because the
// runtime is stopping and the shutdown grace ran out; the message is handed
// back for another replica.
var ErrShuttingDown = errors.New("runtime shutting down")

// ErrFenced is returned by Operation writes made by an attempt that is no
// longer the operation's current holder (its lease was lost, or another
// attempt took over): its writes would corrupt what the successor resumes
// from, so they are refused.
var ErrFenced = errors.New("operation is held by another attempt")
