package ingress_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cloudevents/sdk-go/v2/binding"
	"github.com/cloudevents/sdk-go/v2/event"
	cehttp "github.com/cloudevents/sdk-go/v2/protocol/http"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/producers/ingress"
	"github.com/drover-io/drover/schemas"
)

func hash(token string) string {
	h := sha256.Sum256([]byte(token))
	return hex.EncodeToString(h[:])
}

const (
	chatbotToken = "chatbot-secret"
	fencerToken  = "fencer-secret"
)

func tokenFile(chatbotTypes string) string {
	return `tokens:
- name: chatbot
  sha256: ` + hash(chatbotToken) + `
  types: [` + chatbotTypes + `]
- name: fencer
  sha256: ` + hash(fencerToken) + `
  types: [io.drover.node.fenced.v1]
`
}

type env struct {
	t       *testing.T
	srv     *natstest.Server
	js      jetstream.JetStream
	url     string
	path    string
	metrics *producers.Metrics
	errs    *errLog
}

type errLog struct {
	mu   sync.Mutex
	errs []error
}

func (l *errLog) add(err error) { l.mu.Lock(); l.errs = append(l.errs, err); l.mu.Unlock() }
func (l *errLog) count() int    { l.mu.Lock(); defer l.mu.Unlock(); return len(l.errs) }

func newEnv(t *testing.T, cfg consumers.Config) *env {
	t.Helper()
	srv := natstest.Start(t)
	js, err := jetstream.New(natstest.Connect(t, srv.URL()))
	require.NoError(t, err)
	_, err = consumers.Setup(context.Background(), js, cfg)
	require.NoError(t, err)
	path := filepath.Join(t.TempDir(), "tokens.yaml")
	require.NoError(t, os.WriteFile(path, []byte(tokenFile("io.drover.maintenance.requested.v1, io.drover.maintenance.ended.v1")), 0o600))
	e := &env{t: t, srv: srv, js: js, path: path, metrics: producers.NewMetrics(prometheus.NewRegistry()), errs: &errLog{}}
	src, err := ingress.NewTokenSource(path, e.errs.add)
	require.NoError(t, err)
	src.Every = 0
	h := &ingress.Handler{Publisher: &producers.Publisher{JS: js}, Tokens: src.Tokens, Metrics: e.metrics,
		Log: zerolog.New(zerolog.NewTestWriter(t)), PublishTimeout: 2 * time.Second}
	hs := httptest.NewServer(h)
	t.Cleanup(hs.Close)
	e.url = hs.URL
	return e
}

func maintenanceEvent(t *testing.T, id string) event.Event {
	t.Helper()
	e, err := schemas.New("chat/ops-room", id, &schemas.MaintenanceRequested{Node: "node-1", RequestID: "CHG-1", Reason: "BIOS", RequestedBy: "alice"})
	require.NoError(t, err)
	return e
}

// post sends e in the given mode with the bearer token and returns the status and answer.
func (e *env) post(ev event.Event, structured bool, token string) (int, http.Header, ingress.Answer) {
	e.t.Helper()
	req, err := http.NewRequest(http.MethodPost, e.url, nil)
	require.NoError(e.t, err)
	ctx := context.Background()
	if structured {
		ctx = binding.WithForceStructured(ctx)
	} else {
		ctx = binding.WithForceBinary(ctx)
	}
	require.NoError(e.t, cehttp.WriteRequest(ctx, binding.ToMessage(&ev), req))
	return e.do(req, token)
}

func (e *env) do(req *http.Request, token string) (int, http.Header, ingress.Answer) {
	e.t.Helper()
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(e.t, err)
	defer resp.Body.Close()
	var a ingress.Answer
	if resp.Header.Get("Content-Type") == "application/json" {
		require.NoError(e.t, json.NewDecoder(resp.Body).Decode(&a))
	}
	return resp.StatusCode, resp.Header, a
}

func (e *env) streamMsgs() uint64 {
	e.t.Helper()
	s, err := e.js.Stream(context.Background(), consumers.StreamRequests)
	require.NoError(e.t, err)
	info, err := s.Info(context.Background())
	require.NoError(e.t, err)
	return info.State.Msgs
}

func TestIngress(t *testing.T) {
	e := newEnv(t, consumers.Config{})

	t.Run("binary and structured modes are accepted after JetStream stored them", func(t *testing.T) {
		code, _, a := e.post(maintenanceEvent(t, "bin-1"), false, chatbotToken)
		require.Equal(t, http.StatusAccepted, code, a.Error)
		require.False(t, a.Duplicate)
		require.Equal(t, "drover.req.maintenance-requested.node-1", a.Subject)
		code, _, a = e.post(maintenanceEvent(t, "str-1"), true, chatbotToken)
		require.Equal(t, http.StatusAccepted, code, a.Error)
		require.Equal(t, uint64(2), e.streamMsgs())

		s, err := e.js.Stream(context.Background(), consumers.StreamRequests)
		require.NoError(t, err)
		raw, err := s.GetMsg(context.Background(), a.Sequence)
		require.NoError(t, err)
		stored, err := schemas.FromHeaders(raw.Header, raw.Data)
		require.NoError(t, err)
		require.Equal(t, "chatbot", stored.Extensions()["authid"], "the token's name is recorded with the event")
	})
	t.Run("the same event again is a duplicate, not a second request", func(t *testing.T) {
		code, _, a := e.post(maintenanceEvent(t, "bin-1"), false, chatbotToken)
		require.Equal(t, http.StatusAccepted, code)
		require.True(t, a.Duplicate)
		require.Equal(t, uint64(2), e.streamMsgs())
	})
	t.Run("no token, a wrong token: 401", func(t *testing.T) {
		for _, tok := range []string{"", "guess"} {
			code, h, a := e.post(maintenanceEvent(t, "x-"+tok), false, tok)
			require.Equal(t, http.StatusUnauthorized, code)
			require.Contains(t, h.Get("WWW-Authenticate"), "Bearer")
			require.Contains(t, a.Error, "bearer token")
		}
	})
	t.Run("a chat bot cannot declare a node fenced: 403, nothing stored", func(t *testing.T) {
		ev, err := schemas.New("chat/ops-room", "fence-1", &schemas.NodeFenced{Node: "node-3", Method: "ipmi", By: "bot"})
		require.NoError(t, err)
		before := e.streamMsgs()
		code, _, a := e.post(ev, false, chatbotToken)
		require.Equal(t, http.StatusForbidden, code)
		require.Contains(t, a.Error, `token "chatbot" may not publish io.drover.node.fenced.v1`)
		require.Equal(t, before, e.streamMsgs())
		code, _, _ = e.post(ev, false, fencerToken)
		require.Equal(t, http.StatusAccepted, code, "the fencing agent's token may")
	})
	t.Run("schema violations: 400 naming the field", func(t *testing.T) {
		req, err := http.NewRequest(http.MethodPost, e.url, strings.NewReader(`{"node":"node-1","reason":"r","requestedBy":"me","mode":"LiveMigrate"}`))
		require.NoError(t, err)
		for k, v := range map[string]string{"ce-specversion": "1.0", "ce-id": "bad-1", "ce-source": "chat", "ce-type": schemas.TypeMaintenanceRequested, "Content-Type": "application/json"} {
			req.Header.Set(k, v)
		}
		code, _, a := e.do(req, chatbotToken)
		require.Equal(t, http.StatusBadRequest, code)
		require.Contains(t, a.Field, "requestID")
	})
	t.Run("not a CloudEvent, a batch, a status: 400", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodPost, e.url, strings.NewReader(`{"hello":"world"}`))
		req.Header.Set("Content-Type", "application/json")
		code, _, a := e.do(req, chatbotToken)
		require.Equal(t, http.StatusBadRequest, code)
		require.Contains(t, a.Error, "not a CloudEvent")

		req, _ = http.NewRequest(http.MethodPost, e.url, strings.NewReader(`[]`))
		req.Header.Set("Content-Type", event.ApplicationCloudEventsBatchJSON)
		code, _, a = e.do(req, chatbotToken)
		require.Equal(t, http.StatusBadRequest, code)
		require.Contains(t, a.Error, "batched mode")

		st, err := schemas.New("x", "st-1", &schemas.Status{Operation: "o", Workflow: "recovery", Node: "node-1", Phase: "Running"})
		require.NoError(t, err)
		code, _, a = e.post(st, false, chatbotToken)
		require.Equal(t, http.StatusBadRequest, code)
		require.Contains(t, a.Error, "published by drover")
	})
	t.Run("an oversized body: 413", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodPost, e.url, bytes.NewReader(bytes.Repeat([]byte("x"), schemas.MaxEventBytes+16*1024)))
		req.Header.Set("Content-Type", "application/cloudevents+json")
		code, _, _ := e.do(req, chatbotToken)
		require.Equal(t, http.StatusRequestEntityTooLarge, code)
	})
	t.Run("other methods: 405; the webhook handshake is answered", func(t *testing.T) {
		req, _ := http.NewRequest(http.MethodGet, e.url, nil)
		code, h, _ := e.do(req, chatbotToken)
		require.Equal(t, http.StatusMethodNotAllowed, code)
		require.Contains(t, h.Get("Allow"), "POST")
		req, _ = http.NewRequest(http.MethodOptions, e.url, nil)
		req.Header.Set("WebHook-Request-Origin", "eventemitter.example.com")
		code, h, _ = e.do(req, "")
		require.Equal(t, http.StatusOK, code)
		require.Equal(t, "eventemitter.example.com", h.Get("WebHook-Allowed-Origin"))
	})
	t.Run("the token file is re-read when it changes; a broken one keeps the old tokens", func(t *testing.T) {
		require.NoError(t, os.WriteFile(e.path, []byte("tokens: [ {name: oops"), 0o600))
		code, _, _ := e.post(maintenanceEvent(t, "keep-1"), false, chatbotToken)
		require.Equal(t, http.StatusAccepted, code, "a file that does not parse changes nothing")
		require.Equal(t, 1, e.errs.count(), "and is reported once")

		require.NoError(t, os.WriteFile(e.path, []byte(tokenFile(`"*"`)), 0o600))
		ev, err := schemas.New("chat/ops-room", "fence-2", &schemas.NodeFenced{Node: "node-4", Method: "ipmi", By: "bot"})
		require.NoError(t, err)
		code, _, a := e.post(ev, false, chatbotToken)
		require.Equal(t, http.StatusAccepted, code, a.Error)
	})
	require.Equal(t, 1.0, testutil.ToFloat64(e.metrics.Duplicate.WithLabelValues(ingress.Source, schemas.TypeMaintenanceRequested)))
	require.Equal(t, 1.0, testutil.ToFloat64(e.metrics.Rejected.WithLabelValues(ingress.Source, "forbidden")))
}

// The stream pushing back (one subject full) is 429 with Retry-After; NATS
// gone is 503: both say a retry can help.
func TestIngressBackPressureAndOutage(t *testing.T) {
	e := newEnv(t, consumers.Config{MaxPerSubject: 2})
	for i, want := range []int{http.StatusAccepted, http.StatusAccepted, http.StatusTooManyRequests} {
		code, h, a := e.post(maintenanceEvent(t, "bp-"+string(rune('a'+i))), false, chatbotToken)
		require.Equal(t, want, code, a.Error)
		if want == http.StatusTooManyRequests {
			require.Equal(t, "5", h.Get("Retry-After"))
		}
	}
	e.srv.Shutdown()
	code, h, a := e.post(maintenanceEvent(t, "down-1"), false, chatbotToken)
	require.Equal(t, http.StatusServiceUnavailable, code, a.Error)
	require.Equal(t, "5", h.Get("Retry-After"))
}

func TestParseTokensRejectsBadFiles(t *testing.T) {
	for _, tt := range []struct{ name, file, want string }{
		{"unknown key", "tokens:\n- {name: a, sha256: " + hash("a") + ", types: ['*'], role: x}", "unknown field"},
		{"short hash", "tokens:\n- {name: a, sha256: abc, types: ['*']}", "tokens[0] (a).sha256"},
		{"no types", "tokens:\n- {name: a, sha256: " + hash("a") + "}", "tokens[0] (a).types: is required"},
		{"unknown type", "tokens:\n- {name: a, sha256: " + hash("a") + ", types: [io.drover.status.v1]}", "not a request event type"},
		{"duplicate name", "tokens:\n- {name: a, sha256: " + hash("a") + ", types: ['*']}\n- {name: a, sha256: " + hash("b") + ", types: ['*']}", "appears twice"},
		{"duplicate token", "tokens:\n- {name: a, sha256: " + hash("a") + ", types: ['*']}\n- {name: b, sha256: " + hash("a") + ", types: ['*']}", "listed twice"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ingress.ParseTokens([]byte(tt.file))
			require.ErrorContains(t, err, tt.want)
		})
	}
}
