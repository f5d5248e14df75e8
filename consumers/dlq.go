package consumers

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// DeadLetter is one message of the DROVER_DLQ stream.
type DeadLetter struct {
	Seq        uint64
	Time       time.Time
	Workflow   string
	Subject    string // the original request subject
	Reason     string
	Deliveries uint64
	StreamSeq  uint64 // the original DROVER stream sequence
	Header     nats.Header
	Data       []byte
}

// deadLetterMsg builds the dead letter of a message taken from the DROVER
// stream at seq: the original data and headers, plus why and how often it was
// delivered. Its Nats-Msg-Id is derived from seq, so replicas that
// dead-letter the same message (a max-deliveries advisory reaches them all)
// store it once.
func deadLetterMsg(workflow, subject string, seq, deliveries uint64, hdr nats.Header, data []byte, reason string) *nats.Msg {
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
		Subject: h.Get(HeaderDLQSubject), Reason: h.Get(HeaderDLQReason),
		Deliveries: deliveries, StreamSeq: streamSeq, Header: h, Data: raw.Data,
	}
}

// ReplayDeadLetter republishes dead letter seq to its original subject with
// its original headers and a fresh message id (the original id may still be in
// the duplicate window), then removes it from the DLQ. It returns the new
// publish acknowledgement.
func ReplayDeadLetter(ctx context.Context, js jetstream.JetStream, seq uint64) (*jetstream.PubAck, DeadLetter, error) {
	s, err := js.Stream(ctx, StreamDLQ)
	if err != nil {
		return nil, DeadLetter{}, fmt.Errorf("open stream %s: %w", StreamDLQ, err)
	}
	raw, err := s.GetMsg(ctx, seq)
	if err != nil {
		return nil, DeadLetter{}, fmt.Errorf("read dead letter %d: %w", seq, err)
	}
	dl := parseDeadLetter(raw)
	if dl.Subject == "" {
		return nil, dl, fmt.Errorf("dead letter %d has no %s header", seq, HeaderDLQSubject)
	}
	h := nats.Header{}
	for k, v := range raw.Header {
		if strings.HasPrefix(k, "Drover-Dlq-") || k == jetstream.MsgIDHeader {
			continue
		}
		h[k] = v
	}
	h.Set(jetstream.MsgIDHeader, fmt.Sprintf("replay-%d-%s", seq, raw.Header.Get(HeaderDLQMsgID)))
	ack, err := js.PublishMsg(ctx, &nats.Msg{Subject: dl.Subject, Header: h, Data: raw.Data})
	if err != nil {
		return nil, dl, fmt.Errorf("replay dead letter %d to %s: %w", seq, dl.Subject, err)
	}
	if err := s.DeleteMsg(ctx, seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		return ack, dl, fmt.Errorf("replayed dead letter %d but could not remove it: %w", seq, err)
	}
	return ack, dl, nil
}
