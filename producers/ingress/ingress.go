// Package ingress is the HTTP CloudEvents producer: chat bots and other
// tools POST requests to /events in the HTTP binding's binary or structured
// mode; each is authenticated by a bearer token scoped to event types,
// validated against the schemas and published to JetStream, and answered
// 202 only after JetStream stored it.
package ingress

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	cehttp "github.com/cloudevents/sdk-go/v2/protocol/http"
	"github.com/rs/zerolog"

	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// Source labels this producer's metrics.
const Source = "ingress"

// Publisher publishes a validated event (producers.Publisher).
type Publisher interface {
	Publish(ctx context.Context, e event.Event) (producers.Result, error)
}

// Handler serves POST /events (and the CloudEvents webhook handshake on
// OPTIONS).
type Handler struct {
	Publisher Publisher
	// Tokens returns the tokens in force (a TokenSource re-reads its file).
	Tokens func() *Tokens
	// MaxBytes bounds a request body (default schemas.MaxEventBytes plus
	// room for a structured envelope).
	MaxBytes int64
	// PublishTimeout bounds the wait for JetStream (default 10s).
	PublishTimeout time.Duration
	Metrics        *producers.Metrics
	Log            zerolog.Logger
}

// Answer is the JSON body of every response.
type Answer struct {
	ID        string `json:"id,omitempty"`
	Subject   string `json:"subject,omitempty"`
	Stream    string `json:"stream,omitempty"`
	Sequence  uint64 `json:"sequence,omitempty"`
	Duplicate bool   `json:"duplicate,omitempty"`
	Error     string `json:"error,omitempty"`
	// Field names the offending part of an invalid event.
	Field string `json:"field,omitempty"`
}

// ServeHTTP implements http.Handler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodOptions:
		h.handshake(w, r)
		return
	case http.MethodPost:
	default:
		w.Header().Set("Allow", "POST, OPTIONS")
		h.fail(w, http.StatusMethodNotAllowed, "", "method_not_allowed", fmt.Errorf("%s not allowed: POST a CloudEvent", r.Method))
		return
	}
	name, allowed, ok := h.authenticate(r)
	if !ok {
		w.Header().Set("WWW-Authenticate", `Bearer realm="drover"`)
		h.fail(w, http.StatusUnauthorized, "", "unauthenticated", errors.New("a valid bearer token is required (Authorization: Bearer TOKEN)"))
		return
	}
	log := h.Log.With().Str("token", name).Str("remote", r.RemoteAddr).Logger()
	if cehttp.IsHTTPBatch(r.Header) {
		h.fail(w, http.StatusBadRequest, "", "invalid", errors.New("batched mode is not accepted: send one event per request"))
		return
	}
	limit := h.MaxBytes
	if limit <= 0 {
		limit = schemas.MaxEventBytes + 8*1024
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, limit))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			h.fail(w, http.StatusRequestEntityTooLarge, "", "too_large", fmt.Errorf("request body larger than %d bytes", limit))
			return
		}
		h.fail(w, http.StatusBadRequest, "", "invalid", fmt.Errorf("read request body: %w", err))
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	e, err := cehttp.NewEventFromHTTPRequest(r)
	if err != nil {
		h.fail(w, http.StatusBadRequest, "", "invalid", fmt.Errorf("not a CloudEvent in the HTTP binary or structured mode: %w", err))
		return
	}
	h.metrics().Received.WithLabelValues(Source, e.Type()).Inc()
	if e.Type() == schemas.TypeStatus {
		h.fail(w, http.StatusBadRequest, "type", "invalid", fmt.Errorf("%s events are published by drover, not requested", schemas.TypeStatus))
		return
	}
	if _, err := schemas.Decode(*e); err != nil {
		var ve *schemas.ValidationError
		field := ""
		if errors.As(err, &ve) {
			field = ve.Field
		}
		h.fail(w, http.StatusBadRequest, field, "invalid", err)
		return
	}
	if !allowed(e.Type()) {
		h.fail(w, http.StatusForbidden, "type", "forbidden", fmt.Errorf("token %q may not publish %s", name, e.Type()))
		return
	}
	// Who asked, as the CloudEvents auth context extension says it; a
	// client's own claim is replaced.
	e.SetExtension("authtype", "api_key")
	e.SetExtension("authid", name)
	timeout := h.PublishTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	res, err := h.Publisher.Publish(ctx, *e)
	switch {
	case errors.Is(err, producers.ErrBackPressure):
		w.Header().Set("Retry-After", "5")
		h.fail(w, http.StatusTooManyRequests, "", "back_pressure", err)
		return
	case errors.Is(err, schemas.ErrInvalid):
		h.fail(w, http.StatusBadRequest, "", "invalid", err)
		return
	case err != nil:
		w.Header().Set("Retry-After", "5")
		h.fail(w, http.StatusServiceUnavailable, "", "unavailable", fmt.Errorf("%w (retrying can help)", err))
		return
	}
	h.metrics().Published.WithLabelValues(Source, e.Type()).Inc()
	if res.Duplicate {
		h.metrics().Duplicate.WithLabelValues(Source, e.Type()).Inc()
	}
	log.Info().Str("event", e.ID()).Str("type", e.Type()).Str("subject", res.Subject).Bool("duplicate", res.Duplicate).Msg("event accepted")
	writeJSON(w, http.StatusAccepted, Answer{ID: res.ID, Subject: res.Subject, Stream: res.Stream, Sequence: res.Sequence, Duplicate: res.Duplicate})
}

var unregistered = producers.NewMetrics(nil)

func (h *Handler) metrics() *producers.Metrics {
	if h.Metrics == nil {
		return unregistered
	}
	return h.Metrics
}

// authenticate checks the bearer token.
func (h *Handler) authenticate(r *http.Request) (string, func(string) bool, bool) {
	auth := r.Header.Get("Authorization")
	bearer, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok || bearer == "" || h.Tokens == nil {
		return "", nil, false
	}
	ts := h.Tokens()
	if ts == nil {
		return "", nil, false
	}
	return ts.Lookup(strings.TrimSpace(bearer))
}

// handshake answers the CloudEvents webhook abuse-protection validation
// request (CloudEvents HTTP webhook spec, section 4): it allows the origin
// that asks, at any rate. It grants nothing: every POST still needs a token.
func (h *Handler) handshake(w http.ResponseWriter, r *http.Request) {
	origin := r.Header.Get("WebHook-Request-Origin")
	if origin == "" {
		w.Header().Set("Allow", "POST, OPTIONS")
		w.WriteHeader(http.StatusOK)
		return
	}
	w.Header().Set("Allow", "POST, OPTIONS")
	w.Header().Set("WebHook-Allowed-Origin", origin)
	w.Header().Set("WebHook-Allowed-Rate", "*")
	w.WriteHeader(http.StatusOK)
}

func (h *Handler) fail(w http.ResponseWriter, code int, field, reason string, err error) {
	h.metrics().Rejected.WithLabelValues(Source, reason).Inc()
	h.Log.Info().Int("status", code).Str("reason", reason).Err(err).Msg("event refused")
	writeJSON(w, code, Answer{Error: err.Error(), Field: field})
}

func writeJSON(w http.ResponseWriter, code int, a Answer) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(a)
}
