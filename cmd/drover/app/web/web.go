// Package web is drover's read-only live page: operations with their
// per-VM progress and timings, updated as status events arrive (server-sent
// events), and the dead letters with their reasons. Plain HTML and
// JavaScript embedded in the binary: no framework, no build step.
package web

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

//go:embed static
var static embed.FS

// Server serves the page and its read-only API:
//
//	GET /                         the page
//	GET /api/operations           operations, unfinished first, newest first (at most Limit)
//	GET /api/operations/{key}     one operation with every target's progress
//	GET /api/deadletters          dead letters with their reasons
//	GET /api/events               status events as server-sent events
//	GET /api/phases               the VM phases that count as done
type Server struct {
	NC *nats.Conn
	JS jetstream.JetStream
	// Authorize, when set, is asked about every request: it returns false
	// for one without a valid token (read from "Authorization: Bearer" or,
	// for the page and EventSource that cannot send headers, ?token=).
	Authorize func(token string) bool
	// Limit bounds the operations listed (default 200).
	Limit int
	// Heartbeat is how often an idle event stream sends a comment, so that
	// proxies keep it open (default 15s).
	Heartbeat time.Duration
	Log       zerolog.Logger
}

// Handler returns the page's HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	files, _ := fs.Sub(static, "static")
	mux.Handle("GET /", http.FileServerFS(files))
	mux.HandleFunc("GET /api/operations", s.operations)
	mux.HandleFunc("GET /api/operations/{key}", s.operation)
	mux.HandleFunc("GET /api/deadletters", s.deadLetters)
	mux.HandleFunc("GET /api/events", s.events)
	mux.HandleFunc("GET /api/phases", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string][]string{"done": consumers.DonePhases()})
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.Authorize != nil && !s.Authorize(token(r)) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="drover"`)
			http.Error(w, "a valid token is required (Authorization: Bearer TOKEN, or ?token=TOKEN)", http.StatusUnauthorized)
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		mux.ServeHTTP(w, r)
	})
}

func token(r *http.Request) string {
	if t, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		return strings.TrimSpace(t)
	}
	return r.URL.Query().Get("token")
}

// Operation is an operation as the page shows it.
type Operation struct {
	consumers.Record
	Targets map[string]consumers.TargetProgress `json:"targets,omitempty"`
}

func (s *Server) operations(w http.ResponseWriter, r *http.Request) {
	ops, err := consumers.OpenOpStore(r.Context(), s.JS)
	if err != nil {
		s.fail(w, err)
		return
	}
	recs, err := ops.List(r.Context(), ">")
	if err != nil {
		s.fail(w, err)
		return
	}
	sort.SliceStable(recs, func(i, j int) bool {
		if ti, tj := recs[i].State.Terminal(), recs[j].State.Terminal(); ti != tj {
			return !ti
		}
		return recs[i].Created.After(recs[j].Created)
	})
	limit := s.Limit
	if limit <= 0 {
		limit = 200
	}
	if len(recs) > limit {
		recs = recs[:limit]
	}
	for i := range recs {
		recs[i].Request, recs[i].Data = nil, nil // not for the page
	}
	writeJSON(w, recs)
}

func (s *Server) operation(w http.ResponseWriter, r *http.Request) {
	key := r.PathValue("key")
	ops, err := consumers.OpenOpStore(r.Context(), s.JS)
	if err != nil {
		s.fail(w, err)
		return
	}
	rec, _, found, err := ops.Get(r.Context(), key)
	if err != nil {
		s.fail(w, err)
		return
	}
	if !found {
		http.Error(w, fmt.Sprintf("operation %s does not exist", key), http.StatusNotFound)
		return
	}
	kv, err := s.JS.KeyValue(r.Context(), consumers.BucketProgress)
	if err != nil {
		s.fail(w, err)
		return
	}
	targets, err := consumers.ReadProgress(r.Context(), kv, key)
	if err != nil {
		s.fail(w, err)
		return
	}
	rec.Request, rec.Data = nil, nil
	writeJSON(w, Operation{Record: rec, Targets: targets})
}

// DeadLetter is a dead letter as the page shows it.
type DeadLetter struct {
	Seq        uint64    `json:"seq"`
	Time       time.Time `json:"time"`
	Workflow   string    `json:"workflow"`
	Target     string    `json:"target,omitempty"`
	Operation  string    `json:"operation,omitempty"`
	Subject    string    `json:"subject"`
	Reason     string    `json:"reason"`
	Deliveries uint64    `json:"deliveries"`
}

func (s *Server) deadLetters(w http.ResponseWriter, r *http.Request) {
	dls, err := consumers.ListDeadLetters(r.Context(), s.JS, 0)
	if err != nil {
		s.fail(w, err)
		return
	}
	out := make([]DeadLetter, 0, len(dls))
	for _, d := range dls {
		out = append(out, DeadLetter{Seq: d.Seq, Time: d.Time, Workflow: d.Workflow, Target: d.Target,
			Operation: d.Operation, Subject: d.Subject, Reason: d.Reason, Deliveries: d.Deliveries})
	}
	writeJSON(w, out)
}

// Event is one status event on /api/events.
type Event struct {
	Time time.Time `json:"time"`
	schemas.Status
}

// events streams status events as they are published, until the client goes.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	flusher, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	msgs := make(chan *nats.Msg, 256)
	sub, err := s.NC.ChanSubscribe(schemas.StatusSubjects, msgs)
	if err != nil {
		s.fail(w, err)
		return
	}
	defer func() { _ = sub.Unsubscribe() }()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	fmt.Fprint(w, ": connected\n\n")
	flusher.Flush()
	beat := s.Heartbeat
	if beat <= 0 {
		beat = 15 * time.Second
	}
	t := time.NewTicker(beat)
	defer t.Stop()
	for {
		select {
		case <-r.Context().Done():
			return
		case <-t.C:
			fmt.Fprint(w, ": keep-alive\n\n")
		case m := <-msgs:
			e, err := schemas.FromHeaders(m.Header, m.Data)
			if err != nil {
				continue
			}
			p, err := schemas.Decode(e)
			st, ok := p.(*schemas.Status)
			if err != nil || !ok {
				continue
			}
			b, err := json.Marshal(Event{Time: e.Time(), Status: *st})
			if err != nil {
				continue
			}
			fmt.Fprintf(w, "event: status\ndata: %s\n\n", b)
		}
		flusher.Flush()
	}
}

func (s *Server) fail(w http.ResponseWriter, err error) {
	code := http.StatusServiceUnavailable
	if errors.Is(err, context.Canceled) {
		return
	}
	s.Log.Warn().Err(err).Msg("web: cannot read drover's state")
	http.Error(w, err.Error()+" (retrying can help)", code)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}
