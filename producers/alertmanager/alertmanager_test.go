package alertmanager

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

const payload = `{"version":"4","receiver":"drover","status":"firing","groupKey":"{}:{node=\"w1\"}","alerts":[
 {"status":"firing","labels":{"alertname":"KubeNodeNotReady","node":"w1"},"startsAt":"2026-11-29T10:00:00Z","fingerprint":"f1"},
 {"status":"firing","labels":{"alertname":"KubeNodeUnreachable","node":"1.1.1.211"},"startsAt":"2026-11-29T10:01:00Z","fingerprint":"f2"},
 {"status":"resolved","labels":{"alertname":"KubeNodeNotReady","node":"w2"},"startsAt":"2026-11-29T09:00:00Z","endsAt":"2026-11-29T10:02:00Z","fingerprint":"f3"},
 {"status":"firing","labels":{"alertname":"HighCPU","node":"w1"},"startsAt":"2026-11-29T10:00:00Z","fingerprint":"f4"},
 {"status":"firing","labels":{"alertname":"KubeNodeNotReady","instance":"10.0.0.9"},"startsAt":"2026-11-29T10:00:00Z","fingerprint":"f5"}
]}`

// jetStream is a real nats-server with drover's streams.
func jetStream(t *testing.T) jetstream.JetStream {
	t.Helper()
	nc := natstest.Connect(t, natstest.Start(t).URL())
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	_, err = consumers.Setup(context.Background(), js, consumers.Config{})
	require.NoError(t, err)
	return js
}

func post(t *testing.T, h http.Handler, auth func(*http.Request), body string) (int, string) {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, Path, strings.NewReader(body))
	if auth != nil {
		auth(req)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

func bearer(tok string) func(*http.Request) {
	return func(r *http.Request) { r.Header.Set("Authorization", "Bearer "+tok) }
}

func TestReceiver(t *testing.T) {
	js := jetStream(t)
	r := &Receiver{Publisher: &producers.Publisher{JS: js}, Token: []byte("tok"), Log: zerolog.Nop(), Metrics: producers.NewMetrics(prometheus.NewRegistry())}

	code, body := post(t, r, bearer("tok"), payload)
	require.Equal(t, http.StatusOK, code, body)
	require.Contains(t, body, `"published":3`)
	require.Contains(t, body, `"ignored":1`)
	require.Contains(t, body, `KubeNodeNotReady (fingerprint f5): no \"node\" label naming the node; drover does not guess it`)

	// What JetStream holds: two node.notready (one for a node whose name is
	// not a subject token), one node.ready.
	s, err := js.Stream(context.Background(), consumers.StreamRequests)
	require.NoError(t, err)
	info, err := s.Info(context.Background())
	require.NoError(t, err)
	require.Equal(t, uint64(3), info.State.Msgs)
	m, err := s.GetLastMsgForSubject(context.Background(), "drover.req.node-ready.w2")
	require.NoError(t, err)
	ev, err := schemas.FromHeaders(m.Header, m.Data)
	require.NoError(t, err)
	p, err := schemas.Decode(ev)
	require.NoError(t, err)
	require.Equal(t, time.Date(2026, 11, 29, 10, 2, 0, 0, time.UTC), p.(*schemas.NodeReady).Since)
	m, err = s.GetLastMsgForSubject(context.Background(), "drover.req.node-notready.1_1_1_211")
	require.NoError(t, err)
	ev, err = schemas.FromHeaders(m.Header, m.Data)
	require.NoError(t, err)
	p, err = schemas.Decode(ev)
	require.NoError(t, err)
	nr := p.(*schemas.NodeNotReady)
	require.Equal(t, "KubeNodeUnreachable", nr.Reason)
	require.Contains(t, nr.SourceDetail, "fingerprint f2")

	// Alertmanager's repeat (or retry) of the same payload publishes nothing new.
	code, body = post(t, r, bearer("tok"), payload)
	require.Equal(t, http.StatusOK, code)
	require.Contains(t, body, `"published":0,"duplicates":3`)
	info, err = s.Info(context.Background())
	require.NoError(t, err)
	require.Equal(t, uint64(3), info.State.Msgs)
	require.Equal(t, 2.0, testutil.ToFloat64(r.Metrics.Duplicate.WithLabelValues(MetricsSource, schemas.TypeNodeNotReady)))
	require.Equal(t, 4.0, testutil.ToFloat64(r.Metrics.Published.WithLabelValues(MetricsSource, schemas.TypeNodeNotReady)))
	require.Equal(t, 2.0, testutil.ToFloat64(r.Metrics.Rejected.WithLabelValues(MetricsSource, "invalid")), "the unlabelled alert, twice")
}

func TestReceiverRefuses(t *testing.T) {
	r := &Receiver{Publisher: failing{}, Token: []byte("tok"), MaxBody: 2048, Log: zerolog.Nop()}
	basic := func(user, pass string) func(*http.Request) {
		return func(r *http.Request) { r.SetBasicAuth(user, pass) }
	}
	tests := []struct {
		name string
		auth func(*http.Request)
		body string
		code int
		says string
	}{
		{name: "no credentials", body: payload, code: http.StatusUnauthorized, says: "unauthorized"},
		{name: "wrong bearer token", auth: bearer("tok2"), body: payload, code: http.StatusUnauthorized},
		{name: "a token that is a prefix", auth: bearer("to"), body: payload, code: http.StatusUnauthorized},
		{name: "basic auth with the wrong password", auth: basic("alertmanager", "nope"), body: payload, code: http.StatusUnauthorized},
		{name: "malformed JSON", auth: bearer("tok"), body: `{"version":"4","alerts":[`, code: http.StatusBadRequest, says: "malformed payload"},
		{name: "another version", auth: bearer("tok"), body: `{"version":"3","alerts":[]}`, code: http.StatusBadRequest, says: "version 4"},
		{name: "too large", auth: bearer("tok"), body: `{"version":"4","receiver":"` + strings.Repeat("x", 4096) + `"}`, code: http.StatusRequestEntityTooLarge},
		{name: "JetStream refuses: 5xx so that Alertmanager retries", auth: basic("alertmanager", "tok"), body: payload, code: http.StatusServiceUnavailable, says: "back-pressure"},
		{name: "nothing to publish is fine even when JetStream would refuse", auth: bearer("tok"), body: `{"version":"4","alerts":[]}`, code: http.StatusOK},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			code, body := post(t, r, tc.auth, tc.body)
			require.Equal(t, tc.code, code, body)
			require.Contains(t, body, tc.says)
		})
	}
	t.Run("an empty token refuses everyone", func(t *testing.T) {
		code, _ := post(t, &Receiver{Publisher: failing{}, Log: zerolog.Nop()}, bearer(""), payload)
		require.Equal(t, http.StatusUnauthorized, code)
	})
	t.Run("GET", func(t *testing.T) {
		rec := httptest.NewRecorder()
		r.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, Path, nil))
		require.Equal(t, http.StatusMethodNotAllowed, rec.Code)
	})
}

// failing is a publisher whose stream is full.
type failing struct{}

func (failing) Publish(context.Context, event.Event) (producers.Result, error) {
	return producers.Result{}, errors.Join(producers.ErrBackPressure)
}
