package consumers

import (
	"context"
	"fmt"
	"regexp"
	"strconv"

	"github.com/drover-io/drover/schemas"
)

// Lease priorities: a waiter of higher priority asks the holder to yield.
// Recovery of a failed node comes before ending a maintenance, which comes
// before a maintenance, which comes before a single-VM migration.
const (
	PriorityMigration      = 10
	PriorityMaintenance    = 20
	PriorityMaintenanceEnd = 30
	PriorityRecovery       = 40
)

// Lock is one lease an operation holds while its handler runs.
type Lock struct {
	// Key in the drover-locks bucket: node.<node> or vm.<ns>.<name>.
	Key      string
	Priority int
}

// Keys says which operation an event belongs to, which leases serialize it,
// and which operations it cancels.
type Keys struct {
	// Workflow is the workflow that owns the operation.
	Workflow string
	// Operation is the drover-ops key: the node incident or the request, not the event.
	Operation string
	// Target is the node, or namespace/name of a VM.
	Target string
	// Locks are taken, all or none, before the handler runs.
	Locks []Lock
	// Cancels is a drover-ops key or filter whose pending or running
	// operations this event cancels; "" for none.
	Cancels string
}

// WorkflowKinds lists the request kinds each workflow consumes.
var WorkflowKinds = map[string][]string{
	schemas.WorkflowMaintenance: {schemas.KindMaintenanceRequested, schemas.KindMaintenanceEnded},
	schemas.WorkflowRecovery:    {schemas.KindNodeNotReady, schemas.KindNodeReady, schemas.KindNodeFenced},
	schemas.WorkflowMigration:   {schemas.KindVMMigrateRequested, schemas.KindVMMigrateCancelled},
}

// WorkflowOf returns the workflow that consumes kind.
func WorkflowOf(kind string) (string, bool) {
	for wf, kinds := range WorkflowKinds {
		for _, k := range kinds {
			if k == kind {
				return wf, true
			}
		}
	}
	return "", false
}

var kvSafe = regexp.MustCompile(`^[-_=/a-zA-Z0-9]+$`)

// keyToken turns a name into one KV key token: the subject token encoding when
// it only uses KV-safe characters, a stable hash otherwise.
func keyToken(s string) string {
	if tok, err := schemas.EncodeToken(s); err == nil && kvSafe.MatchString(tok) {
		return tok
	}
	return "h" + schemas.DeterministicID(s)
}

func opKey(parts ...string) string {
	key := parts[0]
	for _, p := range parts[1:] {
		key += "." + keyToken(p)
	}
	return key
}

// NodeLock is the lease key of a node.
func NodeLock(node string) string { return "node." + keyToken(node) }

// VMLock is the lease key of a VM.
func VMLock(ns, name string) string { return "vm." + keyToken(ns) + "." + keyToken(name) }

// MaintenanceOperationKey is the operation key of a maintenance request.
func MaintenanceOperationKey(node, requestID string) string {
	return opKey("maintenance", node, requestID)
}

// MaintenancePlanOperationKey is the operation key of a dry run of a
// maintenance request: it plans and changes nothing.
func MaintenancePlanOperationKey(node, requestID string) string {
	return opKey("maintenance-plan", node, requestID)
}

// MaintenanceEndOperationKey is the operation key of the end of a maintenance request.
func MaintenanceEndOperationKey(node, requestID string) string {
	return opKey("maintenance-end", node, requestID)
}

// MaintenanceOperationFilter matches every maintenance operation of node.
func MaintenanceOperationFilter(node string) string {
	return "maintenance." + keyToken(node) + ".*"
}

// MaintenanceEndFilter matches every maintenance-end operation of node.
func MaintenanceEndFilter(node string) string {
	return "maintenance-end." + keyToken(node) + ".*"
}

// RecoveryOperationKey is the operation key of one incident of node: the
// incident is named by the node's UID and the start of its NotReady spell
// as the node shows it (or, without the node, the event's since).
func RecoveryOperationKey(node, incident string) string {
	return opKey("recovery", node, incident)
}

// RecoveryOperationFilter matches every recovery operation of node.
func RecoveryOperationFilter(node string) string {
	return "recovery." + keyToken(node) + ".*"
}

// MigrationOperationKey is the operation key of a migration request of one VM.
func MigrationOperationKey(ns, name, requestID string) string {
	return opKey("migration", ns, name, requestID)
}

// MigrationCancelOperationKey is the operation key of one cancel request
// of a VM's migration: the cancel event's id names it.
func MigrationCancelOperationKey(ns, name, eventID string) string {
	return opKey("migration-cancel", ns, name, eventID)
}

// MigrationOperationFilter matches every migration operation of one VM.
func MigrationOperationFilter(ns, name string) string {
	return "migration." + keyToken(ns) + "." + keyToken(name) + ".*"
}

// Resolver refines an event's keys from the live world before the runtime
// takes leases: the recovery workflow names the incident from the Node
// object (so that every producer's event of one incident is one operation),
// the migration workflow adds the lease of the node the VM runs on. A
// Terminal error dead-letters the message; another error retries it later
// without charging the operation's budget.
type Resolver interface {
	Resolve(ctx context.Context, e Event, keys Keys) (Keys, error)
}

// ResolverFunc adapts a function to Resolver.
type ResolverFunc func(ctx context.Context, e Event, keys Keys) (Keys, error)

// Resolve calls f.
func (f ResolverFunc) Resolve(ctx context.Context, e Event, keys Keys) (Keys, error) {
	return f(ctx, e, keys)
}

// Route maps a decoded event to its keys. eventID distinguishes requests that
// have no identity of their own (a migration request without a request id).
func Route(p schemas.Payload, eventID string) (Keys, error) {
	switch d := p.(type) {
	case *schemas.NodeNotReady:
		return Keys{Workflow: schemas.WorkflowRecovery, Target: d.Node,
			Operation: RecoveryOperationKey(d.Node, strconv.FormatInt(d.Since.UTC().Unix(), 10)),
			Locks:     []Lock{{NodeLock(d.Node), PriorityRecovery}}}, nil
	case *schemas.NodeReady:
		// Cancels a recovery that has not passed its fencing gate (the
		// handler marks it uncancellable once it has), then waits for the
		// node's lease to remove what recovery left on the node.
		return Keys{Workflow: schemas.WorkflowRecovery, Target: d.Node,
			Operation: opKey("ready", d.Node, strconv.FormatInt(d.Since.UTC().Unix(), 10)),
			Locks:     []Lock{{NodeLock(d.Node), PriorityRecovery}},
			Cancels:   RecoveryOperationFilter(d.Node)}, nil
	case *schemas.NodeFenced:
		// Fencing is evidence a recovery waits for while it may hold the
		// node lease, so recording it must not wait on that lease.
		return Keys{Workflow: schemas.WorkflowRecovery, Target: d.Node,
			Operation: opKey("fenced", d.Node, eventID)}, nil
	case *schemas.MaintenanceRequested:
		if d.DryRun {
			// A plan changes nothing: it needs no lease and is its own
			// operation, so that a later real request with the same id runs.
			return Keys{Workflow: schemas.WorkflowMaintenance, Target: d.Node,
				Operation: MaintenancePlanOperationKey(d.Node, d.RequestID)}, nil
		}
		return Keys{Workflow: schemas.WorkflowMaintenance, Target: d.Node,
			Operation: MaintenanceOperationKey(d.Node, d.RequestID),
			Locks:     []Lock{{NodeLock(d.Node), PriorityMaintenance}}}, nil
	case *schemas.MaintenanceEnded:
		return Keys{Workflow: schemas.WorkflowMaintenance, Target: d.Node,
			Operation: MaintenanceEndOperationKey(d.Node, d.RequestID),
			Locks:     []Lock{{NodeLock(d.Node), PriorityMaintenanceEnd}},
			Cancels:   MaintenanceOperationKey(d.Node, d.RequestID)}, nil
	case *schemas.VMMigrateRequested:
		id := d.RequestID
		if id == "" {
			id = eventID
		}
		return Keys{Workflow: schemas.WorkflowMigration, Target: d.Namespace + "/" + d.Name,
			Operation: MigrationOperationKey(d.Namespace, d.Name, id),
			Locks:     []Lock{{VMLock(d.Namespace, d.Name), PriorityMigration}}}, nil
	case *schemas.VMMigrateCancelled:
		return Keys{Workflow: schemas.WorkflowMigration, Target: d.Namespace + "/" + d.Name,
			Operation: MigrationCancelOperationKey(d.Namespace, d.Name, eventID),
			Locks:     []Lock{{VMLock(d.Namespace, d.Name), PriorityMigration}},
			Cancels:   MigrationOperationFilter(d.Namespace, d.Name)}, nil
	default:
		return Keys{}, fmt.Errorf("no workflow consumes events of type %s", p.EventType())
	}
}
