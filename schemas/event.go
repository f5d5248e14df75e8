package schemas

import (
	"bytes"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/santhosh-tekuri/jsonschema/v6"
	"github.com/santhosh-tekuri/jsonschema/v6/kind"
	"golang.org/x/text/language"
	"golang.org/x/text/message"
)

// MaxEventBytes bounds an event: its data plus its context attributes (names and values).
const MaxEventBytes = 64 * 1024

// ContentTypeJSON is the only datacontenttype drover events carry.
const ContentTypeJSON = "application/json"

var (
	// ErrInvalid is matched (errors.Is) by every error about a bad event: not a CloudEvent, wrong
	// attributes, unknown type, schema violation, oversized. Such an event will never become valid
	// by retrying: reject it at the edge or dead-letter it.
	ErrInvalid = errors.New("invalid event")
	// ErrUnknownType is matched by errors about an event type that is not part of the contract.
	// Those errors match ErrInvalid as well.
	ErrUnknownType = errors.New("unknown event type")
)

// ValidationError says which field of an event is wrong and why. Field is a CloudEvents attribute
// name ("type", "source", ...), "event" for the event as a whole, or "data.<path>" for the payload
// ("data.node", "data.window.start", "data.vms[0].name"); Payload.Validate reports paths relative to
// data ("node"). Every *ValidationError matches ErrInvalid with errors.Is.
type ValidationError struct {
	Field  string
	Reason string
	// Err is an underlying cause, such as ErrUnknownType; may be nil.
	Err error
}

// Error returns "invalid event: <field>: <reason>".
func (e *ValidationError) Error() string {
	if e.Field == "" {
		return "invalid event: " + e.Reason
	}
	return "invalid event: " + e.Field + ": " + e.Reason
}

// Is reports true for ErrInvalid.
func (e *ValidationError) Is(target error) bool { return target == ErrInvalid }

// Unwrap returns the underlying cause, if any.
func (e *ValidationError) Unwrap() error { return e.Err }

func invalid(field, format string, args ...any) *ValidationError {
	return &ValidationError{Field: field, Reason: fmt.Sprintf(format, args...)}
}

//go:embed *.schema.json
var schemaFS embed.FS

var (
	compileOnce sync.Once
	compiled    map[string]*jsonschema.Schema // by event type
	compileErr  error
	printer     = message.NewPrinter(language.English)
)

// compileSchemas compiles every embedded schema once. A broken embedded schema is a bug caught by
// the tests; at run time it surfaces as an error from Validate, never as a panic.
func compileSchemas() (map[string]*jsonschema.Schema, error) {
	compileOnce.Do(func() {
		c := jsonschema.NewCompiler()
		c.DefaultDraft(jsonschema.Draft2020)
		c.AssertFormat()
		out := make(map[string]*jsonschema.Schema, len(typeInfos))
		for _, ti := range typeInfos {
			b, err := schemaFS.ReadFile(ti.schema)
			if err != nil {
				compileErr = fmt.Errorf("schemas: read embedded schema %s: %w", ti.schema, err)
				return
			}
			doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(b))
			if err != nil {
				compileErr = fmt.Errorf("schemas: parse embedded schema %s: %w", ti.schema, err)
				return
			}
			url := "mem:///" + ti.schema
			if err := c.AddResource(url, doc); err != nil {
				compileErr = fmt.Errorf("schemas: add embedded schema %s: %w", ti.schema, err)
				return
			}
			s, err := c.Compile(url)
			if err != nil {
				compileErr = fmt.Errorf("schemas: compile embedded schema %s: %w", ti.schema, err)
				return
			}
			out[ti.eventType] = s
		}
		compiled = out
	})
	return compiled, compileErr
}

// Event is the CloudEvents sdk's event, so handlers can say schemas.Event.
type Event = event.Event

// Check compiles the embedded JSON Schemas (once) and returns the error if one is broken. Call it
// at startup to fail fast; Validate returns the same error otherwise.
func Check() error {
	_, err := compileSchemas()
	return err
}

// Schema returns the JSON Schema (draft 2020-12) of an event type's data. If the type is not part
// of the contract, the error wraps ErrUnknownType.
func Schema(eventType string) ([]byte, error) {
	ti, ok := byType[eventType]
	if !ok {
		return nil, fmt.Errorf("schema for %q: %w", eventType, ErrUnknownType)
	}
	b, err := schemaFS.ReadFile(ti.schema)
	if err != nil {
		return nil, fmt.Errorf("schema for %q: %w", eventType, err)
	}
	return b, nil
}

// New builds a CloudEvent 1.0 carrying p: type p.EventType(), the given source and id, time now
// (UTC), subject p.Target(), datacontenttype application/json, data p as JSON. The event is
// validated as Validate does; errors are *ValidationError (matching ErrInvalid).
func New(source, id string, p Payload) (event.Event, error) {
	if isNilPayload(p) {
		return event.Event{}, invalid("data", "payload is nil")
	}
	e := event.New(event.CloudEventsVersionV1)
	e.SetType(p.EventType())
	e.SetSource(source)
	e.SetID(id)
	e.SetTime(time.Now().UTC())
	if t := p.Target(); t != "" {
		e.SetSubject(t)
	}
	if err := e.SetData(ContentTypeJSON, p); err != nil {
		return event.Event{}, &ValidationError{Field: "data", Reason: "cannot encode payload: " + err.Error(), Err: err}
	}
	if err := Validate(e); err != nil {
		return event.Event{}, err
	}
	return e, nil
}

// NewStatus builds a status event from a Status that drover's own code filled in. It runs the
// Go-side checks (Status.Validate) and the size limit, not the JSON Schema: a runtime publishes a
// status on every progress batch, and a typed payload that passes Validate matches its schema (a
// test of this package checks that for every phase and field). Events from outside go through New,
// Validate and Decode.
func NewStatus(source, id string, st *Status) (event.Event, error) {
	if st == nil {
		return event.Event{}, invalid("data", "payload is nil")
	}
	if err := st.Validate(); err != nil {
		return event.Event{}, err
	}
	e := event.New(event.CloudEventsVersionV1)
	e.SetType(TypeStatus)
	e.SetSource(source)
	e.SetID(id)
	e.SetTime(time.Now().UTC())
	e.SetSubject(st.Target())
	if err := e.SetData(ContentTypeJSON, st); err != nil {
		return event.Event{}, &ValidationError{Field: "data", Reason: "cannot encode payload: " + err.Error(), Err: err}
	}
	if n := eventSize(e); n > MaxEventBytes {
		return event.Event{}, invalid("event", "%d bytes exceeds the limit of %d bytes", n, MaxEventBytes)
	}
	return e, nil
}

// Validate checks, in order: the CloudEvents attributes (specversion 1.0, id, source and type
// present, datacontenttype application/json, subject if present equal to the payload's target), the
// type (known to the contract, else the error also wraps ErrUnknownType), the size (at most
// MaxEventBytes), the data against the type's JSON Schema, then Payload.Validate.
// Every error is a *ValidationError and matches ErrInvalid.
func Validate(e event.Event) error {
	_, err := validate(e)
	return err
}

// Decode validates e as Validate does and returns its payload, a pointer to one of this package's
// data structs (*NodeNotReady, *Status, ...). An unknown type gives an error wrapping both
// ErrUnknownType and ErrInvalid; other problems are *ValidationError matching ErrInvalid.
func Decode(e event.Event) (Payload, error) {
	return validate(e)
}

func validate(e event.Event) (Payload, error) {
	ti, err := validateAttributes(e)
	if err != nil {
		return nil, err
	}
	schemas, err := compileSchemas()
	if err != nil {
		return nil, err
	}
	data := e.Data()
	if len(data) == 0 {
		return nil, invalid("data", "is required")
	}
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
	if err != nil {
		return nil, &ValidationError{Field: "data", Reason: "not valid JSON: " + err.Error(), Err: err}
	}
	if err := schemas[ti.eventType].Validate(inst); err != nil {
		var verr *jsonschema.ValidationError
		if errors.As(err, &verr) {
			return nil, schemaError(verr)
		}
		return nil, &ValidationError{Field: "data", Reason: err.Error(), Err: err}
	}
	p := ti.newFn()
	if err := json.Unmarshal(data, p); err != nil {
		return nil, &ValidationError{Field: "data", Reason: "cannot decode: " + err.Error(), Err: err}
	}
	if err := p.Validate(); err != nil {
		var ve *ValidationError
		if errors.As(err, &ve) {
			return nil, &ValidationError{Field: "data." + ve.Field, Reason: ve.Reason, Err: ve.Err}
		}
		return nil, &ValidationError{Field: "data", Reason: err.Error(), Err: err}
	}
	if s := e.Subject(); s != "" && s != p.Target() {
		return nil, invalid("subject", "%q does not match the payload's target %q", s, p.Target())
	}
	return p, nil
}

// validateAttributes checks the context attributes and size and returns the type's description.
func validateAttributes(e event.Event) (*typeInfo, error) {
	if e.Context == nil {
		return nil, invalid("specversion", "missing: not a CloudEvent")
	}
	if v := e.SpecVersion(); v != event.CloudEventsVersionV1 {
		return nil, invalid("specversion", "must be %q, got %q", event.CloudEventsVersionV1, v)
	}
	// Setter errors (e.g. a source that is not a URI-reference) say more than the "REQUIRED" the
	// context check then reports for the same field.
	if len(e.FieldErrors) > 0 {
		fields := make([]string, 0, len(e.FieldErrors))
		for f := range e.FieldErrors {
			fields = append(fields, f)
		}
		sort.Strings(fields)
		err := e.FieldErrors[fields[0]]
		return nil, &ValidationError{Field: fields[0], Reason: err.Error(), Err: err}
	}
	if err := e.Validate(); err != nil {
		var ce event.ValidationError
		if errors.As(err, &ce) && len(ce) > 0 {
			fields := make([]string, 0, len(ce))
			for f := range ce {
				fields = append(fields, f)
			}
			sort.Strings(fields)
			return nil, &ValidationError{Field: fields[0], Reason: ce[fields[0]].Error(), Err: err}
		}
		return nil, &ValidationError{Field: "event", Reason: err.Error(), Err: err}
	}
	ct := e.DataContentType()
	if ct == "" {
		return nil, invalid("datacontenttype", "must be %q, got none", ContentTypeJSON)
	}
	if mt, _, err := mime.ParseMediaType(ct); err != nil || mt != ContentTypeJSON {
		return nil, invalid("datacontenttype", "must be %q, got %q", ContentTypeJSON, ct)
	}
	if err := checkControlChars(e); err != nil {
		return nil, err
	}
	ti, ok := byType[e.Type()]
	if !ok {
		return nil, &ValidationError{Field: "type", Reason: fmt.Sprintf("%q is not a drover event type", e.Type()), Err: ErrUnknownType}
	}
	if n := eventSize(e); n > MaxEventBytes {
		return nil, invalid("event", "%d bytes exceeds the limit of %d bytes", n, MaxEventBytes)
	}
	return ti, nil
}

// eventSize approximates the CloudEvents notion of size: data bytes plus attribute names and values.
func eventSize(e event.Event) int {
	n := len(e.Data())
	n += len("specversion") + len(e.SpecVersion())
	n += len("id") + len(e.ID())
	n += len("source") + len(e.Source())
	n += len("type") + len(e.Type())
	if s := e.Subject(); s != "" {
		n += len("subject") + len(s)
	}
	if ct := e.DataContentType(); ct != "" {
		n += len("datacontenttype") + len(ct)
	}
	if ds := e.DataSchema(); ds != "" {
		n += len("dataschema") + len(ds)
	}
	if !e.Time().IsZero() {
		n += len("time") + len(time.RFC3339Nano)
	}
	for k, v := range e.Extensions() {
		n += len(k) + len(fmt.Sprint(v))
	}
	return n
}

// schemaError turns a JSON Schema validation error into one *ValidationError: the first problem
// by field path, naming up to three others in its reason.
func schemaError(verr *jsonschema.ValidationError) *ValidationError {
	var probs []*ValidationError
	collectSchemaErrors(verr, &probs)
	if len(probs) == 0 {
		return &ValidationError{Field: "data", Reason: verr.Error(), Err: verr}
	}
	sort.SliceStable(probs, func(i, j int) bool { return probs[i].Field < probs[j].Field })
	first := *probs[0]
	if len(probs) > 1 {
		var also []string
		for i, p := range probs[1:] {
			if i == 3 {
				also = append(also, fmt.Sprintf("%d more", len(probs)-4))
				break
			}
			also = append(also, p.Field+": "+p.Reason)
		}
		first.Reason += " (also " + strings.Join(also, "; ") + ")"
	}
	first.Err = verr
	return &first
}

func collectSchemaErrors(e *jsonschema.ValidationError, out *[]*ValidationError) {
	path := dataPath(e.InstanceLocation)
	switch k := e.ErrorKind.(type) {
	case *kind.AnyOf, *kind.OneOf:
		// Report alternatives as one problem, e.g. "one of: missing property 'node'; missing property 'vm'".
		var alts []string
		for _, c := range e.Causes {
			var sub []*ValidationError
			collectSchemaErrors(c, &sub)
			for _, s := range sub {
				alts = append(alts, s.Field+": "+s.Reason)
			}
		}
		*out = append(*out, &ValidationError{Field: path, Reason: "must satisfy one of: " + strings.Join(alts, " | ")})
		return
	case *kind.Required:
		for _, m := range k.Missing {
			*out = append(*out, &ValidationError{Field: path + "." + m, Reason: "missing required property"})
		}
		return
	case *kind.AdditionalProperties:
		for _, p := range k.Properties {
			*out = append(*out, &ValidationError{Field: path + "." + p, Reason: "unknown property (not allowed by the schema)"})
		}
		return
	}
	if len(e.Causes) == 0 {
		*out = append(*out, &ValidationError{Field: path, Reason: e.ErrorKind.LocalizedString(printer)})
		return
	}
	for _, c := range e.Causes {
		collectSchemaErrors(c, out)
	}
}

// dataPath renders a JSON pointer's tokens as "data.window.start" / "data.vms[0].name".
func dataPath(loc []string) string {
	var b strings.Builder
	b.WriteString("data")
	for _, tok := range loc {
		if tok != "" && strings.Trim(tok, "0123456789") == "" {
			b.WriteString("[" + tok + "]")
			continue
		}
		b.WriteString("." + tok)
	}
	return b.String()
}

// checkControlChars enforces the CloudEvents rule that string attributes carry no control
// characters (U+0000-U+001F, U+007F-U+009F).
func checkControlChars(e event.Event) error {
	check := func(name, v string) error {
		for _, r := range v {
			if r < 0x20 || r >= 0x7f && r <= 0x9f {
				return invalid(name, "contains control character %U", r)
			}
		}
		return nil
	}
	if err := firstErr(check("id", e.ID()), check("source", e.Source()), check("type", e.Type()),
		check("subject", e.Subject())); err != nil {
		return err
	}
	for k, v := range e.Extensions() {
		if s, ok := v.(string); ok {
			if err := check(k, s); err != nil {
				return err
			}
		}
	}
	return nil
}
