package schemas

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"

	"github.com/cloudevents/sdk-go/v2/binding"
	"github.com/cloudevents/sdk-go/v2/binding/format"
	"github.com/cloudevents/sdk-go/v2/binding/spec"
	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/cloudevents/sdk-go/v2/types"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Headers of the CloudEvents NATS protocol binding (binary content mode) and of JetStream.
const (
	// HeaderPrefix starts every CloudEvents attribute header: "ce-id", "ce-source", "ce-type", ...
	HeaderPrefix = "ce-"
	// HeaderContentType carries the datacontenttype in binary mode (as well as ce-datacontenttype),
	// and "application/cloudevents+json" in structured mode.
	HeaderContentType = "Content-Type"
	// HeaderMsgID is JetStream's deduplication header.
	HeaderMsgID = nats.MsgIdHdr
)

// ceVersions maps "ce-"-prefixed header names (case-insensitively) to CloudEvents 1.0 attributes.
var ceVersions = spec.WithPrefix(HeaderPrefix)

// ToMsg encodes e as a NATS message in binary content mode (CloudEvents NATS protocol binding):
// the data is the body, every attribute is a "ce-<name>" header whose value is percent-encoded as
// the binding requires, Content-Type is the datacontenttype, and Nats-Msg-Id is MsgID(e).
// e is validated first (errors are *ValidationError matching ErrInvalid). A subject that is not a
// valid publish subject, or a drover.req/drover.status subject other than the one the payload
// belongs on (SubjectFor), gives an error wrapping ErrBadSubject.
func ToMsg(subject string, e event.Event) (*nats.Msg, error) {
	p, err := validate(e)
	if err != nil {
		return nil, err
	}
	return toMsg(subject, e, p)
}

// NewStatusMsg is NewStatus encoded as a NATS message on its status subject,
// without a second validation pass.
func NewStatusMsg(source, id string, st *Status) (*nats.Msg, error) {
	e, err := NewStatus(source, id, st)
	if err != nil {
		return nil, err
	}
	subject, err := StatusSubject(st.Workflow, st.Target())
	if err != nil {
		return nil, err
	}
	return toMsg(subject, e, st)
}

func toMsg(subject string, e event.Event, p Payload) (*nats.Msg, error) {
	if err := checkPublishSubject(subject, p); err != nil {
		return nil, err
	}
	m := &nats.Msg{Subject: subject, Header: make(nats.Header, 10)}
	w := (*headerWriter)(m)
	if err := binding.ToMessage(&e).ReadBinary(context.Background(), w); err != nil {
		return nil, fmt.Errorf("encode event %s as NATS message: %w", e.ID(), err)
	}
	m.Header.Set(HeaderContentType, e.DataContentType())
	m.Header.Set(HeaderMsgID, MsgID(e))
	return m, nil
}

// checkPublishSubject rejects subjects NATS would refuse and drover subjects that do not match
// the payload, so an event can never be routed to the wrong workflow.
func checkPublishSubject(subject string, p Payload) error {
	if subject == "" {
		return fmt.Errorf("publish subject is empty: %w", ErrBadSubject)
	}
	for _, tok := range strings.Split(subject, ".") {
		if tok == "" || strings.ContainsAny(tok, "*> \t\r\n\f\v") {
			return fmt.Errorf("publish subject %q: token %q is empty or has a wildcard or whitespace: %w", subject, tok, ErrBadSubject)
		}
	}
	if strings.HasPrefix(subject, RequestPrefix+".") || strings.HasPrefix(subject, StatusPrefix+".") {
		want, err := SubjectFor(p)
		if err != nil {
			return err
		}
		if subject != want {
			return fmt.Errorf("publish subject %q: a %s event for %q belongs on %q: %w", subject, p.EventType(), p.Target(), want, ErrBadSubject)
		}
	}
	return nil
}

// headerWriter is a binding.BinaryWriter that fills a NATS message in binary content mode.
type headerWriter nats.Msg

func (w *headerWriter) Start(context.Context) error { return nil }
func (w *headerWriter) End(context.Context) error   { return nil }

func (w *headerWriter) SetData(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	w.Data = b
	return nil
}

func (w *headerWriter) SetAttribute(a spec.Attribute, value any) error {
	return w.set(a.Name(), value)
}

func (w *headerWriter) SetExtension(name string, value any) error {
	return w.set(name, value)
}

func (w *headerWriter) set(name string, value any) error {
	if value == nil {
		return nil
	}
	s, err := types.Format(value)
	if err != nil {
		return fmt.Errorf("attribute %s: %w", name, err)
	}
	w.Header[HeaderPrefix+name] = []string{PercentEncode(s)}
	return nil
}

// FromMsg decodes a NATS message into a CloudEvent and validates it as Validate does. It accepts
// binary content mode ("ce-" headers, matched case-insensitively, percent-encoded or quoted
// values) and structured content mode (Content-Type application/cloudevents+json, the whole event
// as JSON in the body); a message with neither ce- headers nor a Content-Type is read as
// structured, as senders before NATS 2.2 headers did. If the message's subject is a drover.req or
// drover.status subject, it must be the one the payload belongs on.
// Every error matches ErrInvalid (errors.Is); unknown types also match ErrUnknownType.
func FromMsg(m *nats.Msg) (event.Event, error) {
	if m == nil {
		return event.Event{}, invalid("event", "nil message")
	}
	return fromParts(m.Subject, m.Header, m.Data)
}

// FromHeaders is FromMsg for a message known by its headers and data, such as a jetstream.Msg
// (Headers(), Data()); no subject check is made. Errors are as for FromMsg.
func FromHeaders(h nats.Header, data []byte) (event.Event, error) {
	return fromParts("", h, data)
}

// FromJetStreamMsg is FromMsg for a jetstream.Msg, subject check included. Errors are as for FromMsg.
func FromJetStreamMsg(m jetstream.Msg) (event.Event, error) {
	if m == nil {
		return event.Event{}, invalid("event", "nil message")
	}
	return fromParts(m.Subject(), m.Headers(), m.Data())
}

func fromParts(subject string, h nats.Header, data []byte) (event.Event, error) {
	e, err := readEvent(h, data)
	if err != nil {
		return event.Event{}, err
	}
	p, err := validate(e)
	if err != nil {
		return event.Event{}, err
	}
	if strings.HasPrefix(subject, RequestPrefix+".") || strings.HasPrefix(subject, StatusPrefix+".") {
		want, err := SubjectFor(p)
		if err != nil || want != subject {
			return event.Event{}, &ValidationError{Field: "subject",
				Reason: fmt.Sprintf("message subject %q does not match the %s event for %q (want %q)", subject, p.EventType(), p.Target(), want),
				Err:    ErrBadSubject}
		}
	}
	return e, nil
}

// readEvent turns headers and body into an event without checking the contract.
func readEvent(h nats.Header, data []byte) (_ event.Event, err error) {
	// The sdk is not ours: whatever it does with hostile input, a message is rejected, never a panic.
	defer func() {
		if r := recover(); r != nil {
			err = invalid("event", "not a CloudEvent: decoder failed: %v", r)
		}
	}()
	size := len(data)
	for k, vs := range h {
		for _, v := range vs {
			size += len(k) + len(v)
		}
	}
	// Percent-encoding can triple header sizes; the exact limit is checked by Validate.
	if size > 4*MaxEventBytes {
		return event.Event{}, invalid("event", "message of %d bytes exceeds the limit of %d bytes", size, MaxEventBytes)
	}
	r := &msgReader{header: h, data: data}
	r.encoding = r.detect()
	if r.encoding == binding.EncodingUnknown {
		return event.Event{}, invalid("specversion", "not a CloudEvent: no ce-specversion header and no structured content type")
	}
	e, err := binding.ToEvent(context.Background(), r)
	if err != nil {
		if ve, ok := err.(*ValidationError); ok {
			return event.Event{}, ve
		}
		return event.Event{}, &ValidationError{Field: "event", Reason: "not a CloudEvent: " + err.Error(), Err: err}
	}
	if e == nil {
		return event.Event{}, invalid("event", "not a CloudEvent")
	}
	return *e, nil
}

// msgReader is a binding.MessageReader over NATS headers and body.
type msgReader struct {
	header   nats.Header
	data     []byte
	encoding binding.Encoding
}

func (r *msgReader) headerValue(name string) (string, bool) {
	for k, vs := range r.header {
		if strings.EqualFold(k, name) && len(vs) > 0 {
			return vs[0], true
		}
	}
	return "", false
}

func (r *msgReader) detect() binding.Encoding {
	if ct, ok := r.headerValue(HeaderContentType); ok && format.IsFormat(strings.ToLower(strings.TrimSpace(ct))) {
		return binding.EncodingStructured
	}
	if _, ok := r.headerValue(HeaderPrefix + "specversion"); ok {
		return binding.EncodingBinary
	}
	if _, ok := r.headerValue(HeaderContentType); !ok && len(bytes.TrimSpace(r.data)) > 0 {
		for k := range r.header {
			if len(k) >= len(HeaderPrefix) && strings.EqualFold(k[:len(HeaderPrefix)], HeaderPrefix) {
				return binding.EncodingUnknown
			}
		}
		return binding.EncodingStructured
	}
	return binding.EncodingUnknown
}

func (r *msgReader) ReadEncoding() binding.Encoding { return r.encoding }

func (r *msgReader) ReadStructured(ctx context.Context, w binding.StructuredWriter) error {
	if r.encoding != binding.EncodingStructured {
		return binding.ErrNotStructured
	}
	f := format.JSON
	if ct, ok := r.headerValue(HeaderContentType); ok {
		mt := strings.ToLower(strings.TrimSpace(strings.SplitN(ct, ";", 2)[0]))
		if mt != format.JSON.MediaType() {
			return invalid("datacontenttype", "structured content type %q is not supported, want %q", ct, format.JSON.MediaType())
		}
	}
	return w.SetStructuredEvent(ctx, f, bytes.NewReader(r.data))
}

func (r *msgReader) ReadBinary(ctx context.Context, w binding.BinaryWriter) error {
	if r.encoding != binding.EncodingBinary {
		return binding.ErrNotBinary
	}
	sv, _ := r.headerValue(HeaderPrefix + "specversion")
	if v, err := PercentDecode(sv); err != nil || v != event.CloudEventsVersionV1 {
		return invalid("specversion", "must be %q, got %q", event.CloudEventsVersionV1, sv)
	}
	version := ceVersions.Version(event.CloudEventsVersionV1)
	sawContentType := false
	for k, vs := range r.header {
		if len(k) <= len(HeaderPrefix) || !strings.EqualFold(k[:len(HeaderPrefix)], HeaderPrefix) || len(vs) == 0 {
			continue
		}
		name := strings.ToLower(k[len(HeaderPrefix):])
		if len(vs) > 1 {
			return invalid(name, "header %s appears %d times", k, len(vs))
		}
		v, err := PercentDecode(vs[0])
		if err != nil {
			return &ValidationError{Field: name, Reason: err.Error(), Err: err}
		}
		if a := version.Attribute(k); a != nil {
			if a.Kind() == spec.SpecVersion {
				continue // checked above; the builder starts as a 1.0 event
			}
			if a.Kind() == spec.DataContentType {
				sawContentType = true
			}
			if err := w.SetAttribute(a, v); err != nil {
				return &ValidationError{Field: name, Reason: err.Error(), Err: err}
			}
			continue
		}
		if err := w.SetExtension(name, v); err != nil {
			return &ValidationError{Field: name, Reason: err.Error(), Err: err}
		}
	}
	if !sawContentType {
		if ct, ok := r.headerValue(HeaderContentType); ok {
			if err := w.SetAttribute(version.AttributeFromKind(spec.DataContentType), ct); err != nil {
				return &ValidationError{Field: "datacontenttype", Reason: err.Error(), Err: err}
			}
		}
	}
	if len(r.data) > 0 {
		return w.SetData(bytes.NewReader(r.data))
	}
	return nil
}

// GetAttribute implements binding.MessageMetadataReader (the sdk requires it of binary messages).
func (r *msgReader) GetAttribute(k spec.Kind) (spec.Attribute, any) {
	a := ceVersions.Version(event.CloudEventsVersionV1).AttributeFromKind(k)
	if a == nil {
		return nil, nil
	}
	v, ok := r.headerValue(a.PrefixedName())
	if !ok {
		return a, nil
	}
	d, err := PercentDecode(v)
	if err != nil {
		return a, nil
	}
	return a, d
}

// GetExtension implements binding.MessageMetadataReader.
func (r *msgReader) GetExtension(name string) any {
	v, ok := r.headerValue(HeaderPrefix + name)
	if !ok {
		return nil
	}
	d, err := PercentDecode(v)
	if err != nil {
		return nil
	}
	return d
}

// Finish satisfies binding.Message; there is nothing to release.
func (r *msgReader) Finish(error) error { return nil }

// PercentEncode encodes a header value as the CloudEvents NATS binding requires: space, '"',
// '%' and every byte outside printable ASCII (U+0021-U+007E) become %XY with upper-case hex,
// byte by byte of the UTF-8 encoding.
func PercentEncode(s string) string {
	n := 0
	for i := 0; i < len(s); i++ {
		if needsPercent(s[i]) {
			n += 2
		}
	}
	if n == 0 {
		return s
	}
	b := make([]byte, 0, len(s)+n)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if needsPercent(c) {
			b = append(b, '%', upperHex[c>>4], upperHex[c&0x0f])
		} else {
			b = append(b, c)
		}
	}
	return string(b)
}

func needsPercent(c byte) bool { return c <= 0x20 || c >= 0x7f || c == '"' || c == '%' }

// PercentDecode reverses PercentEncode as the binding requires of a receiver: a double-quoted
// value is first unquoted (backslash escapes included), then one round of percent-decoding is
// done, accepting lower-case hex and needless escapes. Malformed escapes, malformed quoting and
// byte sequences that are not valid UTF-8 (such as the overlong %C0%A0) give an error.
func PercentDecode(v string) (string, error) {
	if strings.HasPrefix(v, `"`) {
		u, err := unquote(v)
		if err != nil {
			return "", err
		}
		v = u
	}
	if strings.IndexByte(v, '%') < 0 {
		if !utf8.ValidString(v) {
			return "", fmt.Errorf("header value is not valid UTF-8")
		}
		return v, nil
	}
	b := make([]byte, 0, len(v))
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c != '%' {
			b = append(b, c)
			continue
		}
		if i+2 >= len(v) {
			return "", fmt.Errorf("truncated percent-escape at offset %d", i)
		}
		hi, lo := unhex(v[i+1]), unhex(v[i+2])
		if hi < 0 || lo < 0 {
			return "", fmt.Errorf("bad percent-escape %q at offset %d", v[i:i+3], i)
		}
		b = append(b, byte(hi<<4|lo))
		i += 2
	}
	if !utf8.Valid(b) {
		return "", fmt.Errorf("percent-decoded header value is not valid UTF-8")
	}
	return string(b), nil
}

// unquote handles an RFC 7230 quoted-string: "...", with \x standing for x.
func unquote(v string) (string, error) {
	if len(v) < 2 || v[len(v)-1] != '"' {
		return "", fmt.Errorf("unterminated quoted header value")
	}
	in := v[1 : len(v)-1]
	var b strings.Builder
	for i := 0; i < len(in); i++ {
		switch c := in[i]; c {
		case '\\':
			if i+1 >= len(in) {
				return "", fmt.Errorf("dangling backslash in quoted header value")
			}
			i++
			b.WriteByte(in[i])
		case '"':
			return "", fmt.Errorf("unescaped quote inside quoted header value")
		default:
			b.WriteByte(c)
		}
	}
	return b.String(), nil
}

func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

var _ binding.Message = (*msgReader)(nil)
var _ binding.MessageMetadataReader = (*msgReader)(nil)
var _ binding.BinaryWriter = (*headerWriter)(nil)
