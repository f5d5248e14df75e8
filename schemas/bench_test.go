package schemas

import (
	"testing"
)

func benchEvent(b *testing.B) (string, Payload) {
	b.Helper()
	p := &Status{Operation: "maintenance/worker-3/CHG-1234", Workflow: WorkflowMaintenance, Node: "worker-3.example.com", Phase: PhaseRunning,
		VMs: []VMProgress{
			{Namespace: "tenant-a", Name: "db-0", Phase: "Migrating", Node: "worker-3.example.com"},
			{Namespace: "tenant-b", Name: "web-1", Phase: "Running", Node: "worker-7.example.com"},
		}, Message: "1 of 2 VMs moved"}
	subject, err := SubjectFor(p)
	if err != nil {
		b.Fatal(err)
	}
	return subject, p
}

// BenchmarkToMsgFromMsg is the per-message cost of the binding on both sides: validate and
// encode on publish, decode and validate on consume.
func BenchmarkToMsgFromMsg(b *testing.B) {
	subject, p := benchEvent(b)
	e, err := New("drover/consumer/maintenance", "bench id é", p)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		m, err := ToMsg(subject, e)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := FromMsg(m); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkValidate is one full validation: attributes, JSON Schema, Go-side checks.
func BenchmarkValidate(b *testing.B) {
	_, p := benchEvent(b)
	e, err := New("drover/consumer/maintenance", "bench", p)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := Validate(e); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkEncodeToken(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := EncodeToken("worker-1.example.com"); err != nil {
			b.Fatal(err)
		}
	}
}
