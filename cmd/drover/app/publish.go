package app

import (
	"context"
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
	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// cliSource is the CloudEvents source of events the CLI publishes.
const cliSource = "drover/cli"

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

func (c *cli) maintenanceCommand() *cobra.Command {
	return group("maintenance", "put a node into maintenance (drain its VMs) and give it back",
		c.maintenanceStartCommand(), c.maintenanceEndCommand())
}

func (c *cli) maintenanceStartCommand() *cobra.Command {
	var client ClientOptions
	cmd := &cobra.Command{
		Use:   "start NODE --reason TEXT",
		Short: "request maintenance of a node: cordon it and move its VMs away",
		Example: `  drover maintenance start worker-3 --reason "BIOS update" --request-id CHG-1 --wait
  drover maintenance start worker-3 --reason "BIOS update" --dry-run`,
		Args: exactArgs(1),
	}
	fs := cmd.Flags()
	reason := fs.String("reason", "", "why the node is serviced (required)")
	mode := fs.String("mode", schemas.ModeLiveMigrate, "LiveMigrate or Evict (shut every VM down, restart where its run strategy allows)")
	reqID := fs.String("request-id", "", "identity of the request; re-sending the same id is a duplicate (default: generated)")
	by := fs.String("requested-by", whoami(), "who asks")
	force := fs.Bool("force", false, "start even when a VM cannot move or the other nodes lack room: such VMs are shut down (restarted elsewhere where their run strategy allows)")
	home := fs.Bool("return-home", false, "when the maintenance ends, migrate the VMs drover moved back to the node")
	dry := fs.Bool("dry-run", false, "plan only and print the plan: nothing in the cluster changes")
	wait := fs.Bool("wait", false, "follow the operation until it ends, with per-VM progress; exit 0 when it completed, 1 when it failed or was rejected")
	return c.leaf(cmd, &client, func(pos []string) error {
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
		return c.publishAndWait(client, id, p, f)
	})
}

func (c *cli) maintenanceEndCommand() *cobra.Command {
	var client ClientOptions
	cmd := &cobra.Command{
		Use:   "end NODE",
		Short: "end a node's maintenance: uncordon it (and bring VMs home with --return-home)",
		Args:  exactArgs(1),
	}
	reqID := cmd.Flags().String("request-id", "", "the request to end (default: the node's unfinished maintenance)")
	wait := cmd.Flags().Bool("wait", false, "follow the end until the node is given back (and VMs are home); exit 0 when it completed, 1 otherwise")
	return c.leaf(cmd, &client, func(pos []string) error {
		if err := checkNode(pos[0]); err != nil {
			return err
		}
		if *reqID == "" {
			id, err := c.activeMaintenance(client, pos[0])
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
		return c.publishAndWait(client, schemas.DeterministicID(cliSource, schemas.TypeMaintenanceEnded, pos[0], *reqID), p, f)
	})
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

// selectorFlag collects k=v[,k=v] label pairs; it may be repeated.
type selectorFlag map[string]string

func (s selectorFlag) Type() string { return "k=v[,k=v]" }
func (s selectorFlag) String() string {
	keys := make([]string, 0, len(s))
	for k, v := range s {
		keys = append(keys, k+"="+v)
	}
	sort.Strings(keys)
	return strings.Join(keys, ",")
}
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

func (c *cli) vmCommand() *cobra.Command {
	return group("vm", "migrate one VM, or cancel its migration", c.vmMigrateCommand(), c.vmCancelCommand())
}

func (c *cli) vmMigrateCommand() *cobra.Command {
	var client ClientOptions
	cmd := &cobra.Command{
		Use:     "migrate NAMESPACE/NAME",
		Short:   "live-migrate one VM, optionally to nodes with given labels",
		Example: `  drover vm migrate default/db-1 --node-selector kubernetes.io/hostname=worker-2 --wait`,
		Args:    exactArgs(1),
	}
	sel := selectorFlag{}
	cmd.Flags().Var(sel, "node-selector", "target node labels, k=v[,k=v] (repeatable)")
	reqID := cmd.Flags().String("request-id", "", "identity of the request; re-sending the same id is the same migration (default: generated)")
	wait := cmd.Flags().Bool("wait", false, "follow the migration until it ends; exit 0 when it succeeded, 1 when it failed or was cancelled")
	return c.leaf(cmd, &client, func(pos []string) error {
		ns, name, err := parseVM(pos[0])
		if err != nil {
			return err
		}
		id := uniqueID(schemas.TypeVMMigrateRequested, ns, name, sel.String())
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
		return c.publishAndWait(client, id, p, f)
	})
}

func (c *cli) vmCancelCommand() *cobra.Command {
	var client ClientOptions
	cmd := &cobra.Command{
		Use:   "cancel NAMESPACE/NAME",
		Short: "cancel a VM's migration",
		Args:  exactArgs(1),
	}
	wait := cmd.Flags().Bool("wait", false, "wait until the cancel is done and print whether the abort won or the migration completed first")
	return c.leaf(cmd, &client, func(pos []string) error {
		ns, name, err := parseVM(pos[0])
		if err != nil {
			return err
		}
		id := uniqueID(schemas.TypeVMMigrateCancelled, ns, name)
		var f *follow
		if *wait {
			f = &follow{op: consumers.MigrationCancelOperationKey(ns, name, id), workflow: schemas.WorkflowMigration, target: ns + "/" + name, okCancelled: true}
		}
		return c.publishAndWait(client, id, &schemas.VMMigrateCancelled{Namespace: ns, Name: name}, f)
	})
}

func (c *cli) nodeCommand() *cobra.Command {
	var client ClientOptions
	cmd := &cobra.Command{
		Use:   "fenced NODE --method TEXT",
		Short: "report that a node is fenced (powered off or isolated): its recovery may pass its fencing gate",
		Args:  exactArgs(1),
	}
	method := cmd.Flags().String("method", "", "how the node was fenced, e.g. ipmi-power-off (required)")
	by := cmd.Flags().String("by", whoami(), "who fenced it")
	fenced := c.leaf(cmd, &client, func(pos []string) error {
		if err := checkNode(pos[0]); err != nil {
			return err
		}
		if strings.TrimSpace(*method) == "" {
			return usagef("--method is required")
		}
		return c.publishOne(client, uniqueID(schemas.TypeNodeFenced, pos[0], *method),
			&schemas.NodeFenced{Node: pos[0], Method: *method, By: *by})
	})
	return group("node", "report facts about nodes", fenced)
}
