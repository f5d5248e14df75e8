package producers

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/drover-io/drover/schemas"
)

// Result is what JetStream said about one published event.
type Result struct {
	ID        string // CloudEvent id
	Subject   string
	MsgID     string // Nats-Msg-Id
	Stream    string
	Sequence  uint64
	Duplicate bool // JetStream already had this message id inside its duplicate window
}

// ErrBackPressure is returned when the request stream is full: nothing was
// stored; retrying later can succeed.
var ErrBackPressure = errors.New("request stream full (back-pressure), retry later")

// ErrNoStream is returned when no stream takes the subject: drover is not
// running against this NATS, or the subject's kind is unknown.
var ErrNoStream = errors.New("no JetStream stream accepts this subject")

// errCodeStoreFailed is JetStream's JSStreamStoreFailedF: with discard-new,
// a full stream refuses a message with it and "maximum messages/bytes exceeded".
const errCodeStoreFailed jetstream.ErrorCode = 10077

// Publisher publishes validated events.
type Publisher struct {
	JS jetstream.JetStream
	// Metrics, when set, count what Publish is given and what JetStream
	// says (received, published, duplicate, rejected) under Source. Leave it
	// nil for producers that count at their own edge (ingress, nodewatch,
	// alertmanager, nodemaintenance), or they count twice.
	Metrics *Metrics
	Source  string
}

// Publish validates e, derives its subject from its payload and publishes it
// in CloudEvents binary mode, waiting for JetStream's acknowledgement. An
// invalid event returns an error wrapping schemas.ErrInvalid and is not sent.
func (p *Publisher) Publish(ctx context.Context, e event.Event) (Result, error) {
	res, err := p.publish(ctx, e)
	if m := p.Metrics; m != nil {
		m.Received.WithLabelValues(p.Source, e.Type()).Inc()
		switch {
		case errors.Is(err, schemas.ErrInvalid):
			m.Rejected.WithLabelValues(p.Source, "invalid").Inc()
		case errors.Is(err, ErrBackPressure):
			m.Rejected.WithLabelValues(p.Source, "back_pressure").Inc()
		case err != nil:
			m.Rejected.WithLabelValues(p.Source, "unavailable").Inc()
		default:
			m.Published.WithLabelValues(p.Source, e.Type()).Inc()
			if res.Duplicate {
				m.Duplicate.WithLabelValues(p.Source, e.Type()).Inc()
			}
		}
	}
	return res, err
}

func (p *Publisher) publish(ctx context.Context, e event.Event) (Result, error) {
	payload, err := schemas.Decode(e)
	if err != nil {
		return Result{}, err
	}
	subject, err := schemas.SubjectFor(payload)
	if err != nil {
		return Result{}, err
	}
	m, err := schemas.ToMsg(subject, e)
	if err != nil {
		return Result{}, err
	}
	res := Result{ID: e.ID(), Subject: subject, MsgID: m.Header.Get(jetstream.MsgIDHeader)}
	ack, err := p.JS.PublishMsg(ctx, m)
	if err != nil {
		var apiErr *jetstream.APIError
		switch {
		case errors.As(err, &apiErr) && apiErr.ErrorCode == errCodeStoreFailed &&
			(strings.Contains(apiErr.Description, "maximum messages") || strings.Contains(apiErr.Description, "maximum bytes")):
			return res, fmt.Errorf("publish %s to %s: %w: %v", e.ID(), subject, ErrBackPressure, err)
		case errors.Is(err, jetstream.ErrNoStreamResponse):
			return res, fmt.Errorf("publish %s to %s: %w", e.ID(), subject, ErrNoStream)
		}
		return res, fmt.Errorf("publish %s to %s: %w", e.ID(), subject, err)
	}
	res.Stream, res.Sequence, res.Duplicate = ack.Stream, ack.Sequence, ack.Duplicate
	return res, nil
}
