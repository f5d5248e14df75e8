package app

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

func (c *cli) dlqCommand() *cobra.Command {
	return group("dlq", "list, show and replay dead letters (requests drover gave up on)",
		c.dlqListCommand(), c.dlqShowCommand(), c.dlqReplayCommand())
}

// deadLetterRow is a dead letter as `dlq list -o json|yaml` prints it.
type deadLetterRow struct {
	Seq        uint64    `json:"seq"`
	Time       time.Time `json:"time"`
	Workflow   string    `json:"workflow"`
	Subject    string    `json:"subject"`
	Deliveries uint64    `json:"deliveries"`
	Reason     string    `json:"reason"`
	Data       string    `json:"data"`
}

func (c *cli) dlqListCommand() *cobra.Command {
	var client ClientOptions
	cmd := &cobra.Command{Use: "list", Short: "list dead letters, oldest first", Args: noArgs}
	out := outputFlag(cmd)
	limit := cmd.Flags().Int("limit", 0, "list at most this many (0: all)")
	return c.leaf(cmd, &client, func([]string) error {
		if err := checkOutput(*out); err != nil {
			return err
		}
		nc, js, err := client.connect(c.ctx)
		if err != nil {
			return err
		}
		defer nc.Close()
		dls, err := consumers.ListDeadLetters(c.ctx, js, *limit)
		if err != nil {
			return err
		}
		if *out != "table" {
			rows := make([]deadLetterRow, 0, len(dls))
			for _, d := range dls {
				rows = append(rows, deadLetterRow{d.Seq, d.Time, d.Workflow, d.Subject, d.Deliveries, d.Reason, string(d.Data)})
			}
			return write(c.out, *out, rows)
		}
		tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SEQ\tTIME\tWORKFLOW\tSUBJECT\tDELIVERIES\tREASON")
		for _, d := range dls {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%s\n", d.Seq, d.Time.Local().Format("2006-01-02 15:04:05"), d.Workflow, d.Subject, d.Deliveries, oneLine(d.Reason))
		}
		return tw.Flush()
	})
}

// parseSeq reads a dead letter's sequence number.
func parseSeq(s string) (uint64, error) {
	seq, err := strconv.ParseUint(s, 10, 64)
	if err != nil || seq == 0 {
		return 0, usagef("SEQ must be a positive dead-letter sequence number (drover dlq list shows them), got %q", s)
	}
	return seq, nil
}

// DeadLetterView is one dead letter as `drover dlq show` prints it.
type DeadLetterView struct {
	Seq        uint64              `json:"seq"`
	Time       time.Time           `json:"time"`
	Workflow   string              `json:"workflow"`
	Target     string              `json:"target,omitempty"`
	Operation  string              `json:"operation,omitempty"`
	Subject    string              `json:"subject"`
	StreamSeq  uint64              `json:"streamSeq,omitempty"`
	Deliveries uint64              `json:"deliveries"`
	Reason     string              `json:"reason"`
	Headers    map[string][]string `json:"headers,omitempty"`
	// Event is the dead-lettered CloudEvent in its structured JSON form
	// when the message is one; otherwise Data holds the body as it is.
	Event json.RawMessage `json:"event,omitempty"`
	Data  string          `json:"data,omitempty"`
}

func (c *cli) dlqShowCommand() *cobra.Command {
	var client ClientOptions
	cmd := &cobra.Command{
		Use:   "show SEQ",
		Short: "show one dead letter: why, its headers, how often it was delivered and its event",
		Args:  exactArgs(1),
	}
	out := outputFlag(cmd)
	return c.leaf(cmd, &client, func(pos []string) error {
		seq, err := parseSeq(pos[0])
		if err != nil {
			return err
		}
		if err := checkOutput(*out); err != nil {
			return err
		}
		nc, js, err := client.connect(c.ctx)
		if err != nil {
			return err
		}
		defer nc.Close()
		view, err := c.readDeadLetter(js, seq)
		if err != nil {
			return err
		}
		if *out != "table" {
			return write(c.out, *out, view)
		}
		return printDeadLetter(c, view)
	})
}

// readDeadLetter reads dead letter seq from consumers.StreamDLQ.
func (c *cli) readDeadLetter(js jetstream.JetStream, seq uint64) (DeadLetterView, error) {
	s, err := js.Stream(c.ctx, consumers.StreamDLQ)
	if err != nil {
		return DeadLetterView{}, fmt.Errorf("open stream %s: %w (has drover serve run against this NATS?)", consumers.StreamDLQ, err)
	}
	raw, err := s.GetMsg(c.ctx, seq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return DeadLetterView{}, fmt.Errorf("dead letter %d does not exist (replayed or never written; drover dlq list shows them)", seq)
	}
	if err != nil {
		return DeadLetterView{}, fmt.Errorf("read dead letter %d: %w (retry)", seq, err)
	}
	h := raw.Header
	deliveries, _ := strconv.ParseUint(h.Get(consumers.HeaderDLQDeliveries), 10, 64)
	streamSeq, _ := strconv.ParseUint(h.Get(consumers.HeaderDLQStreamSeq), 10, 64)
	v := DeadLetterView{
		Seq: raw.Sequence, Time: raw.Time, Workflow: h.Get(consumers.HeaderDLQWorkflow),
		Target: h.Get(consumers.HeaderDLQTarget), Operation: h.Get(consumers.HeaderDLQOperation),
		Subject: h.Get(consumers.HeaderDLQSubject), StreamSeq: streamSeq, Deliveries: deliveries,
		Reason: h.Get(consumers.HeaderDLQReason), Headers: map[string][]string(h),
	}
	if e, err := schemas.FromHeaders(h, raw.Data); err == nil {
		if b, err := json.Marshal(e); err == nil {
			v.Event = b
			return v, nil
		}
	}
	if json.Valid(raw.Data) {
		v.Event = raw.Data
		return v, nil
	}
	if utf8.Valid(raw.Data) {
		v.Data = string(raw.Data)
	} else {
		v.Data = fmt.Sprintf("%q", raw.Data)
	}
	return v, nil
}

func printDeadLetter(c *cli, v DeadLetterView) error {
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	row := func(k, val string) {
		if val != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, val)
		}
	}
	row("Dead letter", strconv.FormatUint(v.Seq, 10))
	row("Time", v.Time.Local().Format(time.DateTime))
	row("Workflow", v.Workflow)
	row("Operation", v.Operation)
	row("Target", v.Target)
	row("Subject", v.Subject)
	if v.StreamSeq > 0 {
		row("Stream seq", fmt.Sprintf("%d (%s)", v.StreamSeq, consumers.StreamRequests))
	}
	row("Deliveries", strconv.FormatUint(v.Deliveries, 10))
	row("Reason", v.Reason)
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(c.out, "Headers:")
	keys := make([]string, 0, len(v.Headers))
	for k := range v.Headers {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(c.out, "  %s: %s\n", k, strings.Join(v.Headers[k], ", "))
	}
	if len(v.Event) > 0 {
		var b bytes.Buffer
		if err := json.Indent(&b, v.Event, "  ", "  "); err != nil {
			b.Reset()
			b.Write(v.Event)
		}
		fmt.Fprintf(c.out, "Event:\n  %s\n", b.String())
	} else {
		fmt.Fprintf(c.out, "Body (not JSON):\n  %s\n", v.Data)
	}
	fmt.Fprintf(c.out, "Replay it with: drover dlq replay %d\n", v.Seq)
	return nil
}

func (c *cli) dlqReplayCommand() *cobra.Command {
	var client ClientOptions
	cmd := &cobra.Command{
		Use:   "replay SEQ",
		Short: "send a dead letter back to its workflow: its operation runs again as a new generation",
		Args:  exactArgs(1),
	}
	return c.leaf(cmd, &client, func(pos []string) error {
		seq, err := parseSeq(pos[0])
		if err != nil {
			return err
		}
		nc, js, err := client.connect(c.ctx)
		if err != nil {
			return err
		}
		defer nc.Close()
		res, _, err := consumers.ReplayDeadLetter(c.ctx, js, seq)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.out, "replayed dead letter %d to %s (stream %s seq %d); removed it from %s\n",
			seq, res.Subject, res.Ack.Stream, res.Ack.Sequence, consumers.StreamDLQ)
		if res.Operation != "" {
			fmt.Fprintf(c.out, "operation %s runs again as generation %d\n", res.Operation, res.Generation)
		}
		return nil
	})
}

// opCommand reads and repairs operations.
func (c *cli) opCommand() *cobra.Command {
	var client ClientOptions
	cmd := &cobra.Command{
		Use:   "retry OPERATION",
		Short: "run a failed or cancelled operation again as a new generation (its request is re-published)",
		Args:  exactArgs(1),
	}
	retry := c.leaf(cmd, &client, func(pos []string) error {
		nc, js, err := client.connect(c.ctx)
		if err != nil {
			return err
		}
		defer nc.Close()
		res, err := consumers.RetryOperation(c.ctx, js, pos[0])
		if err != nil {
			return err
		}
		fmt.Fprintf(c.out, "operation %s runs again as generation %d: its request was published to %s (stream %s seq %d)\n",
			res.Operation, res.Generation, res.Subject, res.Ack.Stream, res.Ack.Sequence)
		return nil
	})
	return group("op", "repair operations", retry)
}
