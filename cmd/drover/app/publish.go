package app

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/user"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// cliSource is the CloudEvents source of events the CLI publishes.
const cliSource = "drover/cli"

// command is one client subcommand: its flag set, which always includes the
// NATS client flags, and its usage line.
type command struct {
	fs     *flag.FlagSet
	client ClientOptions
	usage  string
}

// command starts a subcommand whose usage line is usage ("drover vm cancel NAMESPACE/NAME").
func (c *cli) command(usage string) *command {
	// The flag set is named by the command words, up to the first argument.
	words := strings.Fields(usage)
	n := 0
	for n < len(words) && words[n] == strings.ToLower(words[n]) && !strings.ContainsAny(words[n][:1], "[-") {
		n++
	}
	cmd := &command{fs: flag.NewFlagSet(strings.Join(words[:n], " "), flag.ContinueOnError), usage: usage}
	cmd.client.register(cmd.fs, c.getenv)
	cmd.client.denied = c.denied
	return cmd
}

// parse parses the subcommand's arguments and checks it got npos positional ones.
func (cmd *command) parse(args []string, npos int) ([]string, error) {
	pos, err := parse(cmd.fs, args)
	if err != nil {
		return nil, err
	}
	if len(pos) != npos {
		return nil, usagef("usage: %s", cmd.usage)
	}
	return pos, nil
}

// parse parses a subcommand's flags, allowing flags after the positional
// arguments (`drover maintenance start node-1 --reason x`).
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	fs.SetOutput(new(strings.Builder))
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, usagef("usage of %s:\n%s", fs.Name(), flagUsage(fs))
			}
			return nil, usagef("%s: %v", fs.Name(), err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func flagUsage(fs *flag.FlagSet) string {
	var b strings.Builder
	fs.VisitAll(func(f *flag.Flag) { fmt.Fprintf(&b, "  --%-14s %s\n", f.Name, f.Usage) })
	return b.String()
}

func whoami() string {
	if u, err := user.Current(); err == nil && u.Username != "" {
		return u.Username
	}
	if h, err := os.Hostname(); err == nil {
		return "cli@" + h
	}
	return "cli"
}

// publishOne validates and publishes one event and prints what JetStream said.
func (c *cli) publishOne(client ClientOptions, id string, p schemas.Payload) error {
	e, nc, js, err := c.prepare(client, id, p)
	if err != nil {
		return err
	}
	defer nc.Close()
	ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
	defer cancel()
	res, err := (&producers.Publisher{JS: js}).Publish(ctx, e)
	if err != nil {
		return err
	}
	dup := "no"
	if res.Duplicate {
		dup = "yes: JetStream already had this event id inside its duplicate window; nothing new was queued"
	}
	fmt.Fprintf(c.out, "event:     %s\ntype:      %s\nsubject:   %s\nstream:    %s seq %d\nduplicate: %s\n",
		res.ID, e.Type(), res.Subject, res.Stream, res.Sequence, dup)
	return nil
}

// prepare builds and validates the event (a usage error when invalid) and
// connects to NATS; the caller closes the connection.
func (c *cli) prepare(client ClientOptions, id string, p schemas.Payload) (event.Event, *nats.Conn, jetstream.JetStream, error) {
	e, err := schemas.New(cliSource, id, p)
	if err != nil {
		return e, nil, nil, usageError{err}
	}
	nc, js, err := client.connect(c.ctx)
	if err != nil {
		return e, nil, nil, err
	}
	return e, nc, js, nil
}

func checkNode(node string) error {
	if errs := validation.IsDNS1123Subdomain(node); len(errs) > 0 {
		return usagef("node %q is not a valid node name: %s", node, strings.Join(errs, "; "))
	}
	return nil
}

func (c *cli) maintenance(args []string) error {
	if len(args) == 0 {
		return usagef("usage: drover maintenance start|end NODE ...")
	}
	switch args[0] {
	case "start":
		cmd := c.command("drover maintenance start NODE --reason TEXT [--mode LiveMigrate|Evict] [--request-id ID] [--force] [--return-home] [--dry-run] [--wait]")
		reason := cmd.fs.String("reason", "", "why the node is serviced (required)")
		mode := cmd.fs.String("mode", schemas.ModeLiveMigrate, "LiveMigrate or Evict (shut every VM down, restart where its run strategy allows)")
		reqID := cmd.fs.String("request-id", "", "identity of the request; re-sending the same id is a duplicate (default: generated)")
		by := cmd.fs.String("requested-by", whoami(), "who asks")
		force := cmd.fs.Bool("force", false, "start even when a VM cannot move or the other nodes lack room: such VMs are shut down (restarted elsewhere where their run strategy allows)")
		home := cmd.fs.Bool("return-home", false, "when the maintenance ends, migrate the VMs drover moved back to the node")
		dry := cmd.fs.Bool("dry-run", false, "plan only and print the plan: nothing in the cluster changes")
		wait := cmd.fs.Bool("wait", false, "follow the operation until it ends, with per-VM progress; exit 0 when it completed, 1 when it failed or was rejected")
		pos, err := cmd.parse(args[1:], 1)
		if err != nil {
			return err
		}
		if err := checkNode(pos[0]); err != nil {
			return err
		}
		if strings.TrimSpace(*reason) == "" {
			return usagef("--reason is required")
		}
		if *mode != schemas.ModeLiveMigrate && *mode != schemas.ModeEvict {
			return usagef("--mode must be LiveMigrate or Evict, got %q", *mode)
		}
		if *reqID == "" {
			prefix := "cli-"
			if *dry {
				prefix = "dry-run-"
			}
			*reqID = prefix + time.Now().UTC().Format("20060102T150405.000Z")
		}
		p := &schemas.MaintenanceRequested{Node: pos[0], RequestID: *reqID, Reason: *reason, RequestedBy: *by, Mode: *mode,
			Force: *force, ReturnHome: *home, DryRun: *dry}
		id := schemas.DeterministicID(cliSource, schemas.TypeMaintenanceRequested, pos[0], *reqID)
		if *dry {
			id = schemas.DeterministicID(cliSource, schemas.TypeMaintenanceRequested, "dry-run", pos[0], *reqID)
		}
		var f *follow
		if *wait || *dry {
			key := consumers.MaintenanceOperationKey(pos[0], *reqID)
			if *dry {
				key = consumers.MaintenancePlanOperationKey(pos[0], *reqID)
			}
			f = &follow{op: key, workflow: schemas.WorkflowMaintenance, target: pos[0]}
		}
		return c.publishAndWait(cmd.client, id, p, f)
	case "end":
		cmd := c.command("drover maintenance end NODE [--request-id ID] [--wait]")
		reqID := cmd.fs.String("request-id", "", "the request to end (default: the node's unfinished maintenance)")
		wait := cmd.fs.Bool("wait", false, "follow the end until the node is given back (and VMs are home); exit 0 when it completed, 1 otherwise")
		pos, err := cmd.parse(args[1:], 1)
		if err != nil {
			return err
		}
		if err := checkNode(pos[0]); err != nil {
			return err
		}
		if *reqID == "" {
			id, err := c.activeMaintenance(cmd.client, pos[0])
			if err != nil {
				return err
			}
			*reqID = id
		}
		p := &schemas.MaintenanceEnded{Node: pos[0], RequestID: *reqID}
		var f *follow
		if *wait {
			f = &follow{op: consumers.MaintenanceEndOperationKey(pos[0], *reqID), workflow: schemas.WorkflowMaintenance, target: pos[0]}
		}
		return c.publishAndWait(cmd.client, schemas.DeterministicID(cliSource, schemas.TypeMaintenanceEnded, pos[0], *reqID), p, f)
	default:
		return usagef("unknown maintenance command %q (want start or end)", args[0])
	}
}

// activeMaintenance finds the request id of node's maintenance that has not
// been ended yet: a maintenance that finished draining keeps the node
// cordoned until its maintenance.ended, so "unfinished" is not the test.
func (c *cli) activeMaintenance(client ClientOptions, node string) (string, error) {
	nc, js, err := client.connect(c.ctx)
	if err != nil {
		return "", err
	}
	defer nc.Close()
	store, err := consumers.OpenOpStore(c.ctx, js)
	if err != nil {
		return "", err
	}
	recs, err := store.List(c.ctx, consumers.MaintenanceOperationFilter(node))
	if err != nil {
		return "", err
	}
	ended, err := store.List(c.ctx, consumers.MaintenanceEndFilter(node))
	if err != nil {
		return "", err
	}
	endedIDs := map[string]bool{}
	for _, r := range ended {
		endedIDs[requestIDOf(r)] = true
	}
	var ids []string
	for _, r := range recs {
		if rid := requestIDOf(r); rid != "" && !endedIDs[rid] && r.State != consumers.StateCancelled {
			ids = append(ids, rid)
		}
	}
	switch len(ids) {
	case 0:
		return "", usagef("node %s has no maintenance that was not ended; pass --request-id to end a specific request", node)
	case 1:
		return ids[0], nil
	default:
		return "", usagef("node %s has several maintenance requests not ended (%s); pass --request-id", node, strings.Join(ids, ", "))
	}
}

func requestIDOf(r consumers.Record) string {
	i := strings.LastIndexByte(r.Key, '.')
	if i < 0 {
		return ""
	}
	id, err := schemas.DecodeToken(r.Key[i+1:])
	if err != nil {
		return ""
	}
	return id
}

func parseVM(s string) (string, string, error) {
	ns, name, ok := strings.Cut(s, "/")
	if !ok || ns == "" || name == "" {
		return "", "", usagef("want NAMESPACE/NAME, got %q", s)
	}
	if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
		return "", "", usagef("namespace %q: %s", ns, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return "", "", usagef("name %q: %s", name, strings.Join(errs, "; "))
	}
	return ns, name, nil
}

type selectorFlag map[string]string

func (s selectorFlag) String() string { return "" }
func (s selectorFlag) Set(v string) error {
	for _, kv := range strings.Split(v, ",") {
		k, val, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return fmt.Errorf("want key=value, got %q", kv)
		}
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return fmt.Errorf("label key %q: %s", k, strings.Join(errs, "; "))
		}
		if errs := validation.IsValidLabelValue(val); len(errs) > 0 {
			return fmt.Errorf("label value %q: %s", val, strings.Join(errs, "; "))
		}
		s[k] = val
	}
	return nil
}

// uniqueID identifies a request that has no identity of its own: each
// invocation is a new request.
func uniqueID(parts ...string) string {
	return schemas.DeterministicID(append(parts, strconv.FormatInt(time.Now().UnixNano(), 10), strconv.Itoa(os.Getpid()))...)
}

func (c *cli) vm(args []string) error {
	if len(args) == 0 {
		return usagef("usage: drover vm migrate|cancel NAMESPACE/NAME")
	}
	switch args[0] {
	case "migrate":
		cmd := c.command("drover vm migrate NAMESPACE/NAME [--node-selector k=v] [--request-id ID] [--wait]")
		sel := selectorFlag{}
		cmd.fs.Var(sel, "node-selector", "target node labels, k=v[,k=v] (repeatable)")
		reqID := cmd.fs.String("request-id", "", "identity of the request; re-sending the same id is the same migration (default: generated)")
		wait := cmd.fs.Bool("wait", false, "follow the migration until it ends; exit 0 when it succeeded, 1 when it failed or was cancelled")
		pos, err := cmd.parse(args[1:], 1)
		if err != nil {
			return err
		}
		ns, name, err := parseVM(pos[0])
		if err != nil {
			return err
		}
		keys := make([]string, 0, len(sel))
		for k, v := range sel {
			keys = append(keys, k+"="+v)
		}
		sort.Strings(keys)
		id := uniqueID(schemas.TypeVMMigrateRequested, ns, name, strings.Join(keys, ","))
		if *reqID != "" {
			id = schemas.DeterministicID(cliSource, schemas.TypeVMMigrateRequested, ns, name, *reqID)
		} else if *wait {
			*reqID = "cli-" + id[:16]
		}
		p := &schemas.VMMigrateRequested{Namespace: ns, Name: name, RequestID: *reqID}
		if len(sel) > 0 {
			p.TargetNodeSelector = sel
		}
		var f *follow
		if *wait {
			f = &follow{op: consumers.MigrationOperationKey(ns, name, *reqID), workflow: schemas.WorkflowMigration, target: ns + "/" + name}
		}
		return c.publishAndWait(cmd.client, id, p, f)
	case "cancel":
		cmd := c.command("drover vm cancel NAMESPACE/NAME [--wait]")
		wait := cmd.fs.Bool("wait", false, "wait until the cancel is done and print whether the abort won or the migration completed first")
		pos, err := cmd.parse(args[1:], 1)
		if err != nil {
			return err
		}
		ns, name, err := parseVM(pos[0])
		if err != nil {
			return err
		}
		id := uniqueID(schemas.TypeVMMigrateCancelled, ns, name)
		var f *follow
		if *wait {
			f = &follow{op: consumers.MigrationCancelOperationKey(ns, name, id), workflow: schemas.WorkflowMigration, target: ns + "/" + name, okCancelled: true}
		}
		return c.publishAndWait(cmd.client, id, &schemas.VMMigrateCancelled{Namespace: ns, Name: name}, f)
	default:
		return usagef("unknown vm command %q (want migrate or cancel)", args[0])
	}
}

func (c *cli) node(args []string) error {
	if len(args) == 0 || args[0] != "fenced" {
		return usagef("usage: drover node fenced NODE --method TEXT")
	}
	cmd := c.command("drover node fenced NODE --method TEXT")
	method := cmd.fs.String("method", "", "how the node was fenced, e.g. ipmi-power-off (required)")
	by := cmd.fs.String("by", whoami(), "who fenced it")
	pos, err := cmd.parse(args[1:], 1)
	if err != nil {
		return err
	}
	if err := checkNode(pos[0]); err != nil {
		return err
	}
	if strings.TrimSpace(*method) == "" {
		return usagef("--method is required")
	}
	return c.publishOne(cmd.client, uniqueID(schemas.TypeNodeFenced, pos[0], *method),
		&schemas.NodeFenced{Node: pos[0], Method: *method, By: *by})
}
