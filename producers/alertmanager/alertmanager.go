// Package alertmanager is Alertmanager's webhook receiver: firing node
// alerts (KubeNodeNotReady, KubeNodeUnreachable) become node.notready
// events, resolved ones node.ready. It answers 2xx only once JetStream
// acknowledged every event of the payload, and 5xx otherwise, so that
// Alertmanager retries; ids derive from each alert's fingerprint and start,
// so Alertmanager's repeats and retries publish nothing twice.
package alertmanager

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/prometheus/alertmanager/template"
	"github.com/prometheus/common/model"
	"github.com/rs/zerolog"

	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// Source is the CloudEvents source of the events the receiver publishes.
const Source = "drover/alertmanager"

// MetricsSource labels this producer's metrics (producers.Metrics).
const MetricsSource = "alertmanager"

// Path is where the receiver listens on drover's HTTP listener.
const Path = "/alertmanager"

// Defaults of Receiver.
const (
	DefaultNodeLabel = "node"
	DefaultMaxBody   = 1 << 20
)

// DefaultAlerts are the alert names mapped to node events.
var DefaultAlerts = []string{"KubeNodeNotReady", "KubeNodeUnreachable"}

// Publisher publishes one event and waits for JetStream's acknowledgement.
type Publisher interface {
	Publish(ctx context.Context, e event.Event) (producers.Result, error)
}

// Receiver is the webhook endpoint (an http.Handler).
type Receiver struct {
	Publisher Publisher
	// Token is the shared secret: a bearer token, or the password of basic
	// auth, as Alertmanager's http_config sends them. An empty token refuses
	// every request.
	Token []byte
	// Alerts are the alert names that become node events (DefaultAlerts).
	Alerts []string
	// NodeLabel is the label naming the node (DefaultNodeLabel).
	NodeLabel string
	// MaxBody bounds a payload (DefaultMaxBody).
	MaxBody int64
	// Timeout bounds the publishing of one payload (default 10s).
	Timeout time.Duration
	Log     zerolog.Logger
	// Metrics, shared by the producers (source "alertmanager"); nil: not counted.
	Metrics *producers.Metrics
}

var unregistered = producers.NewMetrics(nil)

func (r *Receiver) metrics() *producers.Metrics {
	if r.Metrics == nil {
		return unregistered
	}
	return r.Metrics
}

func (r *Receiver) reject(reason string) {
	r.metrics().Rejected.WithLabelValues(MetricsSource, reason).Inc()
}

// Message is the webhook payload, version 4.
type Message struct {
	*template.Data
	Version         string `json:"version"`
	GroupKey        string `json:"groupKey"`
	TruncatedAlerts uint64 `json:"truncatedAlerts"`
}

// Response is what the receiver answers.
type Response struct {
	Published  int      `json:"published"`
	Duplicates int      `json:"duplicates"`
	Ignored    int      `json:"ignored"`
	Skipped    []string `json:"skipped,omitempty"`
	Error      string   `json:"error,omitempty"`
}

func (r *Receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	code, resp := r.serve(req)
	if code == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="drover", Basic realm="drover"`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(resp)
}

func (r *Receiver) serve(req *http.Request) (int, Response) {
	if req.Method != http.MethodPost {
		return http.StatusMethodNotAllowed, Response{Error: "POST an Alertmanager webhook payload"}
	}
	if !r.authorized(req) {
		r.reject("unauthenticated")
		r.Log.Warn().Str("remote", req.RemoteAddr).Msg("alertmanager webhook: unauthorized request refused")
		return http.StatusUnauthorized, Response{Error: "unauthorized: send the bearer token (or basic auth with it as the password)"}
	}
	limit := r.MaxBody
	if limit <= 0 {
		limit = DefaultMaxBody
	}
	body, err := io.ReadAll(http.MaxBytesReader(nil, req.Body, limit))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		r.reject("too_large")
		return http.StatusRequestEntityTooLarge, Response{Error: fmt.Sprintf("payload larger than %d bytes", limit)}
	}
	if err != nil {
		r.reject("invalid")
		return http.StatusBadRequest, Response{Error: "read payload: " + err.Error()}
	}
	var msg Message
	if err := json.Unmarshal(body, &msg); err != nil {
		r.reject("invalid")
		return http.StatusBadRequest, Response{Error: "malformed payload: " + err.Error()}
	}
	if msg.Version != "4" {
		r.reject("invalid")
		return http.StatusBadRequest, Response{Error: fmt.Sprintf("payload version %q: this receiver takes version 4", msg.Version)}
	}
	if msg.Data == nil {
		r.reject("invalid")
		return http.StatusBadRequest, Response{Error: "malformed payload: no alerts"}
	}
	events, resp := r.events(msg)
	timeout := r.Timeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(req.Context(), timeout)
	defer cancel()
	for _, e := range events {
		res, err := r.Publisher.Publish(ctx, e)
		if err != nil {
			if errors.Is(err, producers.ErrBackPressure) {
				r.reject("back_pressure")
			} else {
				r.reject("unavailable")
			}
			r.Log.Error().Err(err).Str("event", e.ID()).Msg("alertmanager webhook: publish failed; answering 503 so that Alertmanager retries")
			resp.Error = "publish: " + err.Error()
			return http.StatusServiceUnavailable, resp
		}
		r.metrics().Published.WithLabelValues(MetricsSource, e.Type()).Inc()
		if res.Duplicate {
			resp.Duplicates++
			r.metrics().Duplicate.WithLabelValues(MetricsSource, e.Type()).Inc()
		} else {
			resp.Published++
		}
		r.Log.Info().Str("type", e.Type()).Str("event", e.ID()).Bool("duplicate", res.Duplicate).Msg("alertmanager webhook: node event published")
	}
	return http.StatusOK, resp
}

// events maps the payload's alerts to node events; unmapped alerts are
// ignored, alerts without a usable node label are reported, not guessed.
func (r *Receiver) events(msg Message) ([]event.Event, Response) {
	var resp Response
	mapped := map[string]bool{}
	names := r.Alerts
	if len(names) == 0 {
		names = DefaultAlerts
	}
	for _, n := range names {
		mapped[n] = true
	}
	label := r.NodeLabel
	if label == "" {
		label = DefaultNodeLabel
	}
	var out []event.Event
	for _, a := range msg.Alerts {
		name := a.Labels["alertname"]
		if !mapped[name] {
			resp.Ignored++
			continue
		}
		fp := a.Fingerprint
		if fp == "" {
			fp = labelSet(a.Labels).Fingerprint().String()
		}
		skip := func(why string) {
			resp.Skipped = append(resp.Skipped, fmt.Sprintf("%s (fingerprint %s): %s", name, fp, why))
			r.reject("invalid")
			r.Log.Warn().Str("alert", name).Str("fingerprint", fp).Str("labels", fmt.Sprint(a.Labels)).Msg("alertmanager webhook: alert skipped: " + why)
		}
		node := a.Labels[label]
		if node == "" {
			skip(fmt.Sprintf("no %q label naming the node; drover does not guess it", label))
			continue
		}
		start := a.StartsAt.UTC().Format(time.RFC3339Nano)
		detail := fmt.Sprintf("Alertmanager alert %s (fingerprint %s, started %s, receiver %s)", name, fp, start, msg.Receiver)
		var (
			e   event.Event
			err error
		)
		switch a.Status {
		case string(model.AlertFiring):
			e, err = schemas.New(Source, schemas.DeterministicID(fp, start), &schemas.NodeNotReady{Node: node, Since: a.StartsAt.UTC(), Reason: name, SourceDetail: detail})
		case string(model.AlertResolved):
			since := a.EndsAt
			if since.IsZero() {
				since = time.Now()
			}
			e, err = schemas.New(Source, schemas.DeterministicID(fp, start, "resolved"), &schemas.NodeReady{Node: node, Since: since.UTC()})
		default:
			skip(fmt.Sprintf("unknown alert status %q", a.Status))
			continue
		}
		if err != nil {
			skip(err.Error())
			continue
		}
		r.metrics().Received.WithLabelValues(MetricsSource, e.Type()).Inc()
		out = append(out, e)
	}
	return out, resp
}

// authorized compares the request's bearer token or basic-auth password
// with the token in constant time (hashes of equal length).
func (r *Receiver) authorized(req *http.Request) bool {
	if len(r.Token) == 0 {
		return false
	}
	var got string
	if _, pass, ok := req.BasicAuth(); ok {
		got = pass
	} else if h := req.Header.Get("Authorization"); len(h) > 7 && strings.EqualFold(h[:7], "Bearer ") {
		got = strings.TrimSpace(h[7:])
	} else {
		return false
	}
	want := sha256.Sum256(r.Token)
	have := sha256.Sum256([]byte(got))
	return subtle.ConstantTimeCompare(want[:], have[:]) == 1
}

func labelSet(kv template.KV) model.LabelSet {
	ls := model.LabelSet{}
	keys := make([]string, 0, len(kv))
	for k := range kv {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		ls[model.LabelName(k)] = model.LabelValue(kv[k])
	}
	return ls
}
