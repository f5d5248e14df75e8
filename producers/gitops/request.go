package gitops

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/drover-io/drover/schemas"
)

// The request file format.
const (
	APIVersion = "drover.io/v1"
	Kind       = "MaintenanceRequest"
	// StateActive and StateDone are spec.state values.
	StateActive = "Active"
	StateDone   = "Done"
)

// Request is one maintenance request file:
//
//	apiVersion: drover.io/v1
//	kind: MaintenanceRequest
//	metadata: {name: worker-3-bios}
//	spec:
//	  node: worker-3
//	  reason: BIOS update
//	  requestedBy: alice
//	  mode: LiveMigrate        # or Evict
//	  force: false
//	  returnHome: true
//	  window: {start: "2026-11-22T01:00:00Z", end: "2026-11-22T03:00:00Z"}
//	  state: Active            # or Done
type Request struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Metadata   struct {
		Name string `json:"name"`
	} `json:"metadata"`
	Spec Spec `json:"spec"`
}

// Spec is a request's spec.
type Spec struct {
	Node        string  `json:"node"`
	Reason      string  `json:"reason"`
	RequestedBy string  `json:"requestedBy,omitempty"`
	Mode        string  `json:"mode,omitempty"`
	Force       bool    `json:"force,omitempty"`
	ReturnHome  bool    `json:"returnHome,omitempty"`
	Window      *Window `json:"window,omitempty"`
	State       string  `json:"state,omitempty"`
}

// Window is when a request may run.
type Window struct {
	Start time.Time  `json:"start"`
	End   *time.Time `json:"end,omitempty"`
}

// Parse reads and validates a request file. Unknown fields are errors.
func Parse(data []byte) (*Request, error) {
	var r Request
	if err := yaml.UnmarshalStrict(data, &r); err != nil {
		return nil, fmt.Errorf("parse: %w", err)
	}
	if err := r.Validate(); err != nil {
		return &r, err
	}
	return &r, nil
}

// Validate checks the request as the maintenance event it becomes.
func (r *Request) Validate() error {
	var errs []string
	if r.APIVersion != APIVersion {
		errs = append(errs, fmt.Sprintf("apiVersion must be %s, got %q", APIVersion, r.APIVersion))
	}
	if r.Kind != Kind {
		errs = append(errs, fmt.Sprintf("kind must be %s, got %q", Kind, r.Kind))
	}
	if r.Metadata.Name == "" {
		errs = append(errs, "metadata.name is required")
	}
	switch r.Spec.State {
	case "", StateActive, StateDone:
	default:
		errs = append(errs, fmt.Sprintf("spec.state must be %s or %s, got %q", StateActive, StateDone, r.Spec.State))
	}
	if r.Spec.Window != nil && r.Spec.Window.Start.IsZero() {
		errs = append(errs, "spec.window.start is required")
	}
	if len(errs) == 0 {
		ev := r.event("validation")
		if err := ev.Validate(); err != nil {
			var ve *schemas.ValidationError
			if errors.As(err, &ve) {
				errs = append(errs, "spec."+ve.Field+": "+ve.Reason)
			} else {
				errs = append(errs, err.Error())
			}
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

// RequestID names the request: the file's metadata.name and a hash of what
// makes it a different request (node, mode, force, returnHome, window).
// Editing the reason keeps the request; editing the rest makes a new one
// (the old one ends).
func (r *Request) RequestID() string {
	win := ""
	if w := r.Spec.Window; w != nil {
		win = w.Start.UTC().Format(time.RFC3339)
		if w.End != nil {
			win += "/" + w.End.UTC().Format(time.RFC3339)
		}
	}
	mode := r.Spec.Mode
	if mode == "" {
		mode = schemas.ModeLiveMigrate
	}
	h := schemas.DeterministicID(r.Spec.Node, mode, fmt.Sprint(r.Spec.Force), fmt.Sprint(r.Spec.ReturnHome), win)
	name := r.Metadata.Name
	if len(name) > 200 {
		name = name[:200]
	}
	return "git-" + name + "-" + h[:8]
}

// event is the maintenance.requested the request publishes.
func (r *Request) event(requestedBy string) *schemas.MaintenanceRequested {
	by := r.Spec.RequestedBy
	if by == "" {
		by = requestedBy
	}
	ev := &schemas.MaintenanceRequested{Node: r.Spec.Node, RequestID: r.RequestID(), Reason: r.Spec.Reason,
		RequestedBy: by, Mode: r.Spec.Mode, Force: r.Spec.Force, ReturnHome: r.Spec.ReturnHome}
	if ev.Mode == "" {
		ev.Mode = schemas.ModeLiveMigrate
	}
	if w := r.Spec.Window; w != nil {
		ev.Window = &schemas.Window{Start: w.Start.UTC(), End: w.End}
	}
	return ev
}

// Active reports whether the request asks for maintenance at now: not Done,
// and inside its window (if it has one).
func (r *Request) Active(now time.Time) bool {
	if r.Spec.State == StateDone {
		return false
	}
	if w := r.Spec.Window; w != nil {
		if now.Before(w.Start) {
			return false
		}
		if w.End != nil && !now.Before(*w.End) {
			return false
		}
	}
	return true
}
