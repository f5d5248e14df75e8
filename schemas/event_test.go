package schemas

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/binding/format"
	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/stretchr/testify/require"
)

var fixedTime = time.Date(2026, 11, 21, 16, 0, 0, 0, time.UTC)

// exampleFiles maps each event type to its example in testdata/valid.
var exampleFiles = map[string]string{
	TypeNodeNotReady:         "node.notready.v1.json",
	TypeNodeReady:            "node.ready.v1.json",
	TypeNodeFenced:           "node.fenced.v1.json",
	TypeMaintenanceRequested: "maintenance.requested.v1.json",
	TypeMaintenanceEnded:     "maintenance.ended.v1.json",
	TypeVMMigrateRequested:   "vm.migrate.requested.v1.json",
	TypeVMMigrateCancelled:   "vm.migrate.cancelled.v1.json",
	TypeStatus:               "status.v1.json",
}

func loadExample(t testing.TB, eventType string) event.Event {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "valid", exampleFiles[eventType]))
	require.NoError(t, err)
	var e event.Event
	require.NoError(t, format.JSON.Unmarshal(b, &e))
	return e
}

// withData returns a copy of e whose data is changed by mutate (applied to the data as a map).
func withData(t testing.TB, e event.Event, mutate func(d map[string]any)) event.Event {
	t.Helper()
	var d map[string]any
	require.NoError(t, json.Unmarshal(e.Data(), &d))
	mutate(d)
	c := e.Clone()
	require.NoError(t, c.SetData(ContentTypeJSON, d))
	return c
}

// requireInvalid checks err is a *ValidationError matching ErrInvalid whose field is want.
func requireInvalid(t testing.TB, err error, wantField string) *ValidationError {
	t.Helper()
	require.Error(t, err)
	require.ErrorIs(t, err, ErrInvalid)
	var ve *ValidationError
	require.True(t, errors.As(err, &ve), "error %v (%T) is not a *ValidationError", err, err)
	require.Equal(t, wantField, ve.Field, "error: %v", err)
	require.Contains(t, err.Error(), wantField)
	return ve
}

func TestEmbeddedSchemasCompile(t *testing.T) {
	require.NoError(t, Check())
	compiled, err := compileSchemas()
	require.NoError(t, err)
	require.Len(t, compiled, len(Types()))
	for _, typ := range Types() {
		t.Run(typ, func(t *testing.T) {
			require.Contains(t, compiled, typ)
			b, err := Schema(typ)
			require.NoError(t, err)
			var doc map[string]any
			require.NoError(t, json.Unmarshal(b, &doc))
			require.Equal(t, "https://json-schema.org/draft/2020-12/schema", doc["$schema"])
			require.Equal(t, false, doc["additionalProperties"])
			require.Contains(t, doc["description"], typ)
			require.Contains(t, exampleFiles, typ, "every type has an example in testdata/valid")
		})
	}
	_, err = Schema("io.drover.nope.v1")
	require.ErrorIs(t, err, ErrUnknownType)
}

func TestExamplesValid(t *testing.T) {
	wantPayload := map[string]Payload{
		TypeNodeNotReady:         &NodeNotReady{},
		TypeNodeReady:            &NodeReady{},
		TypeNodeFenced:           &NodeFenced{},
		TypeMaintenanceRequested: &MaintenanceRequested{},
		TypeMaintenanceEnded:     &MaintenanceEnded{},
		TypeVMMigrateRequested:   &VMMigrateRequested{},
		TypeVMMigrateCancelled:   &VMMigrateCancelled{},
		TypeStatus:               &Status{},
	}
	for _, typ := range Types() {
		t.Run(typ, func(t *testing.T) {
			e := loadExample(t, typ)
			require.NoError(t, Validate(e))
			p, err := Decode(e)
			require.NoError(t, err)
			require.IsType(t, wantPayload[typ], p)
			require.Equal(t, typ, p.EventType())
			require.Equal(t, e.Subject(), p.Target())
			require.NoError(t, p.Validate())

			// Re-publishing the decoded payload gives the same data.
			again, err := New(e.Source(), e.ID(), p)
			require.NoError(t, err)
			require.JSONEq(t, string(e.Data()), string(again.Data()))
		})
	}
}

func TestInvalidData(t *testing.T) {
	tests := []struct {
		name      string
		eventType string
		mutate    func(d map[string]any)
		wantField string
		wantIn    string // substring of the reason
	}{
		{"notready missing node", TypeNodeNotReady, func(d map[string]any) { delete(d, "node") }, "data.node", "missing"},
		{"notready missing since", TypeNodeNotReady, func(d map[string]any) { delete(d, "since") }, "data.since", "missing"},
		{"notready missing reason", TypeNodeNotReady, func(d map[string]any) { delete(d, "reason") }, "data.reason", "missing"},
		{"notready extra property", TypeNodeNotReady, func(d map[string]any) { d["severity"] = "high" }, "data.severity", "unknown property"},
		{"notready since not a time", TypeNodeNotReady, func(d map[string]any) { d["since"] = "yesterday" }, "data.since", "date-time"},
		{"notready node with underscore", TypeNodeNotReady, func(d map[string]any) { d["node"] = "node_a" }, "data.node", "pattern"},
		{"notready node upper case", TypeNodeNotReady, func(d map[string]any) { d["node"] = "Worker-1" }, "data.node", "pattern"},
		{"notready node too long", TypeNodeNotReady, func(d map[string]any) { d["node"] = strings.Repeat("a", 254) }, "data.node", "maxLength"},
		{"notready node trailing dot", TypeNodeNotReady, func(d map[string]any) { d["node"] = "worker-1." }, "data.node", "pattern"},
		{"notready node wrong type", TypeNodeNotReady, func(d map[string]any) { d["node"] = 42 }, "data.node", "string"},
		{"ready missing since", TypeNodeReady, func(d map[string]any) { delete(d, "since") }, "data.since", "missing"},
		{"ready extra property", TypeNodeReady, func(d map[string]any) { d["reason"] = "x" }, "data.reason", "unknown property"},
		{"fenced missing method", TypeNodeFenced, func(d map[string]any) { delete(d, "method") }, "data.method", "missing"},
		{"fenced missing by", TypeNodeFenced, func(d map[string]any) { delete(d, "by") }, "data.by", "missing"},
		{"fenced empty by", TypeNodeFenced, func(d map[string]any) { d["by"] = "" }, "data.by", "minLength"},
		{"fenced extra property", TypeNodeFenced, func(d map[string]any) { d["Node"] = "x" }, "data.Node", "unknown property"},
		{"maintenance missing requestID", TypeMaintenanceRequested, func(d map[string]any) { delete(d, "requestID") }, "data.requestID", "missing"},
		{"maintenance missing requestedBy", TypeMaintenanceRequested, func(d map[string]any) { delete(d, "requestedBy") }, "data.requestedBy", "missing"},
		{"maintenance missing mode", TypeMaintenanceRequested, func(d map[string]any) { delete(d, "mode") }, "data.mode", "missing"},
		{"maintenance wrong mode", TypeMaintenanceRequested, func(d map[string]any) { d["mode"] = "Drain" }, "data.mode", "LiveMigrate"},
		{"maintenance mode wrong case", TypeMaintenanceRequested, func(d map[string]any) { d["mode"] = "evict" }, "data.mode", "Evict"},
		{"maintenance window without start", TypeMaintenanceRequested, func(d map[string]any) { d["window"] = map[string]any{"end": "2026-11-22T03:00:00Z"} }, "data.window.start", "missing"},
		{"maintenance window extra property", TypeMaintenanceRequested, func(d map[string]any) { d["window"].(map[string]any)["tz"] = "UTC" }, "data.window.tz", "unknown property"},
		{"maintenance window ends before start", TypeMaintenanceRequested, func(d map[string]any) { d["window"].(map[string]any)["end"] = "2026-11-21T00:00:00Z" }, "data.window.end", "after"},
		{"maintenance extra property", TypeMaintenanceRequested, func(d map[string]any) { d["priority"] = 1 }, "data.priority", "unknown property"},
		{"ended missing requestID", TypeMaintenanceEnded, func(d map[string]any) { delete(d, "requestID") }, "data.requestID", "missing"},
		{"ended extra property", TypeMaintenanceEnded, func(d map[string]any) { d["mode"] = "Evict" }, "data.mode", "unknown property"},
		{"migrate missing namespace", TypeVMMigrateRequested, func(d map[string]any) { delete(d, "namespace") }, "data.namespace", "missing"},
		{"migrate missing name", TypeVMMigrateRequested, func(d map[string]any) { delete(d, "name") }, "data.name", "missing"},
		{"migrate namespace with dot", TypeVMMigrateRequested, func(d map[string]any) { d["namespace"] = "a.b" }, "data.namespace", "pattern"},
		{"migrate selector value not string", TypeVMMigrateRequested, func(d map[string]any) { d["targetNodeSelector"] = map[string]any{"zone": 1} }, "data.targetNodeSelector.zone", "string"},
		{"migrate selector bad key", TypeVMMigrateRequested, func(d map[string]any) { d["targetNodeSelector"] = map[string]any{"bad key!": "x"} }, "data.targetNodeSelector", "bad key!"},
		{"migrate extra property", TypeVMMigrateRequested, func(d map[string]any) { d["node"] = "n1" }, "data.node", "unknown property"},
		{"cancel missing name", TypeVMMigrateCancelled, func(d map[string]any) { delete(d, "name") }, "data.name", "missing"},
		{"cancel extra property", TypeVMMigrateCancelled, func(d map[string]any) { d["targetNodeSelector"] = map[string]any{} }, "data.targetNodeSelector", "unknown property"},
		{"status missing operation", TypeStatus, func(d map[string]any) { delete(d, "operation") }, "data.operation", "missing"},
		{"status missing workflow", TypeStatus, func(d map[string]any) { delete(d, "workflow") }, "data.workflow", "missing"},
		{"status wrong workflow", TypeStatus, func(d map[string]any) { d["workflow"] = "chaos" }, "data.workflow", "maintenance"},
		{"status missing phase", TypeStatus, func(d map[string]any) { delete(d, "phase") }, "data.phase", "missing"},
		{"status wrong phase", TypeStatus, func(d map[string]any) { d["phase"] = "Done" }, "data.phase", "Succeeded"},
		{"status neither node nor vm", TypeStatus, func(d map[string]any) { delete(d, "node") }, "data", "node"},
		{"status vm not namespace/name", TypeStatus, func(d map[string]any) { d["vm"] = "db-0" }, "data.vm", "pattern"},
		{"status vm progress missing phase", TypeStatus, func(d map[string]any) { delete(d["vms"].([]any)[1].(map[string]any), "phase") }, "data.vms[1].phase", "missing"},
		{"status vm progress extra property", TypeStatus, func(d map[string]any) { d["vms"].([]any)[0].(map[string]any)["uid"] = "x" }, "data.vms[0].uid", "unknown property"},
		{"status extra property", TypeStatus, func(d map[string]any) { d["progress"] = 50 }, "data.progress", "unknown property"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := withData(t, loadExample(t, tc.eventType), tc.mutate)
			err := Validate(e)
			ve := requireInvalid(t, err, tc.wantField)
			require.Contains(t, ve.Reason, tc.wantIn)
			_, derr := Decode(e)
			require.Equal(t, err.Error(), derr.Error())
		})
	}
}

func TestInvalidDataNotObject(t *testing.T) {
	tests := []struct {
		name string
		data []byte
	}{
		{name: "array", data: []byte(`[]`)},
		{name: "string", data: []byte(`"node"`)},
		{name: "null", data: []byte(`null`)},
		{name: "not json", data: []byte(`{node: n1}`)},
		{name: "trailing garbage", data: []byte(`{"node":"n1","since":"2026-11-21T16:00:00Z"} x`)},
		{name: "empty", data: nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := loadExample(t, TypeNodeReady)
			e.DataEncoded = tc.data
			requireInvalid(t, Validate(e), "data")
		})
	}
}

func TestValidateAttributes(t *testing.T) {
	tests := []struct {
		name      string
		mutate    func(e *event.Event)
		wantField string
		unknown   bool
	}{
		{name: "zero event (not a CloudEvent)", mutate: func(e *event.Event) { *e = event.Event{} }, wantField: "specversion"},
		{name: "specversion 0.3", mutate: func(e *event.Event) { e.SetSpecVersion("0.3") }, wantField: "specversion"},
		{name: "missing id", mutate: func(e *event.Event) { e.SetID("") }, wantField: "id"},
		{name: "blank id", mutate: func(e *event.Event) { e.SetID("   ") }, wantField: "id"},
		{name: "missing source", mutate: func(e *event.Event) { e.SetSource("") }, wantField: "source"},
		{name: "missing type", mutate: func(e *event.Event) { e.SetType("") }, wantField: "type"},
		{name: "unknown type", mutate: func(e *event.Event) { e.SetType("io.drover.node.exploded.v1") }, wantField: "type", unknown: true},
		{name: "unversioned type", mutate: func(e *event.Event) { e.SetType("io.drover.node.ready") }, wantField: "type", unknown: true},
		{name: "missing datacontenttype", mutate: func(e *event.Event) { e.SetDataContentType("") }, wantField: "datacontenttype"},
		{name: "xml datacontenttype", mutate: func(e *event.Event) { e.SetDataContentType("application/xml") }, wantField: "datacontenttype"},
		{name: "subject mismatch", mutate: func(e *event.Event) { e.SetSubject("other-node") }, wantField: "subject"},
		{name: "control character in id", mutate: func(e *event.Event) { e.SetID("a\nb") }, wantField: "id"},
		{name: "control character in extension", mutate: func(e *event.Event) { e.SetExtension("trace", "a\x00b") }, wantField: "trace"},
		{name: "oversized", mutate: func(e *event.Event) { e.SetExtension("pad", strings.Repeat("x", MaxEventBytes)) }, wantField: "event"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := loadExample(t, TypeNodeReady)
			tc.mutate(&e)
			err := Validate(e)
			requireInvalid(t, err, tc.wantField)
			require.Equal(t, tc.unknown, errors.Is(err, ErrUnknownType))
			_, err = Decode(e)
			requireInvalid(t, err, tc.wantField)
			require.Equal(t, tc.unknown, errors.Is(err, ErrUnknownType))
		})
	}
}

func TestDatacontenttypeWithCharset(t *testing.T) {
	e := loadExample(t, TypeNodeReady)
	e.SetDataContentType("application/json; charset=utf-8")
	require.NoError(t, Validate(e))
}

func TestOversizedData(t *testing.T) {
	_, err := New("drover/test", "big", NodeNotReady{Node: "n1", Since: fixedTime, Reason: "x", SourceDetail: strings.Repeat("y", MaxEventBytes)})
	requireInvalid(t, err, "event")

	// Just under the limit passes; the schema caps sourceDetail at 4096, so pad with an extension.
	e, err := New("drover/test", "fits", NodeReady{Node: "n1", Since: fixedTime})
	require.NoError(t, err)
	pad := MaxEventBytes - eventSize(e) - len("pad")
	e.SetExtension("pad", strings.Repeat("x", pad))
	require.Equal(t, MaxEventBytes, eventSize(e))
	require.NoError(t, Validate(e))
	e.SetExtension("pad", strings.Repeat("x", pad+1))
	requireInvalid(t, Validate(e), "event")
}

func TestNew(t *testing.T) {
	before := time.Now().UTC()
	e, err := New("drover/cli", "id-1", &MaintenanceRequested{Node: "worker-1.example.com", RequestID: "r1", Reason: "disk", RequestedBy: "alice"})
	require.NoError(t, err)
	require.Equal(t, event.CloudEventsVersionV1, e.SpecVersion())
	require.Equal(t, TypeMaintenanceRequested, e.Type())
	require.Equal(t, "drover/cli", e.Source())
	require.Equal(t, "id-1", e.ID())
	require.Equal(t, "worker-1.example.com", e.Subject())
	require.Equal(t, ContentTypeJSON, e.DataContentType())
	require.False(t, e.Time().Before(before))
	require.Equal(t, time.UTC, e.Time().Location())

	p, err := Decode(e)
	require.NoError(t, err)
	require.Equal(t, ModeLiveMigrate, p.(*MaintenanceRequested).Mode, "empty mode is published as LiveMigrate")
}

func TestNewRejects(t *testing.T) {
	tests := []struct {
		name      string
		source    string
		id        string
		p         Payload
		wantField string
	}{
		{name: "nil payload", source: "s", id: "i", p: nil, wantField: "data"},
		{name: "typed nil payload", source: "s", id: "i", p: (*NodeFenced)(nil), wantField: "data"},
		{name: "empty source", source: "", id: "i", p: NodeFenced{Node: "n1", Method: "m", By: "b"}, wantField: "source"},
		{name: "empty id", source: "s", id: "", p: NodeFenced{Node: "n1", Method: "m", By: "b"}, wantField: "id"},
		{name: "zero since", source: "s", id: "i", p: NodeReady{Node: "n1"}, wantField: "data.since"},
		{name: "empty node", source: "s", id: "i", p: NodeReady{Since: fixedTime}, wantField: "data.node"},
		{name: "bad mode", source: "s", id: "i", p: MaintenanceRequested{Node: "n1", RequestID: "r", Reason: "r", RequestedBy: "b", Mode: "Yolo"}, wantField: "data.mode"},
		{name: "zero window start", source: "s", id: "i", p: MaintenanceRequested{Node: "n1", RequestID: "r", Reason: "r", RequestedBy: "b", Window: &Window{}}, wantField: "data.window.start"},
		{name: "namespace too long", source: "s", id: "i", p: VMMigrateCancelled{Namespace: strings.Repeat("n", 64), Name: "vm"}, wantField: "data.namespace"},
		{name: "selector value invalid", source: "s", id: "i", p: VMMigrateRequested{Namespace: "ns", Name: "vm", TargetNodeSelector: map[string]string{"zone": "not valid!"}}, wantField: "data.targetNodeSelector.zone"},
		{name: "status vm progress bad node", source: "s", id: "i", p: Status{Operation: "o", Workflow: WorkflowRecovery, Node: "n1", Phase: PhaseRunning, VMs: []VMProgress{{Namespace: "ns", Name: "vm", Phase: "Running", Node: "Bad_Node"}}}, wantField: "data.vms[0].node"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.source, tc.id, tc.p)
			requireInvalid(t, err, tc.wantField)
		})
	}
}

// TestPayloadValidate covers the Go-side checks directly, including ones the schema also makes,
// because producers call Payload.Validate before they build an event.
func TestPayloadValidate(t *testing.T) {
	end := fixedTime.Add(time.Hour)
	tests := []struct {
		name      string
		p         Payload
		wantField string // "" means valid
	}{
		{name: "ip node", p: NodeReady{Node: "1.1.1.211", Since: fixedTime}},
		{name: "253-char node", p: NodeReady{Node: strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 61), Since: fixedTime}},
		{name: "254-char node", p: NodeReady{Node: strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 62), Since: fixedTime}, wantField: "node"},
		{name: "node_a", p: NodeReady{Node: "node_a", Since: fixedTime}, wantField: "node"},
		{name: "a*b", p: NodeFenced{Node: "a*b", Method: "m", By: "b"}, wantField: "node"},
		{name: "unicode node", p: NodeFenced{Node: "узел", Method: "m", By: "b"}, wantField: "node"},
		{name: "blank reason", p: NodeNotReady{Node: "n1", Since: fixedTime, Reason: "  "}, wantField: "reason"},
		{name: "window ok", p: MaintenanceRequested{Node: "n1", RequestID: "r", Reason: "r", RequestedBy: "b", Mode: ModeEvict, Window: &Window{Start: fixedTime, End: &end}}},
		{name: "window end equals start", p: MaintenanceRequested{Node: "n1", RequestID: "r", Reason: "r", RequestedBy: "b", Window: &Window{Start: fixedTime, End: &fixedTime}}, wantField: "window.end"},
		{name: "ended no request", p: MaintenanceEnded{Node: "n1"}, wantField: "requestID"},
		{name: "vm ok", p: VMMigrateRequested{Namespace: "ns", Name: "vm.with.dots", TargetNodeSelector: map[string]string{"kubernetes.io/hostname": "worker-1"}}},
		{name: "vm name upper", p: VMMigrateCancelled{Namespace: "ns", Name: "VM"}, wantField: "name"},
		{name: "status vm only", p: Status{Operation: "o", Workflow: WorkflowMigration, VM: "ns/vm", Phase: PhaseSucceeded}},
		{name: "status no target", p: Status{Operation: "o", Workflow: WorkflowMigration, Phase: PhaseSucceeded}, wantField: "node"},
		{name: "status vm without slash", p: Status{Operation: "o", Workflow: WorkflowMigration, VM: "vm", Phase: PhaseSucceeded}, wantField: "vm"},
		{name: "status unknown workflow", p: Status{Operation: "o", Workflow: "x", Node: "n1", Phase: PhaseSucceeded}, wantField: "workflow"},
		{name: "status unknown phase", p: Status{Operation: "o", Workflow: WorkflowRecovery, Node: "n1", Phase: "Done"}, wantField: "phase"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.p.Validate()
			if tc.wantField == "" {
				require.NoError(t, err)
				return
			}
			requireInvalid(t, err, tc.wantField)
		})
	}
}

// TestValidateConcurrent: consumers validate from several workers at once (run with -race).
func TestValidateConcurrent(t *testing.T) {
	events := make([]event.Event, 0, len(Types()))
	for _, typ := range Types() {
		events = append(events, loadExample(t, typ))
	}
	bad := withData(t, loadExample(t, TypeNodeFenced), func(d map[string]any) { delete(d, "by") })
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		go func() {
			for i := 0; i < 50; i++ {
				for _, e := range events {
					if _, err := Decode(e); err != nil {
						errs <- err
						return
					}
				}
				if err := Validate(bad); err == nil {
					errs <- errors.New("invalid event accepted")
					return
				}
			}
			errs <- nil
		}()
	}
	for w := 0; w < 8; w++ {
		select {
		case err := <-errs:
			require.NoError(t, err)
		case <-time.After(60 * time.Second):
			t.Fatal("validation workers did not finish")
		}
	}
}

// NewStatus skips the JSON Schema for drover's own typed statuses: whatever
// it accepts must pass the full validation, and what the Go checks refuse it
// refuses.
func TestNewStatusMatchesTheSchema(t *testing.T) {
	long := strings.Repeat("m", 4096)
	for _, phase := range []string{PhasePending, PhaseRunning, PhaseWaiting, PhaseSuspended, PhaseSucceeded, PhaseFailed, PhaseCancelled} {
		for _, st := range []*Status{
			{Operation: "maintenance.node-1.r", Workflow: WorkflowMaintenance, Node: "node-1", Phase: phase},
			{Operation: "migration.ns.vm.r", Workflow: WorkflowMigration, VM: "ns/vm.1", Phase: phase, Message: long,
				Generation: 3, Attempt: 2, Summary: &Summary{Total: 2, Phases: map[string]int{"Running": 1, "Migrating": 1}},
				VMs: []VMProgress{{Namespace: "ns", Name: "vm.1", Phase: "Migrating", Node: "1.1.1.211", Message: long}, {Namespace: "ns", Name: "b", Phase: "Running"}}},
		} {
			e, err := NewStatus("drover/test", "id-"+phase, st)
			require.NoError(t, err, phase)
			p, err := Decode(e)
			require.NoError(t, err, "phase %s: NewStatus built an event the schema refuses", phase)
			require.Equal(t, st, p)
			m, err := NewStatusMsg("drover/test", "id-"+phase, st)
			require.NoError(t, err)
			want, err := StatusSubject(st.Workflow, st.Target())
			require.NoError(t, err)
			require.Equal(t, want, m.Subject)
			back, err := FromHeaders(m.Header, m.Data)
			require.NoError(t, err)
			p, err = Decode(back)
			require.NoError(t, err, "phase %s: NewStatusMsg built a message the schema refuses", phase)
			require.Equal(t, st, p)
		}
	}
	_, err := NewStatus("s", "i", &Status{Operation: "o", Workflow: WorkflowRecovery, Node: "node-1", Phase: "Exploded"})
	require.ErrorIs(t, err, ErrInvalid)
	huge := &Status{Operation: "o", Workflow: WorkflowRecovery, Node: "node-1", Phase: PhaseRunning}
	for i := 0; i < 40; i++ {
		huge.VMs = append(huge.VMs, VMProgress{Namespace: "ns", Name: "vm-" + strconv.Itoa(i), Phase: "Running", Message: long})
	}
	_, err = NewStatus("s", "i", huge)
	require.ErrorContains(t, err, "exceeds the limit")
	_, err = NewStatus("s", "i", &Status{Operation: "o", Workflow: WorkflowRecovery, Node: "node-1", Phase: PhaseRunning, Message: long + "x"})
	require.ErrorContains(t, err, "longer than 4096")
}
