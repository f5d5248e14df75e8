package ingress

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/drover-io/drover/schemas"
)

// TokenFile is the --ingress-tokens-file format:
//
//	tokens:
//	- name: chatbot
//	  sha256: 9f86d0...   # hex SHA-256 of the bearer token
//	  types: [io.drover.maintenance.requested.v1, io.drover.maintenance.ended.v1]   # "*" for every type
type TokenFile struct {
	Tokens []TokenEntry `json:"tokens"`
}

// TokenEntry is one bearer token: only its hash is stored.
type TokenEntry struct {
	Name   string   `json:"name"`
	SHA256 string   `json:"sha256"`
	Types  []string `json:"types"`
}

// token is a parsed TokenEntry.
type token struct {
	name  string
	hash  [sha256.Size]byte
	all   bool
	types map[string]bool
}

// Tokens is a parsed token file.
type Tokens struct{ list []token }

// ParseTokens reads a token file strictly: unknown keys, a hash that is not
// 64 hex digits, a duplicate name or hash, an unknown event type or a token
// without types are errors naming the entry.
func ParseTokens(b []byte) (*Tokens, error) {
	var f TokenFile
	if err := yaml.UnmarshalStrict(b, &f); err != nil {
		return nil, fmt.Errorf("token file: %w", err)
	}
	known := map[string]bool{}
	for _, t := range schemas.Types() {
		if t != schemas.TypeStatus {
			known[t] = true
		}
	}
	out := &Tokens{}
	names, hashes := map[string]bool{}, map[[sha256.Size]byte]bool{}
	var errs []error
	for i, e := range f.Tokens {
		where := fmt.Sprintf("tokens[%d] (%s)", i, e.Name)
		t := token{name: e.Name, types: map[string]bool{}}
		if e.Name == "" {
			errs = append(errs, fmt.Errorf("%s.name: is required", where))
		} else if names[e.Name] {
			errs = append(errs, fmt.Errorf("%s.name: %q appears twice", where, e.Name))
		}
		names[e.Name] = true
		h, err := hex.DecodeString(e.SHA256)
		if err != nil || len(h) != sha256.Size {
			errs = append(errs, fmt.Errorf("%s.sha256: must be the 64 hex digits of the token's SHA-256, got %q", where, e.SHA256))
		} else {
			copy(t.hash[:], h)
			if hashes[t.hash] {
				errs = append(errs, fmt.Errorf("%s.sha256: the same token is listed twice", where))
			}
			hashes[t.hash] = true
		}
		if len(e.Types) == 0 {
			errs = append(errs, fmt.Errorf("%s.types: is required (event types this token may publish, or \"*\")", where))
		}
		for _, typ := range e.Types {
			switch {
			case typ == "*":
				t.all = true
			case known[typ]:
				t.types[typ] = true
			default:
				errs = append(errs, fmt.Errorf("%s.types: %q is not a request event type", where, typ))
			}
		}
		out.list = append(out.list, t)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// Lookup finds the token whose hash matches bearer. Every entry is compared
// in constant time, so the time taken says nothing about which matched.
func (ts *Tokens) Lookup(bearer string) (name string, allowed func(eventType string) bool, ok bool) {
	h := sha256.Sum256([]byte(bearer))
	var found *token
	for i := range ts.list {
		if subtle.ConstantTimeCompare(h[:], ts.list[i].hash[:]) == 1 {
			found = &ts.list[i]
		}
	}
	if found == nil {
		return "", nil, false
	}
	t := *found
	return t.name, func(typ string) bool { return t.all || t.types[typ] }, true
}

// TokenSource serves the token file, re-reading it when it changes. A
// changed file that does not parse is refused with a log line and the
// previous tokens stay in force: a typo must neither lock everyone out nor
// open the door.
type TokenSource struct {
	path    string
	onError func(error)
	// Every is how often the file is looked at again (default 1s; 0 in
	// tests: at every request).
	Every time.Duration

	mu      sync.Mutex
	current *Tokens
	raw     []byte
	checked time.Time
}

// NewTokenSource reads path once; an unreadable or invalid file is an error.
// onError is told about later files that are refused.
func NewTokenSource(path string, onError func(error)) (*TokenSource, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ingress tokens: %w", err)
	}
	ts, err := ParseTokens(b)
	if err != nil {
		return nil, fmt.Errorf("ingress tokens %s: %w", path, err)
	}
	return &TokenSource{path: path, onError: onError, Every: time.Second, current: ts, raw: b, checked: time.Now()}, nil
}

// Tokens returns the tokens in force, re-reading the file at most every Every.
func (s *TokenSource) Tokens() *Tokens {
	s.mu.Lock()
	defer s.mu.Unlock()
	if time.Since(s.checked) < s.Every {
		return s.current
	}
	s.checked = time.Now()
	b, err := os.ReadFile(s.path)
	if err != nil {
		s.report(fmt.Errorf("ingress tokens: %w; keeping the previous tokens", err))
		return s.current
	}
	if bytes.Equal(b, s.raw) {
		return s.current
	}
	ts, err := ParseTokens(b)
	if err != nil {
		s.report(fmt.Errorf("ingress tokens %s changed but do not parse; keeping the previous tokens: %w", s.path, err))
		s.raw = b // report once per bad version
		return s.current
	}
	s.current, s.raw = ts, b
	return ts
}

func (s *TokenSource) report(err error) {
	if s.onError != nil {
		s.onError(err)
	}
}
