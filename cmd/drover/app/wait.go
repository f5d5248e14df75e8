package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/maintenance"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// follow says which operation a published request starts, for --wait.
type follow struct {
	op       string
	workflow string
	target   string
	// okCancelled: a cancelled operation is the expected end (a cancel request).
	okCancelled bool
}

// errOperation is an operation that failed, was rejected or cancelled: exit 1.
var errOperation = errors.New("operation did not complete")

// publishAndWait publishes one event like publishOne, then, when f is not
// nil, follows the operation's status until it ends: it prints per-VM
// progress lines and returns nil when the operation succeeded, an error
// wrapping errOperation (exit 1, with the reason) when it failed, was
// rejected or was cancelled.
func (c *cli) publishAndWait(client ClientOptions, id string, p schemas.Payload, f *follow) error {
	if f == nil {
		return c.publishOne(client, id, p)
	}
	e, nc, js, err := c.prepare(client, id, p)
	if err != nil {
		return err
	}
	defer nc.Close()
	subject, err := schemas.StatusSubject(f.workflow, f.target)
	if err != nil {
		return usageError{err}
	}
	// Subscribe before publishing, so that no status event is missed.
	cons, err := js.OrderedConsumer(c.ctx, consumers.StreamStatus, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{subject}, DeliverPolicy: jetstream.DeliverNewPolicy})
	if err != nil {
		return fmt.Errorf("follow %s: %w (has drover serve run against this NATS?)", f.op, err)
	}
	pctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
	res, err := (&producers.Publisher{JS: js}).Publish(pctx, e)
	cancel()
	if err != nil {
		return err
	}
	dup := ""
	if res.Duplicate {
		dup = " (a duplicate: JetStream already had this event)"
	}
	fmt.Fprintf(c.out, "published %s %s on %s%s; following operation %s\n", e.Type(), res.ID, res.Subject, dup, f.op)

	kv, err := js.KeyValue(c.ctx, consumers.BucketOps)
	if err != nil {
		return fmt.Errorf("open %s: %w", consumers.BucketOps, err)
	}
	store := consumers.NewOpStore(kv)
	for {
		// The record says when it is over, even when its final status
		// event went out before we subscribed (a duplicate request).
		if rec, _, found, err := store.Get(c.ctx, f.op); err == nil && found && rec.State.Terminal() {
			// Drain what is already delivered, then conclude.
			c.printPending(cons, f.op)
			return c.conclude(rec, f)
		}
		msg, err := cons.Next(jetstream.FetchMaxWait(2 * time.Second))
		if err != nil {
			if c.ctx.Err() != nil {
				return c.ctx.Err()
			}
			if errors.Is(err, nats.ErrTimeout) || errors.Is(err, jetstream.ErrNoMessages) {
				continue
			}
			return fmt.Errorf("follow %s: %w", f.op, err)
		}
		st, at, ok := c.decodeStatus(msg)
		if !ok || st.Operation != f.op {
			continue
		}
		c.printStatus(st, at)
	}
}

// printPending prints the status events already waiting in cons.
func (c *cli) printPending(cons jetstream.Consumer, op string) {
	for {
		msg, err := cons.Next(jetstream.FetchMaxWait(300 * time.Millisecond))
		if err != nil {
			return
		}
		if st, at, ok := c.decodeStatus(msg); ok && st.Operation == op {
			c.printStatus(st, at)
		}
	}
}

func (c *cli) decodeStatus(m jetstream.Msg) (*schemas.Status, string, bool) {
	e, err := schemas.FromHeaders(m.Headers(), m.Data())
	if err != nil {
		return nil, "", false
	}
	p, err := schemas.Decode(e)
	st, ok := p.(*schemas.Status)
	if err != nil || !ok {
		return nil, "", false
	}
	return st, e.Time().Local().Format("15:04:05"), true
}

// printStatus prints one status event: its phase line, then a line per VM.
func (c *cli) printStatus(st *schemas.Status, at string) {
	counts := ""
	if st.Summary != nil {
		counts = fmt.Sprintf(" [%d VMs]", st.Summary.Total)
	}
	if st.Message != "" || len(st.VMs) == 0 || st.Phase != schemas.PhaseRunning {
		fmt.Fprintf(c.out, "%s  %-9s %s%s %s\n", at, st.Phase, st.Target(), counts, oneLine(st.Message))
	}
	c.printVMs(st, at)
}

// conclude prints how the operation ended and maps it to the exit status.
func (c *cli) conclude(rec consumers.Record, f *follow) error {
	if rec.Workflow == schemas.WorkflowMaintenance && strings.HasPrefix(rec.Key, "maintenance") && len(rec.Data) > 0 {
		var st maintenance.State
		if json.Unmarshal(rec.Data, &st) == nil && st.Plan.Node != "" && (st.Outcome == "planned" || st.Outcome == "rejected") {
			fmt.Fprint(c.out, st.Plan.Text())
		}
	}
	msg := rec.Message
	if rec.State == consumers.StateFailed && rec.LastError != "" {
		msg = rec.LastError
	}
	fmt.Fprintf(c.out, "operation %s %s: %s\n", rec.Key, rec.State, msg)
	switch {
	case rec.State == consumers.StateSucceeded:
		return nil
	case rec.State == consumers.StateCancelled && f.okCancelled:
		return nil
	case rec.State == consumers.StateCancelled:
		return fmt.Errorf("%w: cancelled: %s", errOperation, orText(rec.CancelReason, msg))
	default:
		return fmt.Errorf("%w: %s", errOperation, msg)
	}
}

func orText(a, b string) string {
	if a != "" {
		return a
	}
	return b
}
