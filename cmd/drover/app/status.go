package app

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/util/duration"
	"sigs.k8s.io/yaml"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

// outputFormats are what -o accepts.
var outputFormats = []string{"table", "json", "yaml"}

// outputFlag registers -o/--output on cmd.
func outputFlag(cmd *cobra.Command) *string {
	o := cmd.Flags().StringP("output", "o", "table", "output format: "+strings.Join(outputFormats, ", "))
	_ = cmd.RegisterFlagCompletionFunc("output", cobra.FixedCompletions(outputFormats, cobra.ShellCompDirectiveNoFileComp))
	return o
}

func checkOutput(o string) error {
	if !slices.Contains(outputFormats, o) {
		return usagef("-o must be one of %s, got %q", strings.Join(outputFormats, ", "), o)
	}
	return nil
}

// write prints v as JSON or YAML (format "json" or "yaml").
func write(w io.Writer, format string, v any) error {
	if format == "yaml" {
		b, err := yaml.Marshal(v)
		if err != nil {
			return fmt.Errorf("encode YAML: %w", err)
		}
		_, err = w.Write(b)
		return err
	}
	return writeJSON(w, v)
}

func (c *cli) statusCommand() *cobra.Command {
	var client ClientOptions
	cmd := &cobra.Command{
		Use:   "status [OPERATION]",
		Short: "show operations (or one operation with every VM); --watch follows them",
		Long: `status lists the operations drover keeps (newest state first per workflow): operation, workflow,
target, phase, VMs done/total, age and message. With OPERATION it shows that operation with every VM:
its phase, node, when it last changed and its message. --watch then prints status events as they
happen, with per-VM progress lines (only OPERATION's with an OPERATION).`,
		Example: `  drover status
  drover status -o yaml
  drover status maintenance.worker-3.Q0hHLTE --watch`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usagef("usage: %s", cmd.UseLine())
			}
			return nil
		},
	}
	watch := cmd.Flags().BoolP("watch", "w", false, "keep printing status events as they happen")
	out := outputFlag(cmd)
	return c.leaf(cmd, &client, func(pos []string) error {
		if err := checkOutput(*out); err != nil {
			return err
		}
		nc, js, err := client.connect(c.ctx)
		if err != nil {
			return err
		}
		defer nc.Close()
		op := ""
		if len(pos) == 1 {
			op = pos[0]
			if err := c.showOperation(js, op, *out); err != nil {
				return err
			}
		} else {
			recs, err := listOperations(c.ctx, js, ">")
			if err != nil {
				return err
			}
			if *out == "table" {
				printRecords(c.out, recs, time.Now())
			} else if err := write(c.out, *out, recs); err != nil {
				return err
			}
		}
		if !*watch {
			return nil
		}
		return c.watchStatus(nc, *out, op)
	})
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// printRecords prints operations as a table, as kubectl get does.
func printRecords(w io.Writer, recs []consumers.Record, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "OPERATION\tWORKFLOW\tTARGET\tPHASE\tVMS\tAGE\tMESSAGE")
	for _, r := range recs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Key, r.Workflow, r.Target, phaseOf(r), vmCounts(r),
			age(r.Created, now), summary(r))
	}
	_ = tw.Flush()
}

// phaseOf is a record's state, with the handler's phase while it is not over
// ("Running/Draining").
func phaseOf(r consumers.Record) string {
	if r.Phase != "" && !r.State.Terminal() && r.Phase != string(r.State) {
		return string(r.State) + "/" + r.Phase
	}
	return string(r.State)
}

// age is how long ago t was, as kubectl prints it ("<unknown>" when unset).
func age(t, now time.Time) string {
	if t.IsZero() {
		return "<unknown>"
	}
	return duration.HumanDuration(now.Sub(t))
}

// OperationView is one operation as `drover status OPERATION -o json|yaml`
// prints it: the record and every target's progress.
type OperationView struct {
	consumers.Record
	VMs []VMView `json:"vms"`
}

// VMView is one target's progress.
type VMView struct {
	Target string `json:"target"`
	consumers.TargetProgress
}

// showOperation prints one operation with every VM.
func (c *cli) showOperation(js jetstream.JetStream, key, format string) error {
	ops, err := consumers.OpenOpStore(c.ctx, js)
	if err != nil {
		return fmt.Errorf("%w (has drover serve run against this NATS?)", err)
	}
	rec, _, found, err := ops.Get(c.ctx, key)
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("operation %s does not exist (drover status lists the operations)", key)
	}
	view := OperationView{Record: rec, VMs: []VMView{}}
	kv, err := js.KeyValue(c.ctx, consumers.BucketProgress)
	switch {
	case errors.Is(err, jetstream.ErrBucketNotFound):
	case err != nil:
		return fmt.Errorf("open %s: %w", consumers.BucketProgress, err)
	default:
		targets, err := consumers.ReadProgressKeys(c.ctx, js, kv, key)
		if err != nil {
			return err
		}
		for t, p := range targets {
			view.VMs = append(view.VMs, VMView{Target: t, TargetProgress: p})
		}
		sort.Slice(view.VMs, func(i, j int) bool { return view.VMs[i].Target < view.VMs[j].Target })
	}
	if format != "table" {
		return write(c.out, format, view)
	}
	now := time.Now()
	when := func(t time.Time) string {
		if t.IsZero() {
			return "-"
		}
		return t.Local().Format(time.DateTime) + " (" + age(t, now) + " ago)"
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	row("Operation", rec.Key)
	row("Workflow", rec.Workflow)
	row("Target", rec.Target)
	row("State", string(rec.State))
	row("Phase", rec.Phase)
	row("VMs", vmCounts(rec)+" done")
	row("Generation", fmt.Sprintf("%d (attempts %d)", max(rec.Generation, 1), rec.Attempts))
	row("Request", rec.EventType)
	row("Created", when(rec.Created))
	row("Started", when(rec.Started))
	row("Updated", when(rec.Updated))
	row("Finished", when(rec.Finished))
	row("Waiting for", oneLine(rec.WaitReason))
	row("Cancel", oneLine(rec.CancelReason))
	row("Message", oneLine(rec.Message))
	row("Last error", oneLine(rec.LastError))
	_ = tw.Flush()
	if len(view.VMs) == 0 {
		fmt.Fprintln(c.out, "\nNo VMs.")
		return nil
	}
	fmt.Fprintln(c.out)
	start := rec.Started
	if start.IsZero() {
		start = rec.Created
	}
	tw = tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tPHASE\tNODE\tUPDATED\tAFTER\tMESSAGE")
	for _, vm := range view.VMs {
		updated, after := "-", "-"
		if !vm.Updated.IsZero() {
			updated = vm.Updated.Local().Format("15:04:05")
			if !start.IsZero() && !vm.Updated.Before(start) {
				after = "+" + vm.Updated.Sub(start).Round(time.Second).String()
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", vm.Target, vm.Phase, orText(vm.Node, "-"), updated, after, oneLine(vm.Message))
	}
	return tw.Flush()
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
func (c *cli) watchStatus(nc *nats.Conn, out, op string) error {
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
		if op != "" && st.Operation != op {
			continue
		}
		switch out {
		case "json":
			b, _ := json.Marshal(st)
			fmt.Fprintln(c.out, string(b))
			continue
		case "yaml":
			b, _ := yaml.Marshal(st)
			fmt.Fprintf(c.out, "---\n%s", b)
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
