package schemas

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"
)

// requireSameEvent compares what the contract cares about: attributes, extensions and data.
func requireSameEvent(t testing.TB, want, got event.Event) {
	t.Helper()
	require.Equal(t, want.SpecVersion(), got.SpecVersion())
	require.Equal(t, want.Type(), got.Type())
	require.Equal(t, want.Source(), got.Source())
	require.Equal(t, want.ID(), got.ID())
	require.Equal(t, want.Subject(), got.Subject())
	require.True(t, want.Time().Equal(got.Time()), "time %v != %v", want.Time(), got.Time())
	require.Equal(t, want.DataContentType(), got.DataContentType())
	require.JSONEq(t, string(want.Data()), string(got.Data()))
	require.Equal(t, len(want.Extensions()), len(got.Extensions()))
	for k, v := range want.Extensions() {
		require.Equal(t, v, got.Extensions()[k], "extension %s", k)
	}
}

func TestBinaryRoundTrip(t *testing.T) {
	tests := []struct {
		name       string
		source, id string
		ext        map[string]string
		p          Payload
		wantHeader map[string]string // raw header values on the wire
	}{
		{
			name: "plain", source: "drover/nodewatch", id: DeterministicID("uid", "t"),
			p:          NodeNotReady{Node: "1.1.1.211", Since: fixedTime, Reason: "NodeStatusUnknown"},
			wantHeader: map[string]string{"ce-source": "drover/nodewatch", "ce-subject": "1.1.1.211", "ce-specversion": "1.0", "ce-type": TypeNodeNotReady},
		},
		{
			// source is a URI-reference: the sdk keeps it in canonical (escaped) form, whose '%'
			// the binding then escapes again; id and extensions are plain strings.
			name: "spaces percent and non-ASCII", source: "drover chat/ünïcode", id: `id "1" 100% é`,
			ext:        map[string]string{"requester": "Zoë O'Brien 50%"},
			p:          NodeFenced{Node: "worker-1.example.com", Method: "ipmi", By: "Zoë"},
			wantHeader: map[string]string{"ce-source": "drover%2520chat/%25C3%25BCn%25C3%25AFcode", "ce-id": "id%20%221%22%20100%25%20%C3%A9", "ce-requester": "Zo%C3%AB%20O'Brien%2050%25", "ce-subject": "worker-1.example.com"},
		},
		{
			name: "spec example extension", source: "s", id: "i",
			ext:        map[string]string{"note": "Euro € 😀"},
			p:          Status{Operation: "op", Workflow: WorkflowMigration, VM: "tenant-a/db-0", Phase: PhaseRunning},
			wantHeader: map[string]string{"ce-note": "Euro%20%E2%82%AC%20%F0%9F%98%80", "ce-subject": "tenant-a/db-0"},
		},
		{
			name: "vm target", source: "urn:drover:cli", id: "x",
			p:          VMMigrateRequested{Namespace: "ns", Name: "vm-1", TargetNodeSelector: map[string]string{"zone": "b"}},
			wantHeader: map[string]string{"ce-source": "urn:drover:cli", "ce-subject": "ns/vm-1"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, err := New(tc.source, tc.id, tc.p)
			require.NoError(t, err)
			for k, v := range tc.ext {
				e.SetExtension(k, v)
			}
			subject, err := SubjectFor(tc.p)
			require.NoError(t, err)
			m, err := ToMsg(subject, e)
			require.NoError(t, err)

			require.Equal(t, subject, m.Subject)
			require.Equal(t, e.Data(), m.Data, "binary mode: the body is the data")
			require.Equal(t, ContentTypeJSON, m.Header.Get("Content-Type"))
			require.Equal(t, ContentTypeJSON, m.Header.Get("ce-datacontenttype"))
			require.Equal(t, MsgID(e), m.Header.Get(nats.MsgIdHdr))
			require.Equal(t, e.Time().UTC().Format("2006-01-02T15:04:05.999999999Z07:00"), m.Header.Get("ce-time"))
			require.Equal(t, e.Source(), mustDecode(t, m.Header.Get("ce-source")))
			require.Equal(t, tc.id, mustDecode(t, m.Header.Get("ce-id")))
			for k, v := range tc.wantHeader {
				require.Equal(t, v, m.Header.Get(k), "header %s", k)
			}
			for k, vs := range m.Header {
				for _, v := range vs {
					for i := 0; i < len(v); i++ {
						require.True(t, v[i] > 0x20 && v[i] < 0x7f, "header %s value %q has byte %#x", k, v, v[i])
					}
				}
			}

			got, err := FromMsg(m)
			require.NoError(t, err)
			requireSameEvent(t, e, got)
			got2, err := FromHeaders(m.Header, m.Data)
			require.NoError(t, err)
			requireSameEvent(t, e, got2)

			want, err := Decode(e)
			require.NoError(t, err)
			p, err := Decode(got)
			require.NoError(t, err)
			require.Equal(t, want, p)
		})
	}
}

func mustDecode(t testing.TB, v string) string {
	t.Helper()
	d, err := PercentDecode(v)
	require.NoError(t, err)
	return d
}

func TestPercentEncoding(t *testing.T) {
	tests := []struct {
		name    string
		in      string // header value as received
		want    string
		wantErr bool
	}{
		{name: "plain", in: "drover/cli", want: "drover/cli"},
		{name: "spec example", in: "Euro%20%E2%82%AC%20%F0%9F%98%80", want: "Euro € 😀"},
		{name: "lower-case hex", in: "a%2fb%c3%a9", want: "a/bé"},
		{name: "needless escapes", in: "%61%62", want: "ab"},
		{name: "quoted", in: `"hello world"`, want: "hello world"},
		{name: "quoted with escapes", in: `"say \"hi\" \\ bye"`, want: `say "hi" \ bye`},
		{name: "quoted then percent", in: `"a%20b"`, want: "a b"},
		{name: "empty quoted", in: `""`, want: ""},
		{name: "overlong space", in: "%C0%A0", wantErr: true},
		{name: "truncated utf-8", in: "%E2%82", wantErr: true},
		{name: "lone continuation byte", in: "%80", wantErr: true},
		{name: "surrogate", in: "%ED%A0%80", wantErr: true},
		{name: "truncated escape", in: "abc%2", wantErr: true},
		{name: "bare percent", in: "100%", wantErr: true},
		{name: "bad hex", in: "%G0", wantErr: true},
		{name: "raw invalid utf-8", in: "a\xffb", wantErr: true},
		{name: "unterminated quote", in: `"abc`, wantErr: true},
		{name: "unescaped inner quote", in: `"a"b"`, wantErr: true},
		{name: "dangling backslash", in: `"a\"`, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := PercentDecode(tc.in)
			if tc.wantErr {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, got)
		})
	}

	require.Equal(t, "Euro%20%E2%82%AC%20%F0%9F%98%80", PercentEncode("Euro € 😀"))
	require.Equal(t, "%22q%22%25%7F%00%0A", PercentEncode("\"q\"%\x7f\x00\n"))
	require.Equal(t, "!~a/b:c", PercentEncode("!~a/b:c"), "printable ASCII other than space, '\"' and '%' stays")
	for _, s := range []string{"", "plain", "with space", "ünïcode 😀", "%%", `"`, "\x00\x1f\x7f"} {
		back, err := PercentDecode(PercentEncode(s))
		require.NoError(t, err)
		require.Equal(t, s, back)
	}
}

func TestFromMsgBinaryLenient(t *testing.T) {
	body := []byte(`{"node":"worker-2","method":"ipmi","by":"alice"}`)
	tests := []struct {
		name   string
		header nats.Header
		check  func(t *testing.T, e event.Event)
	}{
		{
			name: "header names in any case",
			header: nats.Header{"CE-SpecVersion": {"1.0"}, "Ce-Id": {"1"}, "CE-SOURCE": {"s"}, "ce-Type": {TypeNodeFenced},
				"Ce-DataContentType": {"application/json"}},
		},
		{
			name:   "content-type instead of ce-datacontenttype",
			header: nats.Header{"ce-specversion": {"1.0"}, "ce-id": {"1"}, "ce-source": {"s"}, "ce-type": {TypeNodeFenced}, "Content-Type": {"application/json"}},
		},
		{
			name: "quoted values from an older sender",
			header: nats.Header{"ce-specversion": {`"1.0"`}, "ce-id": {`"id \"with\" space"`}, "ce-source": {`"drover/cli"`}, "ce-type": {TypeNodeFenced},
				"ce-datacontenttype": {"application/json"}},
			check: func(t *testing.T, e event.Event) {
				require.Equal(t, `id "with" space`, e.ID())
				require.Equal(t, "drover/cli", e.Source())
			},
		},
		{
			name: "extension and time",
			header: nats.Header{"ce-specversion": {"1.0"}, "ce-id": {"1"}, "ce-source": {"s"}, "ce-type": {TypeNodeFenced},
				"ce-datacontenttype": {"application/json"}, "ce-time": {"2026-11-21T16:00:00%2B01:00"}, "ce-traceparent": {"00-abc-def-01"}},
			check: func(t *testing.T, e event.Event) {
				require.True(t, e.Time().Equal(fixedTime.Add(-time.Hour)))
				require.Equal(t, "00-abc-def-01", e.Extensions()["traceparent"])
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, err := FromMsg(&nats.Msg{Subject: "drover.req.node-fenced.worker-2", Header: tc.header, Data: body})
			require.NoError(t, err)
			require.Equal(t, TypeNodeFenced, e.Type())
			if tc.check != nil {
				tc.check(t, e)
			}
		})
	}
}

func TestFromMsgStructured(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("testdata", "valid", "maintenance.requested.v1.json"))
	require.NoError(t, err)
	want := loadExample(t, TypeMaintenanceRequested)
	tests := []struct {
		name   string
		header nats.Header
	}{
		{name: "content-type", header: nats.Header{"Content-Type": {"application/cloudevents+json"}}},
		{name: "content-type with charset", header: nats.Header{"Content-Type": {"application/cloudevents+json; charset=utf-8"}}},
		{name: "content-type any case", header: nats.Header{"content-type": {"Application/CloudEvents+JSON"}}},
		{name: "no headers (pre-2.2 sender, nats pub)", header: nil},
		{name: "only unrelated headers", header: nats.Header{"Nats-Msg-Id": {"x"}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, err := FromMsg(&nats.Msg{Subject: "drover.req.maintenance-requested.worker-3", Header: tc.header, Data: b})
			require.NoError(t, err)
			requireSameEvent(t, want, e)
			p, err := Decode(e)
			require.NoError(t, err)
			require.Equal(t, ModeEvict, p.(*MaintenanceRequested).Mode)
		})
	}
}

func TestFromMsgRejects(t *testing.T) {
	good, err := New("s", "i", NodeReady{Node: "n1", Since: fixedTime})
	require.NoError(t, err)
	goodMsg, err := ToMsg("drover.req.node-ready.n1", good)
	require.NoError(t, err)
	withHeader := func(k, v string) *nats.Msg {
		m := &nats.Msg{Subject: goodMsg.Subject, Header: nats.Header{}, Data: goodMsg.Data}
		for hk, hv := range goodMsg.Header {
			m.Header[hk] = hv
		}
		if v == "" {
			delete(m.Header, k)
		} else {
			m.Header.Set(k, v)
		}
		return m
	}
	unknown, err := New("s", "i", NodeReady{Node: "n1", Since: fixedTime})
	require.NoError(t, err)
	unknown.SetType("io.drover.node.exploded.v1")
	unknownMsg := withHeader("ce-type", "io.drover.node.exploded.v1")

	tests := []struct {
		name        string
		m           *nats.Msg
		wantField   string
		wantUnknown bool
		subjectOnly bool // only FromMsg, which sees the subject, can tell
	}{
		{name: "nil message", m: nil, wantField: "event"},
		{name: "empty message", m: &nats.Msg{Subject: "x"}, wantField: "specversion"},
		{name: "text body, no headers", m: &nats.Msg{Subject: "x", Data: []byte("please drain worker-1")}, wantField: "event"},
		{name: "json body that is not an event", m: &nats.Msg{Subject: "x", Data: []byte(`{"node":"n1"}`)}, wantField: "event"},
		{name: "source not a URI-reference", m: withHeader("ce-source", "100%25"), wantField: "source"},
		{name: "json array body", m: &nats.Msg{Subject: "x", Data: []byte(`[1,2]`)}, wantField: "event"},
		{name: "structured garbage", m: &nats.Msg{Subject: "x", Header: nats.Header{"Content-Type": {"application/cloudevents+json"}}, Data: []byte(`{"specversion":`)}, wantField: "event"},
		{name: "structured batch", m: &nats.Msg{Subject: "x", Header: nats.Header{"Content-Type": {"application/cloudevents-batch+json"}}, Data: []byte(`[]`)}, wantField: "datacontenttype"},
		{name: "structured xml", m: &nats.Msg{Subject: "x", Header: nats.Header{"Content-Type": {"application/cloudevents+xml"}}, Data: []byte(`<e/>`)}, wantField: "datacontenttype"},
		{name: "ce headers without specversion", m: withHeader("ce-specversion", ""), wantField: "specversion"},
		{name: "specversion 0.3", m: withHeader("ce-specversion", "0.3"), wantField: "specversion"},
		{name: "missing id", m: withHeader("ce-id", ""), wantField: "id"},
		{name: "missing source", m: withHeader("ce-source", ""), wantField: "source"},
		{name: "bad percent-encoding", m: withHeader("ce-source", "a%zz"), wantField: "source"},
		{name: "overlong utf-8", m: withHeader("ce-id", "%C0%A0"), wantField: "id"},
		{name: "bad time", m: withHeader("ce-time", "yesterday"), wantField: "time"},
		{name: "duplicated header", m: func() *nats.Msg { m := withHeader("ce-id", "a"); m.Header.Add("ce-id", "b"); return m }(), wantField: "id"},
		{name: "wrong content type", m: withHeader("ce-datacontenttype", "text/plain"), wantField: "datacontenttype"},
		{name: "unknown type", m: unknownMsg, wantField: "type", wantUnknown: true},
		{name: "subject of another kind", m: func() *nats.Msg { m := withHeader("x", ""); m.Subject = "drover.req.node-notready.n1"; return m }(), wantField: "subject", subjectOnly: true},
		{name: "subject of another node", m: func() *nats.Msg { m := withHeader("x", ""); m.Subject = "drover.req.node-ready.n2"; return m }(), wantField: "subject", subjectOnly: true},
		{name: "body not json", m: func() *nats.Msg { m := withHeader("x", ""); m.Data = []byte("n1"); return m }(), wantField: "data"},
		{name: "empty body", m: func() *nats.Msg { m := withHeader("x", ""); m.Data = nil; return m }(), wantField: "data"},
		{name: "oversized body", m: func() *nats.Msg {
			m := withHeader("x", "")
			m.Data = []byte(strings.Repeat(" ", 5*MaxEventBytes))
			return m
		}(), wantField: "event"},
		{name: "oversized just over the limit", m: func() *nats.Msg {
			m := withHeader("x", "")
			m.Data = []byte(`{"node":"n1","since":"2026-11-21T16:00:00Z"}` + strings.Repeat(" ", MaxEventBytes))
			return m
		}(), wantField: "event"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := FromMsg(tc.m)
			requireInvalid(t, err, tc.wantField)
			require.Equal(t, tc.wantUnknown, errors.Is(err, ErrUnknownType))
			if tc.m != nil && !tc.subjectOnly {
				_, err = FromHeaders(tc.m.Header, tc.m.Data)
				require.ErrorIs(t, err, ErrInvalid)
			}
		})
	}
}

func TestToMsgRejects(t *testing.T) {
	e, err := New("s", "i", NodeReady{Node: "n1", Since: fixedTime})
	require.NoError(t, err)
	tests := []struct {
		name    string
		subject string
		e       event.Event
		wantErr error
	}{
		{name: "invalid event", subject: "drover.req.node-ready.n1", e: event.Event{}, wantErr: ErrInvalid},
		{name: "empty subject", subject: "", e: e, wantErr: ErrBadSubject},
		{name: "wildcard", subject: "drover.req.node-ready.*", e: e, wantErr: ErrBadSubject},
		{name: "full wildcard", subject: "drover.>", e: e, wantErr: ErrBadSubject},
		{name: "whitespace", subject: "drover.req.node-ready.n 1", e: e, wantErr: ErrBadSubject},
		{name: "empty token", subject: "drover..n1", e: e, wantErr: ErrBadSubject},
		{name: "another kind", subject: "drover.req.node-notready.n1", e: e, wantErr: ErrBadSubject},
		{name: "raw target", subject: "drover.req.node-ready.n.1", e: e, wantErr: ErrBadSubject},
		{name: "status subject for a request", subject: "drover.status.recovery.n1", e: e, wantErr: ErrBadSubject},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ToMsg(tc.subject, tc.e)
			require.ErrorIs(t, err, tc.wantErr)
		})
	}

	// A subject outside drover's namespaces (a test inbox, a mirror) is the caller's business.
	m, err := ToMsg("test.anything", e)
	require.NoError(t, err)
	require.Equal(t, "test.anything", m.Subject)
}

func FuzzFromHeaders(f *testing.F) {
	e, err := New("drover/fuzz", "seed", NodeReady{Node: "n1", Since: fixedTime})
	require.NoError(f, err)
	f.Add("1.0", "drover/fuzz", TypeNodeReady, "application/json", "", string(e.Data()))
	f.Add("1.0", "a%20b", TypeNodeReady, "application/json", "", `{"node":"n1","since":"2026-11-21T16:00:00Z"}`)
	f.Add("", "", "", "", "application/cloudevents+json", `{"specversion":"1.0","id":"1","source":"s","type":"io.drover.node.ready.v1","datacontenttype":"application/json","data":{"node":"n1","since":"2026-11-21T16:00:00Z"}}`)
	f.Add("", "", "", "", "", `{"specversion":"1.0"}`)
	f.Add("\"1.0", "%C0%A0", "x", "application/json", "", "[]")
	f.Fuzz(func(t *testing.T, specversion, source, typ, dct, contentType, body string) {
		h := nats.Header{}
		for k, v := range map[string]string{"ce-specversion": specversion, "ce-source": source, "ce-type": typ, "ce-datacontenttype": dct, "Content-Type": contentType} {
			if v != "" {
				h.Set(k, v)
			}
		}
		if specversion != "" {
			h.Set("ce-id", "fuzz")
		}
		got, err := FromHeaders(h, []byte(body))
		if err != nil {
			require.ErrorIs(t, err, ErrInvalid)
			return
		}
		// Whatever was accepted is a valid event that survives a round trip.
		require.NoError(t, Validate(got))
		m, err := ToMsg("fuzz.out", got)
		require.NoError(t, err)
		again, err := FromMsg(m)
		require.NoError(t, err)
		requireSameEvent(t, got, again)
	})
}
