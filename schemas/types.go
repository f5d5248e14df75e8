package schemas

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"time"
	"unicode/utf8"

	"k8s.io/apimachinery/pkg/util/validation"
)

// Event types, versioned reverse-DNS names. A breaking change to a payload gets a new version.
const (
	TypeNodeNotReady         = "io.drover.node.notready.v1"
	TypeNodeReady            = "io.drover.node.ready.v1"
	TypeNodeFenced           = "io.drover.node.fenced.v1"
	TypeMaintenanceRequested = "io.drover.maintenance.requested.v1"
	TypeMaintenanceEnded     = "io.drover.maintenance.ended.v1"
	TypeVMMigrateRequested   = "io.drover.vm.migrate.requested.v1"
	TypeVMMigrateCancelled   = "io.drover.vm.migrate.cancelled.v1"
	TypeStatus               = "io.drover.status.v1"
)

// Subject kinds, one subject token each, used in drover.req.<kind>.<target>.
const (
	KindNodeNotReady         = "node-notready"
	KindNodeReady            = "node-ready"
	KindNodeFenced           = "node-fenced"
	KindMaintenanceRequested = "maintenance-requested"
	KindMaintenanceEnded     = "maintenance-ended"
	KindVMMigrateRequested   = "vm-migrate-requested"
	KindVMMigrateCancelled   = "vm-migrate-cancelled"
)

// Workflows, used in drover.status.<workflow>.<target> and to name consumers.
const (
	WorkflowMaintenance = "maintenance"
	WorkflowRecovery    = "recovery"
	WorkflowMigration   = "migration"
)

// Maintenance modes for MaintenanceRequested.Mode.
const (
	ModeLiveMigrate = "LiveMigrate"
	ModeEvict       = "Evict"
)

// Status phases for Status.Phase.
const (
	PhasePending   = "Pending"
	PhaseRunning   = "Running"
	PhaseSucceeded = "Succeeded"
	PhaseFailed    = "Failed"
	PhaseCancelled = "Cancelled"
	// PhaseWaiting: the operation waits for something outside drover (fencing, a disruption
	// budget) and is checked again later; it holds no worker.
	PhaseWaiting = "Waiting"
	// PhaseSuspended: a higher-priority operation on the same node pre-empted it; it resumes,
	// re-planned from the live cluster, once that one is done.
	PhaseSuspended = "Suspended"
)

// Payload is implemented by every event data struct in this package, by value and by pointer.
type Payload interface {
	// EventType is the CloudEvents type, e.g. TypeNodeNotReady.
	EventType() string
	// Kind is the request subject kind, "" for Status.
	Kind() string
	// Target is the node name, or "namespace/name" for VM events.
	Target() string
	// Validate performs the Go-side checks the JSON Schema cannot express (for example that a node
	// name is a DNS-1123 subdomain). Errors are *ValidationError naming the field.
	Validate() error
}

// typeInfo describes one event type of the contract.
type typeInfo struct {
	eventType string
	kind      string // "" for status
	workflow  string
	schema    string // embedded file name
	newFn     func() Payload
}

var typeInfos = []typeInfo{
	{TypeNodeNotReady, KindNodeNotReady, WorkflowRecovery, "node.notready.v1.schema.json", func() Payload { return new(NodeNotReady) }},
	{TypeNodeReady, KindNodeReady, WorkflowRecovery, "node.ready.v1.schema.json", func() Payload { return new(NodeReady) }},
	{TypeNodeFenced, KindNodeFenced, WorkflowRecovery, "node.fenced.v1.schema.json", func() Payload { return new(NodeFenced) }},
	{TypeMaintenanceRequested, KindMaintenanceRequested, WorkflowMaintenance, "maintenance.requested.v1.schema.json", func() Payload { return new(MaintenanceRequested) }},
	{TypeMaintenanceEnded, KindMaintenanceEnded, WorkflowMaintenance, "maintenance.ended.v1.schema.json", func() Payload { return new(MaintenanceEnded) }},
	{TypeVMMigrateRequested, KindVMMigrateRequested, WorkflowMigration, "vm.migrate.requested.v1.schema.json", func() Payload { return new(VMMigrateRequested) }},
	{TypeVMMigrateCancelled, KindVMMigrateCancelled, WorkflowMigration, "vm.migrate.cancelled.v1.schema.json", func() Payload { return new(VMMigrateCancelled) }},
	{TypeStatus, "", "", "status.v1.schema.json", func() Payload { return new(Status) }},
}

var (
	byType = map[string]*typeInfo{}
	byKind = map[string]*typeInfo{}
)

func init() {
	for i := range typeInfos {
		ti := &typeInfos[i]
		byType[ti.eventType] = ti
		if ti.kind != "" {
			byKind[ti.kind] = ti
		}
	}
}

// Types returns every event type of the contract, requests first and TypeStatus last.
func Types() []string {
	out := make([]string, 0, len(typeInfos))
	for _, ti := range typeInfos {
		out = append(out, ti.eventType)
	}
	return out
}

// Kinds returns every request subject kind.
func Kinds() []string {
	out := make([]string, 0, len(byKind))
	for _, ti := range typeInfos {
		if ti.kind != "" {
			out = append(out, ti.kind)
		}
	}
	return out
}

// Workflows returns every workflow name.
func Workflows() []string {
	return []string{WorkflowMaintenance, WorkflowRecovery, WorkflowMigration}
}

// IsKnownType reports whether t is an event type of the contract.
func IsKnownType(t string) bool { _, ok := byType[t]; return ok }

// IsKnownKind reports whether k is a request subject kind.
func IsKnownKind(k string) bool { _, ok := byKind[k]; return ok }

// IsKnownWorkflow reports whether w is a workflow name.
func IsKnownWorkflow(w string) bool {
	return w == WorkflowMaintenance || w == WorkflowRecovery || w == WorkflowMigration
}

// KindForType returns the request subject kind of an event type; false for TypeStatus and unknown types.
func KindForType(eventType string) (string, bool) {
	ti, ok := byType[eventType]
	if !ok || ti.kind == "" {
		return "", false
	}
	return ti.kind, true
}

// TypeForKind returns the event type published under a request subject kind.
func TypeForKind(kind string) (string, bool) {
	ti, ok := byKind[kind]
	if !ok {
		return "", false
	}
	return ti.eventType, true
}

// WorkflowForKind returns the workflow whose consumer handles a request kind
// (node-* -> recovery, maintenance-* -> maintenance, vm-* -> migration).
func WorkflowForKind(kind string) (string, bool) {
	ti, ok := byKind[kind]
	if !ok {
		return "", false
	}
	return ti.workflow, true
}

// KindsForWorkflow returns the request kinds a workflow's consumer handles, nil for an unknown workflow.
func KindsForWorkflow(workflow string) []string {
	var out []string
	for _, ti := range typeInfos {
		if ti.kind != "" && ti.workflow == workflow {
			out = append(out, ti.kind)
		}
	}
	return out
}

// isNilPayload guards against nil interfaces and typed nil pointers, whose value-receiver
// methods would panic.
func isNilPayload(p Payload) bool {
	if p == nil {
		return true
	}
	v := reflect.ValueOf(p)
	return v.Kind() == reflect.Pointer && v.IsNil()
}

// NodeNotReady (TypeNodeNotReady) reports that a node stopped being Ready.
type NodeNotReady struct {
	Node         string    `json:"node"`
	Since        time.Time `json:"since"`
	Reason       string    `json:"reason"`
	SourceDetail string    `json:"sourceDetail,omitempty"`
}

// EventType returns TypeNodeNotReady.
func (NodeNotReady) EventType() string { return TypeNodeNotReady }

// Kind returns KindNodeNotReady.
func (NodeNotReady) Kind() string { return KindNodeNotReady }

// Target returns the node name.
func (p NodeNotReady) Target() string { return p.Node }

// Validate checks the node name and that since is set; errors are *ValidationError.
func (p NodeNotReady) Validate() error {
	return firstErr(checkNode("node", p.Node), checkTime("since", p.Since), checkNonEmpty("reason", p.Reason))
}

// NodeReady (TypeNodeReady) reports that a node is Ready again.
type NodeReady struct {
	Node  string    `json:"node"`
	Since time.Time `json:"since"`
}

// EventType returns TypeNodeReady.
func (NodeReady) EventType() string { return TypeNodeReady }

// Kind returns KindNodeReady.
func (NodeReady) Kind() string { return KindNodeReady }

// Target returns the node name.
func (p NodeReady) Target() string { return p.Node }

// Validate checks the node name and that since is set; errors are *ValidationError.
func (p NodeReady) Validate() error {
	return firstErr(checkNode("node", p.Node), checkTime("since", p.Since))
}

// NodeFenced (TypeNodeFenced) reports that a node has been fenced (powered off or isolated), so its
// VMs cannot be running there any more.
type NodeFenced struct {
	Node   string `json:"node"`
	Method string `json:"method"`
	By     string `json:"by"`
}

// EventType returns TypeNodeFenced.
func (NodeFenced) EventType() string { return TypeNodeFenced }

// Kind returns KindNodeFenced.
func (NodeFenced) Kind() string { return KindNodeFenced }

// Target returns the node name.
func (p NodeFenced) Target() string { return p.Node }

// Validate checks the node name, method and by; errors are *ValidationError.
func (p NodeFenced) Validate() error {
	return firstErr(checkNode("node", p.Node), checkNonEmpty("method", p.Method), checkNonEmpty("by", p.By))
}

// Window is a maintenance window; End is optional.
type Window struct {
	Start time.Time  `json:"start"`
	End   *time.Time `json:"end,omitempty"`
}

// MaintenanceRequested (TypeMaintenanceRequested) asks for a node to be emptied of VMs.
// An empty Mode is published as ModeLiveMigrate.
type MaintenanceRequested struct {
	Node        string  `json:"node"`
	RequestID   string  `json:"requestID"`
	Reason      string  `json:"reason"`
	RequestedBy string  `json:"requestedBy"`
	Mode        string  `json:"mode"`
	Window      *Window `json:"window,omitempty"`
	// Force starts the maintenance even when a VM cannot move or the other
	// nodes lack room: such VMs are shut down (and restarted elsewhere where
	// their run strategy allows).
	Force bool `json:"force,omitempty"`
	// ReturnHome migrates the VMs drover moved back to the node when the
	// maintenance ends.
	ReturnHome bool `json:"returnHome,omitempty"`
	// DryRun plans and stops there: nothing in the cluster changes and the
	// plan is the operation's result.
	DryRun bool `json:"dryRun,omitempty"`
}

// MarshalJSON fills in the default mode (ModeLiveMigrate) when Mode is empty.
func (p MaintenanceRequested) MarshalJSON() ([]byte, error) {
	type plain MaintenanceRequested
	if p.Mode == "" {
		p.Mode = ModeLiveMigrate
	}
	return json.Marshal(plain(p))
}

// EventType returns TypeMaintenanceRequested.
func (MaintenanceRequested) EventType() string { return TypeMaintenanceRequested }

// Kind returns KindMaintenanceRequested.
func (MaintenanceRequested) Kind() string { return KindMaintenanceRequested }

// Target returns the node name.
func (p MaintenanceRequested) Target() string { return p.Node }

// Validate checks the node name, the required strings, the mode and the window; errors are
// *ValidationError.
func (p MaintenanceRequested) Validate() error {
	err := firstErr(checkNode("node", p.Node), checkNonEmpty("requestID", p.RequestID),
		checkNonEmpty("reason", p.Reason), checkNonEmpty("requestedBy", p.RequestedBy))
	if err != nil {
		return err
	}
	switch p.Mode {
	case "", ModeLiveMigrate, ModeEvict:
	default:
		return &ValidationError{Field: "mode", Reason: fmt.Sprintf("must be %q or %q, got %q", ModeLiveMigrate, ModeEvict, p.Mode)}
	}
	if p.Window != nil {
		if err := checkTime("window.start", p.Window.Start); err != nil {
			return err
		}
		if p.Window.End != nil && !p.Window.End.After(p.Window.Start) {
			return &ValidationError{Field: "window.end", Reason: "must be after window.start"}
		}
	}
	return nil
}

// MaintenanceEnded (TypeMaintenanceEnded) ends (or cancels) a maintenance request.
type MaintenanceEnded struct {
	Node      string `json:"node"`
	RequestID string `json:"requestID"`
}

// EventType returns TypeMaintenanceEnded.
func (MaintenanceEnded) EventType() string { return TypeMaintenanceEnded }

// Kind returns KindMaintenanceEnded.
func (MaintenanceEnded) Kind() string { return KindMaintenanceEnded }

// Target returns the node name.
func (p MaintenanceEnded) Target() string { return p.Node }

// Validate checks the node name and request id; errors are *ValidationError.
func (p MaintenanceEnded) Validate() error {
	return firstErr(checkNode("node", p.Node), checkNonEmpty("requestID", p.RequestID))
}

// VMMigrateRequested (TypeVMMigrateRequested) asks for one VM to be live-migrated, optionally to
// nodes matching TargetNodeSelector. RequestID names the request: a bot that retries with the same
// id under a new event id asks for the same migration.
type VMMigrateRequested struct {
	Namespace          string            `json:"namespace"`
	Name               string            `json:"name"`
	TargetNodeSelector map[string]string `json:"targetNodeSelector,omitempty"`
	RequestID          string            `json:"requestID,omitempty"`
}

// EventType returns TypeVMMigrateRequested.
func (VMMigrateRequested) EventType() string { return TypeVMMigrateRequested }

// Kind returns KindVMMigrateRequested.
func (VMMigrateRequested) Kind() string { return KindVMMigrateRequested }

// Target returns "namespace/name".
func (p VMMigrateRequested) Target() string { return p.Namespace + "/" + p.Name }

// Validate checks the namespace, the name and the selector's label keys and values; errors are
// *ValidationError.
func (p VMMigrateRequested) Validate() error {
	if err := firstErr(checkNamespace("namespace", p.Namespace), checkName("name", p.Name)); err != nil {
		return err
	}
	for k, v := range p.TargetNodeSelector {
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return &ValidationError{Field: "targetNodeSelector", Reason: fmt.Sprintf("key %q: %s", k, strings.Join(errs, "; "))}
		}
		if errs := validation.IsValidLabelValue(v); len(errs) > 0 {
			return &ValidationError{Field: "targetNodeSelector." + k, Reason: fmt.Sprintf("value %q: %s", v, strings.Join(errs, "; "))}
		}
	}
	return nil
}

// VMMigrateCancelled (TypeVMMigrateCancelled) cancels a VM migration that has not completed.
type VMMigrateCancelled struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
}

// EventType returns TypeVMMigrateCancelled.
func (VMMigrateCancelled) EventType() string { return TypeVMMigrateCancelled }

// Kind returns KindVMMigrateCancelled.
func (VMMigrateCancelled) Kind() string { return KindVMMigrateCancelled }

// Target returns "namespace/name".
func (p VMMigrateCancelled) Target() string { return p.Namespace + "/" + p.Name }

// Validate checks the namespace and the name; errors are *ValidationError.
func (p VMMigrateCancelled) Validate() error {
	return firstErr(checkNamespace("namespace", p.Namespace), checkName("name", p.Name))
}

// VMProgress is the progress of one VM inside a Status.
type VMProgress struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Phase     string `json:"phase"`
	Node      string `json:"node,omitempty"`
	Message   string `json:"message,omitempty"`
}

// Summary counts an operation's targets (VMs) by their phase.
type Summary struct {
	Total  int            `json:"total"`
	Phases map[string]int `json:"phases,omitempty"`
}

// Status (TypeStatus) is published by consumers on drover.status.<workflow>.<target> as an
// operation progresses. Node or VM ("namespace/name") must be set, or both. VMs holds only the
// VMs whose progress changed since the operation's previous status event; Summary counts all of
// them, so a reader that joins late still knows where the operation stands.
type Status struct {
	Operation  string       `json:"operation"`
	Workflow   string       `json:"workflow"`
	Node       string       `json:"node,omitempty"`
	VM         string       `json:"vm,omitempty"`
	Phase      string       `json:"phase"`
	VMs        []VMProgress `json:"vms,omitempty"`
	Summary    *Summary     `json:"summary,omitempty"`
	Message    string       `json:"message,omitempty"`
	Generation int          `json:"generation,omitempty"`
	Attempt    int          `json:"attempt,omitempty"`
}

// EventType returns TypeStatus.
func (Status) EventType() string { return TypeStatus }

// Kind returns "": status events are not requests.
func (Status) Kind() string { return "" }

// Target returns the VM for the migration workflow when it is set, otherwise the node, otherwise
// the VM.
func (p Status) Target() string {
	if p.Workflow == WorkflowMigration && p.VM != "" {
		return p.VM
	}
	if p.Node != "" {
		return p.Node
	}
	return p.VM
}

// Validate checks the workflow, phase, node or vm, and each VM's progress; errors are
// *ValidationError.
func (p Status) Validate() error {
	if err := checkNonEmpty("operation", p.Operation); err != nil {
		return err
	}
	if err := firstErr(checkMax("operation", p.Operation, 512), checkMax("message", p.Message, 4096)); err != nil {
		return err
	}
	if p.Generation < 0 || p.Attempt < 0 {
		return &ValidationError{Field: "generation", Reason: "generation and attempt must not be negative"}
	}
	if p.Summary != nil {
		if p.Summary.Total < 0 {
			return &ValidationError{Field: "summary.total", Reason: "must not be negative"}
		}
		for phase, n := range p.Summary.Phases {
			if n < 0 {
				return &ValidationError{Field: "summary.phases." + phase, Reason: "must not be negative"}
			}
		}
	}
	if !IsKnownWorkflow(p.Workflow) {
		return &ValidationError{Field: "workflow", Reason: fmt.Sprintf("unknown workflow %q", p.Workflow)}
	}
	switch p.Phase {
	case PhasePending, PhaseRunning, PhaseSucceeded, PhaseFailed, PhaseCancelled, PhaseWaiting, PhaseSuspended:
	default:
		return &ValidationError{Field: "phase", Reason: fmt.Sprintf("unknown phase %q", p.Phase)}
	}
	if p.Node == "" && p.VM == "" {
		return &ValidationError{Field: "node", Reason: "node or vm is required"}
	}
	if p.Node != "" {
		if err := checkNode("node", p.Node); err != nil {
			return err
		}
	}
	if p.VM != "" {
		ns, name, ok := strings.Cut(p.VM, "/")
		if !ok {
			return &ValidationError{Field: "vm", Reason: fmt.Sprintf("must be namespace/name, got %q", p.VM)}
		}
		if err := firstErr(checkNamespace("vm", ns), checkName("vm", name)); err != nil {
			return err
		}
	}
	for i, vm := range p.VMs {
		f := fmt.Sprintf("vms[%d].", i)
		if err := firstErr(checkNamespace(f+"namespace", vm.Namespace), checkName(f+"name", vm.Name),
			checkNonEmpty(f+"phase", vm.Phase), checkMax(f+"phase", vm.Phase, 4096), checkMax(f+"message", vm.Message, 4096)); err != nil {
			return err
		}
		if vm.Node != "" {
			if err := checkNode(f+"node", vm.Node); err != nil {
				return err
			}
		}
	}
	return nil
}

// Compile-time checks that every data struct is a Payload, by value and by pointer.
var (
	_ Payload = NodeNotReady{}
	_ Payload = (*NodeNotReady)(nil)
	_ Payload = NodeReady{}
	_ Payload = NodeFenced{}
	_ Payload = MaintenanceRequested{}
	_ Payload = (*MaintenanceRequested)(nil)
	_ Payload = MaintenanceEnded{}
	_ Payload = VMMigrateRequested{}
	_ Payload = VMMigrateCancelled{}
	_ Payload = Status{}
	_ Payload = (*Status)(nil)
)

func firstErr(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// checkNode: Kubernetes node names are DNS-1123 subdomains (lower case, ≤253 characters).
func checkNode(field, v string) error {
	if v == "" {
		return &ValidationError{Field: field, Reason: "is required"}
	}
	if errs := validation.IsDNS1123Subdomain(v); len(errs) > 0 {
		return &ValidationError{Field: field, Reason: fmt.Sprintf("%q is not a valid node name: %s", v, strings.Join(errs, "; "))}
	}
	return nil
}

// checkNamespace: namespaces are DNS-1123 labels (≤63 characters).
func checkNamespace(field, v string) error {
	if v == "" {
		return &ValidationError{Field: field, Reason: "namespace is required"}
	}
	if errs := validation.IsDNS1123Label(v); len(errs) > 0 {
		return &ValidationError{Field: field, Reason: fmt.Sprintf("%q is not a valid namespace: %s", v, strings.Join(errs, "; "))}
	}
	return nil
}

// checkName: object names (VirtualMachine) are DNS-1123 subdomains.
func checkName(field, v string) error {
	if v == "" {
		return &ValidationError{Field: field, Reason: "name is required"}
	}
	if errs := validation.IsDNS1123Subdomain(v); len(errs) > 0 {
		return &ValidationError{Field: field, Reason: fmt.Sprintf("%q is not a valid name: %s", v, strings.Join(errs, "; "))}
	}
	return nil
}

func checkMax(field, v string, n int) error {
	if utf8.RuneCountInString(v) > n {
		return &ValidationError{Field: field, Reason: fmt.Sprintf("longer than %d characters", n)}
	}
	return nil
}

func checkNonEmpty(field, v string) error {
	if strings.TrimSpace(v) == "" {
		return &ValidationError{Field: field, Reason: "is required"}
	}
	return nil
}

func checkTime(field string, t time.Time) error {
	if t.IsZero() {
		return &ValidationError{Field: field, Reason: "is required (zero time)"}
	}
	return nil
}
