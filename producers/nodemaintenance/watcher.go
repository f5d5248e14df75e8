// Package nodemaintenance turns medik8s NodeMaintenance resources
// (nodemaintenance.medik8s.io/v1beta1, spec nodeName and reason) into drover
// maintenance requests, so that teams who commit them through Flux or Argo CD
// get drover's evacuation: a new one publishes maintenance.requested, its
// deletion publishes maintenance.ended, and its status is written back as
// the Node Maintenance Operator writes it (phase, drainProgress,
// pendingPods, lastError). A finalizer keeps a deleted resource until its
// maintenance has ended.
package nodemaintenance

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// Resource is the NodeMaintenance resource.
var Resource = schema.GroupVersionResource{Group: "nodemaintenance.medik8s.io", Version: "v1beta1", Resource: "nodemaintenances"}

// Finalizer keeps a NodeMaintenance until drover ended its maintenance.
const Finalizer = "drover.io/nodemaintenance"

// Source labels this producer's events and metrics.
const Source = "nodemaintenance"

// Phases the Node Maintenance Operator writes.
const (
	PhaseRunning   = "Running"
	PhaseSucceeded = "Succeeded"
	PhaseFailed    = "Failed"
)

// Publisher publishes a validated event (producers.Publisher).
type Publisher interface {
	Publish(ctx context.Context, e event.Event) (producers.Result, error)
}

// Watcher reconciles NodeMaintenance resources with drover's operations.
type Watcher struct {
	Dynamic   dynamic.Interface
	JS        jetstream.JetStream
	Publisher Publisher
	// Interval between passes (default 2s): status follows the operation at
	// this pace.
	Interval time.Duration
	// Done says whether a target's phase counts as moved off the node
	// (default: consumers.TargetDone).
	Done    func(phase string) bool
	Metrics *producers.Metrics
	Log     zerolog.Logger
}

// RequestID names the maintenance request of a NodeMaintenance: its name and
// UID, so that a resource deleted and created again is a new request.
func RequestID(name string, uid string) string {
	if len(uid) > 8 {
		uid = uid[:8]
	}
	return "nm-" + name + "-" + uid
}

// Start reconciles until ctx ends.
func (w *Watcher) Start(ctx context.Context) error {
	every := w.Interval
	if every <= 0 {
		every = 2 * time.Second
	}
	t := time.NewTicker(every)
	defer t.Stop()
	var lastErr string
	for {
		if err := w.Reconcile(ctx); err != nil && ctx.Err() == nil {
			if err.Error() != lastErr {
				w.Log.Warn().Err(err).Msg("NodeMaintenance pass failed; will retry")
			}
			lastErr = err.Error()
		} else {
			lastErr = ""
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Reconcile makes one pass over every NodeMaintenance.
func (w *Watcher) Reconcile(ctx context.Context) error {
	list, err := w.Dynamic.Resource(Resource).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list NodeMaintenances (is the CRD installed?): %w", err)
	}
	ops, err := consumers.OpenOpStore(ctx, w.JS)
	if err != nil {
		return err
	}
	var errs []error
	for i := range list.Items {
		if err := w.reconcile(ctx, ops, &list.Items[i]); err != nil {
			errs = append(errs, fmt.Errorf("NodeMaintenance %s: %w", list.Items[i].GetName(), err))
		}
	}
	return errors.Join(errs...)
}

func (w *Watcher) reconcile(ctx context.Context, ops *consumers.OpStore, nm *unstructured.Unstructured) error {
	name, uid := nm.GetName(), string(nm.GetUID())
	node, _, _ := unstructured.NestedString(nm.Object, "spec", "nodeName")
	reason, _, _ := unstructured.NestedString(nm.Object, "spec", "reason")
	rid := RequestID(name, uid)
	res := w.Dynamic.Resource(Resource)

	if nm.GetDeletionTimestamp() != nil {
		if !slices.Contains(nm.GetFinalizers(), Finalizer) {
			return nil
		}
		if err := w.publish(ctx, "nodemaintenance-end-"+uid, &schemas.MaintenanceEnded{Node: node, RequestID: rid}); err != nil {
			return err
		}
		end, _, found, err := ops.Get(ctx, consumers.MaintenanceEndOperationKey(node, rid))
		if err != nil || !found || !end.State.Terminal() {
			return err // the end is still running: keep the resource
		}
		nm.SetFinalizers(slices.DeleteFunc(nm.GetFinalizers(), func(f string) bool { return f == Finalizer }))
		_, err = res.Update(ctx, nm, metav1.UpdateOptions{})
		if apierrors.IsNotFound(err) || apierrors.IsConflict(err) {
			return nil // gone, or changed: the next pass sees it
		}
		if err == nil {
			w.Log.Info().Str("nodeMaintenance", name).Str("node", node).Msg("maintenance ended; finalizer removed")
		}
		return err
	}
	if !slices.Contains(nm.GetFinalizers(), Finalizer) {
		nm.SetFinalizers(append(nm.GetFinalizers(), Finalizer))
		updated, err := res.Update(ctx, nm, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("add finalizer: %w", err)
		}
		nm = updated
	}
	phase, _, _ := unstructured.NestedString(nm.Object, "status", "phase")
	if phase == "" {
		if reason == "" {
			reason = "NodeMaintenance " + name
		}
		req := &schemas.MaintenanceRequested{Node: node, RequestID: rid, Reason: reason,
			RequestedBy: "NodeMaintenance/" + name, Mode: schemas.ModeLiveMigrate}
		if err := w.publish(ctx, "nodemaintenance-"+uid, req); err != nil {
			return w.writeStatus(ctx, nm, PhaseFailed, 0, nil, 0, err.Error())
		}
		return w.writeStatus(ctx, nm, PhaseRunning, 0, nil, 0, "")
	}
	rec, _, found, err := ops.Get(ctx, consumers.MaintenanceOperationKey(node, rid))
	if err != nil || !found {
		return err
	}
	progress, err := w.progress(ctx, rec.Key)
	if err != nil {
		return err
	}
	var pending []string
	done := 0
	for target, p := range progress {
		if w.done(p.Phase) {
			done++
		} else {
			pending = append(pending, target)
		}
	}
	sort.Strings(pending)
	total := len(progress)
	percent := 0
	if total > 0 {
		percent = int(math.Floor(100 * float64(done) / float64(total)))
	}
	newPhase, lastErr := PhaseRunning, rec.LastError
	switch rec.State {
	case consumers.StateSucceeded:
		newPhase, percent, lastErr = PhaseSucceeded, 100, ""
	case consumers.StateFailed:
		newPhase = PhaseFailed
	case consumers.StateCancelled:
		newPhase, lastErr = PhaseFailed, "cancelled: "+rec.CancelReason
	}
	return w.writeStatus(ctx, nm, newPhase, percent, pending, total, lastErr)
}

func (w *Watcher) done(phase string) bool {
	if w.Done != nil {
		return w.Done(phase)
	}
	return consumers.TargetDone(phase)
}

func (w *Watcher) progress(ctx context.Context, op string) (map[string]consumers.TargetProgress, error) {
	kv, err := w.JS.KeyValue(ctx, consumers.BucketProgress)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", consumers.BucketProgress, err)
	}
	return consumers.ReadProgress(ctx, kv, op)
}

func (w *Watcher) publish(ctx context.Context, id string, p schemas.Payload) error {
	e, err := schemas.New("drover/"+Source, id, p)
	if err != nil {
		return err
	}
	m := w.metrics()
	m.Received.WithLabelValues(Source, e.Type()).Inc()
	res, err := w.Publisher.Publish(ctx, e)
	if err != nil {
		m.Rejected.WithLabelValues(Source, "unavailable").Inc()
		return fmt.Errorf("publish %s: %w", e.Type(), err)
	}
	m.Published.WithLabelValues(Source, e.Type()).Inc()
	if res.Duplicate {
		m.Duplicate.WithLabelValues(Source, e.Type()).Inc()
	} else {
		w.Log.Info().Str("event", e.ID()).Str("type", e.Type()).Str("node", p.Target()).Msg("NodeMaintenance request published")
	}
	return nil
}

// writeStatus updates the status subresource when something changed.
func (w *Watcher) writeStatus(ctx context.Context, nm *unstructured.Unstructured, phase string, progress int, pending []string, total int, lastErr string) error {
	cur, _, _ := unstructured.NestedMap(nm.Object, "status")
	want := map[string]any{"phase": phase, "drainProgress": int64(progress), "totalpods": int64(total), "evictionPods": int64(total)}
	if lastErr != "" {
		want["lastError"] = lastErr
	}
	if len(pending) > 0 {
		names := make([]any, 0, len(pending))
		refs := make([]any, 0, len(pending))
		for _, p := range pending {
			names = append(names, p)
			ns, name, _ := strings.Cut(p, "/")
			refs = append(refs, map[string]any{"namespace": ns, "name": name})
		}
		want["pendingPods"], want["pendingPodsRefs"] = names, refs
	}
	if sameStatus(cur, want) {
		return nil
	}
	want["lastUpdate"] = time.Now().UTC().Format(time.RFC3339)
	nm = nm.DeepCopy()
	if err := unstructured.SetNestedMap(nm.Object, want, "status"); err != nil {
		return err
	}
	_, err := w.Dynamic.Resource(Resource).UpdateStatus(ctx, nm, metav1.UpdateOptions{})
	if apierrors.IsConflict(err) {
		return nil // changed meanwhile: the next pass writes it
	}
	return err
}

func sameStatus(cur, want map[string]any) bool {
	for _, k := range []string{"phase", "drainProgress", "totalpods", "lastError"} {
		if fmt.Sprint(cur[k]) != fmt.Sprint(want[k]) {
			return false
		}
	}
	return fmt.Sprint(cur["pendingPods"]) == fmt.Sprint(want["pendingPods"])
}

var unregistered = producers.NewMetrics(nil)

func (w *Watcher) metrics() *producers.Metrics {
	if w.Metrics == nil {
		return unregistered
	}
	return w.Metrics
}
