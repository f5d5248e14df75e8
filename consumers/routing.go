package consumers

import (
	"fmt"
	"regexp"
	"strconv"

	"github.com/drover-io/drover/schemas"
)

// Keys says which operation an event belongs to, which lease serializes it,
// and which operations it cancels.
type Keys struct {
	// Workflow is the workflow that owns the operation.
	Workflow string
	// Operation is the drover-ops key: the node incident or the request, not the event.
	Operation string
	// Target is the node, or namespace/name of a VM.
	Target string
	// Lock is the drover-locks key held while the handler runs; "" for none.
	Lock string
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

func nodeLock(node string) string { return "node." + keyToken(node) }
func vmLock(ns, name string) string {
	return "vm." + keyToken(ns) + "." + keyToken(name)
}

// MaintenanceOperationKey is the operation key of a maintenance request.
func MaintenanceOperationKey(node, requestID string) string {
	return opKey("maintenance", node, requestID)
}

// MaintenanceOperationFilter matches every maintenance operation of node.
func MaintenanceOperationFilter(node string) string {
	return "maintenance." + keyToken(node) + ".*"
}

// MaintenanceEndFilter matches every maintenance-end operation of node.
func MaintenanceEndFilter(node string) string {
	return "maintenance-end." + keyToken(node) + ".*"
}

// Route maps a decoded event to its keys. eventID distinguishes requests that
// have no identity of their own (a VM migration request).
func Route(p schemas.Payload, eventID string) (Keys, error) {
	switch d := p.(type) {
	case *schemas.NodeNotReady:
		return Keys{Workflow: schemas.WorkflowRecovery, Target: d.Node,
			Operation: opKey("recovery", d.Node, strconv.FormatInt(d.Since.UTC().Unix(), 10)),
			Lock:      nodeLock(d.Node)}, nil
	case *schemas.NodeReady:
		return Keys{Workflow: schemas.WorkflowRecovery, Target: d.Node,
			Operation: opKey("ready", d.Node, strconv.FormatInt(d.Since.UTC().Unix(), 10)),
			Lock:      nodeLock(d.Node)}, nil
	case *schemas.NodeFenced:
		// Fencing is evidence the recovery handler waits for while it holds
		// the node lease, so recording it must not wait on that lease.
		return Keys{Workflow: schemas.WorkflowRecovery, Target: d.Node,
			Operation: opKey("fenced", d.Node, eventID)}, nil
	case *schemas.MaintenanceRequested:
		return Keys{Workflow: schemas.WorkflowMaintenance, Target: d.Node,
			Operation: MaintenanceOperationKey(d.Node, d.RequestID), Lock: nodeLock(d.Node)}, nil
	case *schemas.MaintenanceEnded:
		return Keys{Workflow: schemas.WorkflowMaintenance, Target: d.Node,
			Operation: opKey("maintenance-end", d.Node, d.RequestID), Lock: nodeLock(d.Node),
			Cancels: MaintenanceOperationKey(d.Node, d.RequestID)}, nil
	case *schemas.VMMigrateRequested:
		return Keys{Workflow: schemas.WorkflowMigration, Target: d.Namespace + "/" + d.Name,
			Operation: opKey("migration", d.Namespace, d.Name, eventID), Lock: vmLock(d.Namespace, d.Name)}, nil
	case *schemas.VMMigrateCancelled:
		return Keys{Workflow: schemas.WorkflowMigration, Target: d.Namespace + "/" + d.Name,
			Operation: opKey("migration-cancel", d.Namespace, d.Name, eventID), Lock: vmLock(d.Namespace, d.Name),
			Cancels: "migration." + keyToken(d.Namespace) + "." + keyToken(d.Name) + ".*"}, nil
	default:
		return Keys{}, fmt.Errorf("no workflow consumes events of type %s", p.EventType())
	}
}
