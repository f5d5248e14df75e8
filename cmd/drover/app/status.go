package app

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

func checkOutput(o string) error {
	if o != "table" && o != "json" {
		return usagef("-o must be table or json, got %q", o)
	}
	return nil
}

func (c *cli) status(args []string) error {
	cmd := c.command("drover status [--watch] [-o table|json]")
	watch := cmd.fs.Bool("watch", false, "keep printing status events as they happen")
	out := cmd.fs.String("o", "table", "output format: table or json")
	if _, err := cmd.parse(args, 0); err != nil {
		return err
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	nc, js, err := cmd.client.connect(c.ctx)
	if err != nil {
		return err
	}
	defer nc.Close()
	recs, err := listOperations(c.ctx, js, ">")
	if err != nil {
		return err
	}
	if *out == "json" {
		if err := writeJSON(c.out, recs); err != nil {
			return err
		}
	} else {
		printRecords(c.out, recs)
	}
	if !*watch {
		return nil
	}
	return c.watchStatus(nc, *out)
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printRecords(w io.Writer, recs []consumers.Record) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "OPERATION\tWORKFLOW\tTARGET\tSTATE\tVMS\tATTEMPTS\tUPDATED\tMESSAGE")
	for _, r := range recs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", r.Key, r.Workflow, r.Target, r.State, vmCounts(r), r.Attempts,
			r.Updated.Local().Format("15:04:05"), summary(r))
	}
	_ = tw.Flush()
}

// vmCounts is "done/total" of a record's targets, "-" when it has none.
func vmCounts(r consumers.Record) string {
	if r.Total() == 0 {
		return "-"
	}
	done := 0
	for phase, n := range r.Summary {
		if consumers.TargetDone(phase) {
			done += n
		}
	}
	return fmt.Sprintf("%d/%d", done, r.Total())
}

// summary is one line about a record: what it waits for, its error, else
// its message and phase counts.
func summary(r consumers.Record) string {
	switch {
	case r.WaitReason != "" && (r.State == consumers.StateWaiting || r.State == consumers.StateSuspended):
		return oneLine(r.WaitReason)
	case r.LastError != "":
		return oneLine(r.LastError)
	}
	phases := make([]string, 0, len(r.Summary))
	for p := range r.Summary {
		phases = append(phases, p)
	}
	sort.Strings(phases)
	parts := []string{}
	if r.Message != "" {
		parts = append(parts, r.Message)
	}
	for _, p := range phases {
		parts = append(parts, fmt.Sprintf("%s %d", p, r.Summary[p]))
	}
	return oneLine(strings.Join(parts, "; "))
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 160 {
		s = s[:157] + "..."
	}
	return s
}

// watchStatus prints status events from now on until the context ends. It
// subscribes to the status subjects, where status events are published as
// they are stored, rather than creating a JetStream consumer: reading status
// then needs only the subscribe permission (see natsauth).
func (c *cli) watchStatus(nc *nats.Conn, out string) error {
	sub, err := nc.SubscribeSync(schemas.StatusSubjects)
	if err != nil {
		return fmt.Errorf("watch %s: %w", schemas.StatusSubjects, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	for {
		m, err := sub.NextMsgWithContext(c.ctx)
		if err != nil {
			if c.ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("watch %s: %w", schemas.StatusSubjects, err)
		}
		e, err := schemas.FromHeaders(m.Header, m.Data)
		if err != nil {
			fmt.Fprintf(c.errOut, "skipping unreadable status message on %s: %v\n", m.Subject, err)
			continue
		}
		p, err := schemas.Decode(e)
		st, ok := p.(*schemas.Status)
		if err != nil || !ok {
			fmt.Fprintf(c.errOut, "skipping invalid status event %s: %v\n", e.ID(), err)
			continue
		}
		if out == "json" {
			b, _ := json.Marshal(st)
			fmt.Fprintln(c.out, string(b))
			continue
		}
		at := e.Time().Local().Format("15:04:05")
		counts := ""
		if st.Summary != nil {
			counts = fmt.Sprintf(" [%d VMs]", st.Summary.Total)
		}
		fmt.Fprintf(c.out, "%s  %-11s %-9s %-10s %s%s %s\n", at, st.Workflow, st.Phase,
			st.Target(), st.Operation, counts, oneLine(st.Message))
		c.printVMs(st, at)
	}
}

// printVMs prints a status event's per-VM lines.
func (c *cli) printVMs(st *schemas.Status, at string) {
	for _, vm := range st.VMs {
		line := fmt.Sprintf("%s    %s/%s %s", at, vm.Namespace, vm.Name, vm.Phase)
		if vm.Node != "" {
			line += " on " + vm.Node
		}
		if vm.Message != "" {
			line += ": " + oneLine(vm.Message)
		}
		fmt.Fprintln(c.out, line)
	}
}

func (c *cli) dlq(args []string) error {
	if len(args) == 0 {
		return usagef("usage: drover dlq list|replay SEQ")
	}
	switch args[0] {
	case "list":
		cmd := c.command("drover dlq list [-o table|json]")
		out := cmd.fs.String("o", "table", "output format: table or json")
		limit := cmd.fs.Int("limit", 0, "list at most this many (0: all)")
		if _, err := cmd.parse(args[1:], 0); err != nil {
			return err
		}
		if err := checkOutput(*out); err != nil {
			return err
		}
		nc, js, err := cmd.client.connect(c.ctx)
		if err != nil {
			return err
		}
		defer nc.Close()
		dls, err := consumers.ListDeadLetters(c.ctx, js, *limit)
		if err != nil {
			return err
		}
		if *out == "json" {
			type row struct {
				Seq        uint64    `json:"seq"`
				Time       time.Time `json:"time"`
				Workflow   string    `json:"workflow"`
				Subject    string    `json:"subject"`
				Deliveries uint64    `json:"deliveries"`
				Reason     string    `json:"reason"`
				Data       string    `json:"data"`
			}
			rows := make([]row, 0, len(dls))
			for _, d := range dls {
				rows = append(rows, row{d.Seq, d.Time, d.Workflow, d.Subject, d.Deliveries, d.Reason, string(d.Data)})
			}
			return writeJSON(c.out, rows)
		}
		tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "SEQ\tTIME\tWORKFLOW\tSUBJECT\tDELIVERIES\tREASON")
		for _, d := range dls {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%d\t%s\n", d.Seq, d.Time.Local().Format("2006-01-02 15:04:05"), d.Workflow, d.Subject, d.Deliveries, oneLine(d.Reason))
		}
		return tw.Flush()
	case "replay":
		cmd := c.command("drover dlq replay SEQ")
		pos, err := cmd.parse(args[1:], 1)
		if err != nil {
			return err
		}
		seq, err := strconv.ParseUint(pos[0], 10, 64)
		if err != nil || seq == 0 {
			return usagef("SEQ must be a positive dead-letter sequence number, got %q", pos[0])
		}
		nc, js, err := cmd.client.connect(c.ctx)
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
	default:
		return usagef("unknown dlq command %q (want list or replay)", args[0])
	}
}

// op reads and repairs operations.
func (c *cli) op(args []string) error {
	if len(args) == 0 || args[0] != "retry" {
		return usagef("usage: drover op retry OPERATION")
	}
	cmd := c.command("drover op retry OPERATION")
	pos, err := cmd.parse(args[1:], 1)
	if err != nil {
		return err
	}
	nc, js, err := cmd.client.connect(c.ctx)
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
}
