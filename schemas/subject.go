package schemas

import (
	"errors"
	"fmt"
	"strings"
)

// Subject prefixes and the wildcards that match every request or status subject.
const (
	RequestPrefix   = "drover.req"
	StatusPrefix    = "drover.status"
	RequestSubjects = "drover.req.>"
	StatusSubjects  = "drover.status.>"
)

// ErrBadSubject is wrapped by errors about a subject or token that cannot be built or parsed.
var ErrBadSubject = errors.New("bad subject")

// Token encoding. A target (node name, "namespace/name") becomes exactly one NATS subject token
// that is also a valid JetStream KV key ([-/_=.a-zA-Z0-9]+ minus '.'): letters, digits, '-' and '/'
// stay as they are, '.' becomes '_', and every other byte (including '_' and '=' themselves)
// becomes '=' plus two upper-case hex digits, quoted-printable style. So "1.1.1.211" is
// "1_1_1_211", "worker-1.example.com" is "worker-1_example_com", "default/vm-1" stays as it is, and
// "node_a" is "node=5Fa". Every string has exactly one encoding and DecodeToken rejects any other
// spelling, so tokens can be compared and used as keys.
const escapeChar = '='

func isLiteral(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '/'
}

const upperHex = "0123456789ABCDEF"

// EncodeToken encodes s reversibly into one valid NATS subject token (no '.', '*', '>',
// whitespace or non-ASCII; never empty), readable for plain names: see the package's token scheme
// above. The empty string gives an error wrapping ErrBadSubject.
func EncodeToken(s string) (string, error) {
	if s == "" {
		return "", fmt.Errorf("encode token: empty string: %w", ErrBadSubject)
	}
	n := 0
	for i := 0; i < len(s); i++ {
		if isLiteral(s[i]) || s[i] == '.' {
			n++
		} else {
			n += 3
		}
	}
	if n == len(s) && strings.IndexByte(s, '.') < 0 {
		return s, nil
	}
	b := make([]byte, 0, n)
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case isLiteral(c):
			b = append(b, c)
		case c == '.':
			b = append(b, '_')
		default:
			b = append(b, escapeChar, upperHex[c>>4], upperHex[c&0x0f])
		}
	}
	return string(b), nil
}

// DecodeToken reverses EncodeToken. A token that EncodeToken would not have produced (empty,
// forbidden characters, lower-case or truncated escapes, needless escapes) gives an error wrapping
// ErrBadSubject.
func DecodeToken(tok string) (string, error) {
	if tok == "" {
		return "", fmt.Errorf("decode token: empty token: %w", ErrBadSubject)
	}
	b := make([]byte, 0, len(tok))
	for i := 0; i < len(tok); i++ {
		c := tok[i]
		switch {
		case isLiteral(c):
			b = append(b, c)
		case c == '_':
			b = append(b, '.')
		case c == escapeChar:
			if i+2 >= len(tok) {
				return "", fmt.Errorf("decode token %q: truncated escape at %d: %w", tok, i, ErrBadSubject)
			}
			hi, lo := unhexUpper(tok[i+1]), unhexUpper(tok[i+2])
			if hi < 0 || lo < 0 {
				return "", fmt.Errorf("decode token %q: bad escape %q at %d (want =XX, upper-case hex): %w", tok, tok[i:i+3], i, ErrBadSubject)
			}
			d := byte(hi<<4 | lo)
			if isLiteral(d) || d == '.' {
				return "", fmt.Errorf("decode token %q: needless escape %q at %d: %w", tok, tok[i:i+3], i, ErrBadSubject)
			}
			b = append(b, d)
			i += 2
		default:
			return "", fmt.Errorf("decode token %q: character %q at %d is not allowed: %w", tok, c, i, ErrBadSubject)
		}
	}
	return string(b), nil
}

func unhexUpper(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// RequestSubject returns "drover.req.<kind>.<EncodeToken(target)>". An unknown kind or an empty
// target gives an error wrapping ErrBadSubject.
func RequestSubject(kind, target string) (string, error) {
	if !IsKnownKind(kind) {
		return "", fmt.Errorf("request subject: unknown kind %q: %w", kind, ErrBadSubject)
	}
	tok, err := EncodeToken(target)
	if err != nil {
		return "", fmt.Errorf("request subject %s: target: %w", kind, err)
	}
	return RequestPrefix + "." + kind + "." + tok, nil
}

// StatusSubject returns "drover.status.<workflow>.<EncodeToken(target)>". An unknown workflow or
// an empty target gives an error wrapping ErrBadSubject.
func StatusSubject(workflow, target string) (string, error) {
	if !IsKnownWorkflow(workflow) {
		return "", fmt.Errorf("status subject: unknown workflow %q: %w", workflow, ErrBadSubject)
	}
	tok, err := EncodeToken(target)
	if err != nil {
		return "", fmt.Errorf("status subject %s: target: %w", workflow, err)
	}
	return StatusPrefix + "." + workflow + "." + tok, nil
}

// SubjectFor returns the subject p is published on: the status subject for a Status, the request
// subject otherwise. Errors wrap ErrBadSubject.
func SubjectFor(p Payload) (string, error) {
	if isNilPayload(p) {
		return "", fmt.Errorf("subject for nil payload: %w", ErrBadSubject)
	}
	switch s := p.(type) {
	case Status:
		return StatusSubject(s.Workflow, s.Target())
	case *Status:
		return StatusSubject(s.Workflow, s.Target())
	}
	return RequestSubject(p.Kind(), p.Target())
}

// ParseSubject splits a request or status subject into its prefix (RequestPrefix or StatusPrefix),
// kind or workflow, and decoded target. Anything else gives an error wrapping ErrBadSubject.
func ParseSubject(subject string) (prefix, kindOrWorkflow, target string, err error) {
	parts := strings.Split(subject, ".")
	if len(parts) != 4 || parts[0] != "drover" {
		return "", "", "", fmt.Errorf("parse subject %q: want drover.req.<kind>.<target> or drover.status.<workflow>.<target>: %w", subject, ErrBadSubject)
	}
	prefix = parts[0] + "." + parts[1]
	switch prefix {
	case RequestPrefix:
		if !IsKnownKind(parts[2]) {
			return "", "", "", fmt.Errorf("parse subject %q: unknown kind %q: %w", subject, parts[2], ErrBadSubject)
		}
	case StatusPrefix:
		if !IsKnownWorkflow(parts[2]) {
			return "", "", "", fmt.Errorf("parse subject %q: unknown workflow %q: %w", subject, parts[2], ErrBadSubject)
		}
	default:
		return "", "", "", fmt.Errorf("parse subject %q: unknown prefix %q: %w", subject, prefix, ErrBadSubject)
	}
	target, err = DecodeToken(parts[3])
	if err != nil {
		return "", "", "", fmt.Errorf("parse subject %q: %w", subject, err)
	}
	return prefix, parts[2], target, nil
}

// RequestFilter returns the filter subject for one request kind: "drover.req.<kind>.*".
func RequestFilter(kind string) string { return RequestPrefix + "." + kind + ".*" }

// StatusFilter returns the filter subject for one workflow's status: "drover.status.<workflow>.*".
func StatusFilter(workflow string) string { return StatusPrefix + "." + workflow + ".*" }

// WorkflowFilters returns the request filter subjects of every kind a workflow's consumer
// handles (for a JetStream consumer's FilterSubjects); nil for an unknown workflow.
func WorkflowFilters(workflow string) []string {
	kinds := KindsForWorkflow(workflow)
	if len(kinds) == 0 {
		return nil
	}
	out := make([]string, len(kinds))
	for i, k := range kinds {
		out[i] = RequestFilter(k)
	}
	return out
}
