package schemas

import (
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/stretchr/testify/require"
)

// kvKeyRe is nats.go jetstream's KV key rule; tokens are valid KV keys too, so the runtime can key
// per-node leases by them.
var kvKeyRe = regexp.MustCompile(`^[-/_=\.a-zA-Z0-9]+$`)

// requireValidToken checks what NATS requires of one subject token (non-empty, no '.', '*', '>',
// whitespace) and more: printable ASCII only, and a valid KV key.
func requireValidToken(t testing.TB, tok string) {
	t.Helper()
	require.NotEmpty(t, tok)
	require.False(t, strings.ContainsAny(tok, ".*> \t\r\n\f\v"), "token %q has a forbidden character", tok)
	for i := 0; i < len(tok); i++ {
		require.True(t, tok[i] > 0x20 && tok[i] < 0x7f, "token %q has a non-printable byte at %d", tok, i)
	}
	require.Regexp(t, kvKeyRe, tok)
}

func TestTokenRoundTrip(t *testing.T) {
	long := strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 61)
	require.Len(t, long, 253)
	tests := []struct {
		name string
		in   string
		want string // expected token, "" to only check validity and round trip
	}{
		{name: "ip address", in: "1.1.1.211", want: "1_1_1_211"},
		{name: "fqdn", in: "worker-1.example.com", want: "worker-1_example_com"},
		{name: "plain", in: "worker-1", want: "worker-1"},
		{name: "namespace/name", in: "tenant-a/db-0", want: "tenant-a/db-0"},
		{name: "underscore", in: "node_a", want: "node=5Fa"},
		{name: "star", in: "a*b", want: "a=2Ab"},
		{name: "greater", in: "a>b", want: "a=3Eb"},
		{name: "escape char", in: "a=b", want: "a=3Db"},
		{name: "253 chars", in: long, want: strings.ReplaceAll(long, ".", "_")},
		{name: "unicode", in: "узел-1.пример", want: ""},
		{name: "emoji", in: "node-😀", want: "node-=F0=9F=98=80"},
		{name: "spaces", in: "my node\tname\n", want: "my=20node=09name=0A"},
		{name: "only dots", in: "...", want: "___"},
		{name: "invalid utf8", in: "a\xffb", want: "a=FFb"},
		{name: "nul", in: "\x00", want: "=00"},
		{name: "upper case", in: "Worker-A", want: "Worker-A"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tok, err := EncodeToken(tc.in)
			require.NoError(t, err)
			if tc.want != "" {
				require.Equal(t, tc.want, tok)
			}
			requireValidToken(t, tok)
			back, err := DecodeToken(tok)
			require.NoError(t, err)
			require.Equal(t, tc.in, back)

			subj, err := RequestSubject(KindNodeNotReady, tc.in)
			require.NoError(t, err)
			require.Equal(t, 4, len(strings.Split(subj, ".")), "subject %q must have exactly 4 tokens", subj)
			prefix, kind, target, err := ParseSubject(subj)
			require.NoError(t, err)
			require.Equal(t, RequestPrefix, prefix)
			require.Equal(t, KindNodeNotReady, kind)
			require.Equal(t, tc.in, target)
		})
	}
}

func TestTokenEmptyRejected(t *testing.T) {
	_, err := EncodeToken("")
	require.ErrorIs(t, err, ErrBadSubject)
	_, err = DecodeToken("")
	require.ErrorIs(t, err, ErrBadSubject)
	_, err = RequestSubject(KindNodeReady, "")
	require.ErrorIs(t, err, ErrBadSubject)
	_, err = StatusSubject(WorkflowRecovery, "")
	require.ErrorIs(t, err, ErrBadSubject)
}

func TestDecodeTokenRejectsNonCanonical(t *testing.T) {
	tests := []struct {
		name string
		tok  string
	}{
		{name: "dot", tok: "a.b"},
		{name: "star", tok: "a*b"},
		{name: "greater", tok: ">"},
		{name: "space", tok: "a b"},
		{name: "percent", tok: "a%20b"},
		{name: "non-ascii", tok: "é"},
		{name: "lower-case hex", tok: "a=2ab"},
		{name: "truncated escape", tok: "a=2"},
		{name: "escape at end", tok: "a="},
		{name: "bad hex", tok: "a=ZZ"},
		{name: "needless escape of letter", tok: "=41"},
		{name: "needless escape of dot", tok: "=2E"},
		{name: "needless escape of slash", tok: "=2F"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := DecodeToken(tc.tok)
			require.ErrorIs(t, err, ErrBadSubject)
		})
	}
}

func FuzzTokenRoundTrip(f *testing.F) {
	for _, s := range []string{"1.1.1.211", "worker-1.example.com", "node_a", "a*b", "a>b", "a=b", "é", " ", "=41", "a_b", "%"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := EncodeToken(s)
		if s == "" {
			require.ErrorIs(t, err, ErrBadSubject)
			return
		}
		require.NoError(t, err)
		requireValidToken(t, tok)
		back, err := DecodeToken(tok)
		require.NoError(t, err)
		require.Equal(t, s, back)

		// Read as a token, s decodes only if it is the canonical spelling of something.
		if dec, err := DecodeToken(s); err == nil {
			again, err := EncodeToken(dec)
			require.NoError(t, err)
			require.Equal(t, s, again)
		}
		_ = utf8.ValidString(s)
	})
}

func TestSubjects(t *testing.T) {
	tests := []struct {
		name       string
		p          Payload
		want       string
		wantPrefix string
		wantKind   string
		wantTarget string
	}{
		{name: "notready", p: NodeNotReady{Node: "1.1.1.211"}, want: "drover.req.node-notready.1_1_1_211", wantPrefix: RequestPrefix, wantKind: KindNodeNotReady, wantTarget: "1.1.1.211"},
		{name: "ready", p: &NodeReady{Node: "n1"}, want: "drover.req.node-ready.n1", wantPrefix: RequestPrefix, wantKind: KindNodeReady, wantTarget: "n1"},
		{name: "fenced", p: NodeFenced{Node: "n1"}, want: "drover.req.node-fenced.n1", wantPrefix: RequestPrefix, wantKind: KindNodeFenced, wantTarget: "n1"},
		{name: "maintenance requested", p: MaintenanceRequested{Node: "worker-1.example.com"}, want: "drover.req.maintenance-requested.worker-1_example_com", wantPrefix: RequestPrefix, wantKind: KindMaintenanceRequested, wantTarget: "worker-1.example.com"},
		{name: "maintenance ended", p: MaintenanceEnded{Node: "n1"}, want: "drover.req.maintenance-ended.n1", wantPrefix: RequestPrefix, wantKind: KindMaintenanceEnded, wantTarget: "n1"},
		{name: "vm migrate", p: VMMigrateRequested{Namespace: "ns", Name: "vm.1"}, want: "drover.req.vm-migrate-requested.ns/vm_1", wantPrefix: RequestPrefix, wantKind: KindVMMigrateRequested, wantTarget: "ns/vm.1"},
		{name: "vm cancel", p: &VMMigrateCancelled{Namespace: "ns", Name: "vm"}, want: "drover.req.vm-migrate-cancelled.ns/vm", wantPrefix: RequestPrefix, wantKind: KindVMMigrateCancelled, wantTarget: "ns/vm"},
		{name: "status node", p: Status{Workflow: WorkflowRecovery, Node: "n.1"}, want: "drover.status.recovery.n_1", wantPrefix: StatusPrefix, wantKind: WorkflowRecovery, wantTarget: "n.1"},
		{name: "status migration prefers vm", p: &Status{Workflow: WorkflowMigration, Node: "n1", VM: "ns/vm"}, want: "drover.status.migration.ns/vm", wantPrefix: StatusPrefix, wantKind: WorkflowMigration, wantTarget: "ns/vm"},
		{name: "status maintenance prefers node", p: Status{Workflow: WorkflowMaintenance, Node: "n1", VM: "ns/vm"}, want: "drover.status.maintenance.n1", wantPrefix: StatusPrefix, wantKind: WorkflowMaintenance, wantTarget: "n1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := SubjectFor(tc.p)
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
			prefix, kind, target, err := ParseSubject(got)
			require.NoError(t, err)
			require.Equal(t, tc.wantPrefix, prefix)
			require.Equal(t, tc.wantKind, kind)
			require.Equal(t, tc.wantTarget, target)
		})
	}
}

func TestSubjectErrors(t *testing.T) {
	tests := []struct {
		name string
		fn   func() error
	}{
		{name: "unknown kind", fn: func() error { _, err := RequestSubject("node-exploded", "n1"); return err }},
		{name: "unknown workflow", fn: func() error { _, err := StatusSubject("chaos", "n1"); return err }},
		{name: "nil payload", fn: func() error { _, err := SubjectFor(nil); return err }},
		{name: "typed nil payload", fn: func() error { _, err := SubjectFor((*NodeReady)(nil)); return err }},
		{name: "empty target", fn: func() error { _, err := SubjectFor(NodeReady{}); return err }},
		{name: "parse too few tokens", fn: func() error { _, _, _, err := ParseSubject("drover.req.node-ready"); return err }},
		{name: "parse too many tokens", fn: func() error { _, _, _, err := ParseSubject("drover.req.node-ready.a.b"); return err }},
		{name: "parse foreign prefix", fn: func() error { _, _, _, err := ParseSubject("other.req.node-ready.a"); return err }},
		{name: "parse unknown section", fn: func() error { _, _, _, err := ParseSubject("drover.dlq.node-ready.a"); return err }},
		{name: "parse unknown kind", fn: func() error { _, _, _, err := ParseSubject("drover.req.nope.a"); return err }},
		{name: "parse unknown workflow", fn: func() error { _, _, _, err := ParseSubject("drover.status.nope.a"); return err }},
		{name: "parse bad token", fn: func() error { _, _, _, err := ParseSubject("drover.req.node-ready.a=zz"); return err }},
		{name: "parse wildcard", fn: func() error { _, _, _, err := ParseSubject("drover.req.node-ready.*"); return err }},
		{name: "parse empty", fn: func() error { _, _, _, err := ParseSubject(""); return err }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			require.ErrorIs(t, tc.fn(), ErrBadSubject)
		})
	}
}

func TestFilters(t *testing.T) {
	require.Equal(t, "drover.req.node-notready.*", RequestFilter(KindNodeNotReady))
	require.Equal(t, "drover.status.recovery.*", StatusFilter(WorkflowRecovery))
	require.Equal(t, []string{"drover.req.node-notready.*", "drover.req.node-ready.*", "drover.req.node-fenced.*"}, WorkflowFilters(WorkflowRecovery))
	require.Equal(t, []string{"drover.req.maintenance-requested.*", "drover.req.maintenance-ended.*"}, WorkflowFilters(WorkflowMaintenance))
	require.Equal(t, []string{"drover.req.vm-migrate-requested.*", "drover.req.vm-migrate-cancelled.*"}, WorkflowFilters(WorkflowMigration))
	require.Nil(t, WorkflowFilters("nope"))

	// Every kind belongs to exactly one workflow, and the type/kind maps agree.
	seen := map[string]bool{}
	for _, w := range Workflows() {
		for _, k := range KindsForWorkflow(w) {
			require.False(t, seen[k], "kind %s in two workflows", k)
			seen[k] = true
			got, ok := WorkflowForKind(k)
			require.True(t, ok)
			require.Equal(t, w, got)
			typ, ok := TypeForKind(k)
			require.True(t, ok)
			back, ok := KindForType(typ)
			require.True(t, ok)
			require.Equal(t, k, back)
		}
	}
	require.ElementsMatch(t, Kinds(), keys(seen))
	_, ok := KindForType(TypeStatus)
	require.False(t, ok)
}

func keys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
