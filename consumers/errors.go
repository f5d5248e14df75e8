package consumers

import (
	"errors"
	"fmt"
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

// ErrLeaseLost is the cause of a handler context cancelled because the
// runtime could not renew the lease on the handler's lock: another worker may
// now act on the same node, so the handler must stop touching it.
var ErrLeaseLost = errors.New("lease lost")

// ErrShuttingDown is the cause of a handler context cancelled because the
// runtime is stopping and the shutdown grace ran out; the message is left for
// another replica.
var ErrShuttingDown = errors.New("runtime shutting down")
