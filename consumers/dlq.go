package consumers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/drover-io/drover/schemas"
)

// DeadLetter is one message of the DROVER_DLQ stream.
type DeadLetter struct {
	Seq        uint64
	Time       time.Time
	Workflow   string
	Target     string // node or namespace/name; "" when the message never decoded
	Operation  string // operation key; "" when the message never decoded
	Subject    string // the original request subject
	Reason     string
	Deliveries uint64
	StreamSeq  uint64 // the original DROVER stream sequence
	Header     nats.Header
	Data       []byte
}

// deadLetterMsg builds the dead letter of a message taken from the DROVER
// stream at seq: the original data and headers, plus why, whose and how
// often it was delivered. Its Nats-Msg-Id is derived from seq, so replicas
// that dead-letter the same message store it once.
func deadLetterMsg(workflow, target, operation, subject string, seq, deliveries uint64, hdr nats.Header, data []byte, reason string) *nats.Msg {
	h := nats.Header{}
	for k, v := range hdr {
		h[k] = append([]string(nil), v...)
	}
	if id := h.Get(jetstream.MsgIDHeader); id != "" {
		h.Set(HeaderDLQMsgID, id)
	}
	if len(reason) > 1024 {
		reason = reason[:1024] + "..."
	}
	h.Set(jetstream.MsgIDHeader, "dlq-"+strconv.FormatUint(seq, 10))
	h.Set(HeaderDLQReason, reason)
	h.Set(HeaderDLQDeliveries, strconv.FormatUint(deliveries, 10))
	h.Set(HeaderDLQSubject, subject)
	h.Set(HeaderDLQStreamSeq, strconv.FormatUint(seq, 10))
	h.Set(HeaderDLQWorkflow, workflow)
	if target != "" {
		h.Set(HeaderDLQTarget, target)
	}
	if operation != "" {
		h.Set(HeaderDLQOperation, operation)
	}
	h.Set(HeaderDLQTime, time.Now().UTC().Format(time.RFC3339Nano))
	return &nats.Msg{Subject: DLQSubjectPrefix + workflow, Header: h, Data: data}
}

// publishDeadLetter stores a dead letter and waits for JetStream's ack, so the
// caller may terminate the original only once the copy is safe.
func publishDeadLetter(ctx context.Context, js jetstream.JetStream, m *nats.Msg) error {
	if _, err := js.PublishMsg(ctx, m); err != nil {
		return fmt.Errorf("dead-letter to %s: %w", m.Subject, err)
	}
	return nil
}

// ListDeadLetters returns up to limit dead letters, oldest first (limit <= 0: all).
func ListDeadLetters(ctx context.Context, js jetstream.JetStream, limit int) ([]DeadLetter, error) {
	s, err := js.Stream(ctx, StreamDLQ)
	if err != nil {
		return nil, fmt.Errorf("open stream %s: %w", StreamDLQ, err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("stream %s info: %w", StreamDLQ, err)
	}
	var out []DeadLetter
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		if limit > 0 && len(out) >= limit {
			break
		}
		raw, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return out, fmt.Errorf("read dead letter %d: %w", seq, err)
		}
		out = append(out, parseDeadLetter(raw))
	}
	return out, nil
}

func parseDeadLetter(raw *jetstream.RawStreamMsg) DeadLetter {
	h := raw.Header
	deliveries, _ := strconv.ParseUint(h.Get(HeaderDLQDeliveries), 10, 64)
	streamSeq, _ := strconv.ParseUint(h.Get(HeaderDLQStreamSeq), 10, 64)
	return DeadLetter{
		Seq: raw.Sequence, Time: raw.Time, Workflow: h.Get(HeaderDLQWorkflow),
		Target: h.Get(HeaderDLQTarget), Operation: h.Get(HeaderDLQOperation),
		Subject: h.Get(HeaderDLQSubject), Reason: h.Get(HeaderDLQReason),
		Deliveries: deliveries, StreamSeq: streamSeq, Header: h, Data: raw.Data,
	}
}

// Replayed says what a replay or a retry did.
type Replayed struct {
	Ack *jetstream.PubAck
	// Operation is the operation that runs again ("" when the message
	// never decoded: it is sent back as it was).
	Operation  string
	Generation int
	Subject    string
}

// ReplayDeadLetter sends dead letter seq back to its original subject with
// its original headers and a fresh message id (the original id may still be
// in the duplicate window), starts a new generation of its operation so that
// it really runs again (budget, checkpoint and progress cleared), then
// removes the dead letter.
func ReplayDeadLetter(ctx context.Context, js jetstream.JetStream, seq uint64) (Replayed, DeadLetter, error) {
	s, err := js.Stream(ctx, StreamDLQ)
	if err != nil {
		return Replayed{}, DeadLetter{}, fmt.Errorf("open stream %s: %w", StreamDLQ, err)
	}
	raw, err := s.GetMsg(ctx, seq)
	if err != nil {
		return Replayed{}, DeadLetter{}, fmt.Errorf("read dead letter %d: %w", seq, err)
	}
	dl := parseDeadLetter(raw)
	if dl.Subject == "" {
		return Replayed{}, dl, fmt.Errorf("dead letter %d has no %s header", seq, HeaderDLQSubject)
	}
	res := Replayed{Subject: dl.Subject, Operation: dl.Operation}
	if res.Operation != "" {
		rec, err := resetOperation(ctx, js, res.Operation, fmt.Sprintf("replayed from dead letter %d", seq))
		if err != nil {
			return res, dl, err
		}
		res.Generation = rec.Generation
	}
	h := nats.Header{}
	for k, v := range raw.Header {
		if strings.HasPrefix(k, "Drover-Dlq-") || k == jetstream.MsgIDHeader {
			continue
		}
		h[k] = v
	}
	h.Set(jetstream.MsgIDHeader, fmt.Sprintf("replay-%d-g%d-%s", seq, res.Generation, raw.Header.Get(HeaderDLQMsgID)))
	res.Ack, err = js.PublishMsg(ctx, &nats.Msg{Subject: dl.Subject, Header: h, Data: raw.Data})
	if err != nil {
		return res, dl, fmt.Errorf("replay dead letter %d to %s: %w", seq, dl.Subject, err)
	}
	if err := s.DeleteMsg(ctx, seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		return res, dl, fmt.Errorf("replayed dead letter %d but could not remove it: %w", seq, err)
	}
	return res, dl, nil
}

// RetryOperation starts a new generation of a finished or stuck operation
// and publishes the request that created it again, so that it really runs
// again (after a fix, say). A running operation is refused. Dead letters of
// the operation are removed: the retry replaces them.
func RetryOperation(ctx context.Context, js jetstream.JetStream, key string) (Replayed, error) {
	kv, err := js.KeyValue(ctx, BucketOps)
	if err != nil {
		return Replayed{}, fmt.Errorf("open %s: %w", BucketOps, err)
	}
	cur, _, found, err := NewOpStore(kv).Get(ctx, key)
	if err != nil {
		return Replayed{}, err
	}
	if !found {
		return Replayed{}, fmt.Errorf("operation %s does not exist", key)
	}
	if len(cur.Request) == 0 {
		return Replayed{}, fmt.Errorf("operation %s has no stored request to send again", key)
	}
	var ce event.Event
	if err := json.Unmarshal(cur.Request, &ce); err != nil {
		return Replayed{}, fmt.Errorf("operation %s: stored request unreadable: %w", key, err)
	}
	rec, err := resetOperation(ctx, js, key, "retried by hand")
	if err != nil {
		return Replayed{}, err
	}
	p, err := schemas.Decode(ce)
	if err != nil {
		return Replayed{}, fmt.Errorf("operation %s: stored request no longer valid: %w", key, err)
	}
	subject, err := schemas.RequestSubject(p.Kind(), p.Target())
	if err != nil {
		return Replayed{}, err
	}
	m, err := schemas.ToMsg(subject, ce)
	if err != nil {
		return Replayed{}, err
	}
	m.Header.Set(jetstream.MsgIDHeader, fmt.Sprintf("retry-%s-g%d", key, rec.Generation))
	ack, err := js.PublishMsg(ctx, m)
	if err != nil {
		return Replayed{}, fmt.Errorf("publish the request of %s again: %w", key, err)
	}
	if err := removeDeadLetters(ctx, js, key); err != nil {
		return Replayed{Ack: ack, Operation: key, Generation: rec.Generation, Subject: subject}, err
	}
	return Replayed{Ack: ack, Operation: key, Generation: rec.Generation, Subject: subject}, nil
}

// resetOperation starts a new generation of key and clears its progress.
func resetOperation(ctx context.Context, js jetstream.JetStream, key, why string) (Record, error) {
	ops, err := OpenOpStore(ctx, js)
	if err != nil {
		return Record{}, err
	}
	rec, err := ops.Reset(ctx, key, why)
	if err != nil {
		return Record{}, err
	}
	pkv, err := js.KeyValue(ctx, BucketProgress)
	if err != nil {
		return rec, fmt.Errorf("open %s: %w", BucketProgress, err)
	}
	return rec, purgeProgress(ctx, js, pkv, key)
}

func removeDeadLetters(ctx context.Context, js jetstream.JetStream, op string) error {
	dls, err := ListDeadLetters(ctx, js, 0)
	if err != nil {
		return err
	}
	s, err := js.Stream(ctx, StreamDLQ)
	if err != nil {
		return err
	}
	for _, d := range dls {
		if d.Operation == op {
			if err := s.DeleteMsg(ctx, d.Seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
				return fmt.Errorf("remove dead letter %d of %s: %w", d.Seq, op, err)
			}
		}
	}
	return nil
}
