// Package nodewatch publishes what it sees of the cluster's nodes: a
// node.notready event when a node's kubelet Lease has not been renewed for
// the lease timeout or its Ready condition is not True, node.ready when it
// is back, node.fenced when the out-of-service taint appears on a node
// (put there by a person or a fencing agent). Event ids derive from the
// node's UID and the start of the spell, so several replicas publish one
// event and one incident is one operation.
package nodewatch

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/cloudevents/sdk-go/v2/event"
	"github.com/rs/zerolog"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// Source is the CloudEvents source of every replica's events: with the
// deterministic ids, two replicas publish the same message id.
const Source = "drover/nodewatch"

// Publisher publishes one event and waits for JetStream's acknowledgement
// (producers.Publisher).
type Publisher interface {
	Publish(ctx context.Context, e event.Event) (producers.Result, error)
}

var _ Publisher = (*producers.Publisher)(nil)

// MetricsSource labels this producer's metrics (producers.Metrics).
const MetricsSource = "nodewatch"

// Watcher watches Nodes and their kubelet Leases and publishes node events.
type Watcher struct {
	Kube      kubernetes.Interface
	Publisher Publisher
	// LeaseTimeout: a Lease this old makes its node not ready
	// (recovery.DefaultLeaseTimeout).
	LeaseTimeout time.Duration
	Log          zerolog.Logger
	// Metrics, shared by the producers (source "nodewatch"); nil: not counted.
	Metrics *producers.Metrics
	// Resync re-checks every node this often, whatever the informers say
	// (default 30s).
	Resync time.Duration

	mu    sync.Mutex
	state map[string]*nodeState
	nodes cache.Indexer
	lease cache.Indexer
	queue workqueue.TypedRateLimitingInterface[string]
}

// nodeState is what this replica published for a node.
type nodeState struct {
	notReady string // id of the node.notready of the current spell, "" while healthy
	ready    string // id of the last node.ready
	fenced   string // id of the last node.fenced
}

// Start runs the watcher until ctx ends.
func (w *Watcher) Start(ctx context.Context) error {
	if w.LeaseTimeout <= 0 {
		w.LeaseTimeout = recovery.DefaultLeaseTimeout
	}
	if w.Resync <= 0 {
		w.Resync = 30 * time.Second
	}
	w.state = map[string]*nodeState{}
	w.queue = workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](100*time.Millisecond, 10*time.Second),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "nodewatch"})
	nodeFactory := informers.NewSharedInformerFactory(w.Kube, w.Resync)
	leaseFactory := informers.NewSharedInformerFactoryWithOptions(w.Kube, w.Resync, informers.WithNamespace(corev1.NamespaceNodeLease))
	nodeInf := nodeFactory.Core().V1().Nodes().Informer()
	leaseInf := leaseFactory.Coordination().V1().Leases().Informer()
	w.nodes, w.lease = nodeInf.GetIndexer(), leaseInf.GetIndexer()
	enqueue := func(obj any) {
		if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = d.Obj
		}
		switch o := obj.(type) {
		case *corev1.Node:
			w.queue.Add(o.Name)
		case *coordinationv1.Lease:
			w.queue.Add(o.Name)
		}
	}
	handler := cache.ResourceEventHandlerFuncs{AddFunc: enqueue, UpdateFunc: func(_, obj any) { enqueue(obj) }, DeleteFunc: enqueue}
	if _, err := nodeInf.AddEventHandler(handler); err != nil {
		return err
	}
	if _, err := leaseInf.AddEventHandler(handler); err != nil {
		return err
	}
	nodeFactory.Start(ctx.Done())
	leaseFactory.Start(ctx.Done())
	defer nodeFactory.Shutdown()
	defer leaseFactory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), nodeInf.HasSynced, leaseInf.HasSynced) {
		w.queue.ShutDown()
		return nil
	}
	w.Log.Info().Dur("leaseTimeout", w.LeaseTimeout).Msg("node watcher started")
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for w.next(ctx) {
		}
	}()
	<-ctx.Done()
	w.queue.ShutDown()
	wg.Wait()
	return nil
}

func (w *Watcher) next(ctx context.Context) bool {
	name, quit := w.queue.Get()
	if quit {
		return false
	}
	defer w.queue.Done(name)
	recheck, err := w.sync(ctx, name)
	switch {
	case err != nil && ctx.Err() == nil:
		w.Log.Warn().Err(err).Str("node", name).Msg("node watcher: publish failed; retrying")
		w.queue.AddRateLimited(name)
	case err == nil:
		w.queue.Forget(name)
		if recheck > 0 {
			w.queue.AddAfter(name, recheck)
		}
	}
	return true
}

// sync publishes what changed about one node. recheck is when its Lease
// crosses the timeout if nothing else happens.
func (w *Watcher) sync(ctx context.Context, name string) (recheck time.Duration, err error) {
	obj, exists, err := w.nodes.GetByKey(name)
	if err != nil {
		return 0, err
	}
	if !exists {
		w.mu.Lock()
		delete(w.state, name)
		w.mu.Unlock()
		return 0, nil
	}
	node := obj.(*corev1.Node)
	var lease *coordinationv1.Lease
	if lobj, ok, _ := w.lease.GetByKey(corev1.NamespaceNodeLease + "/" + name); ok {
		lease = lobj.(*coordinationv1.Lease)
	}
	now := time.Now()
	h := recovery.Health(node, lease, now, w.LeaseTimeout)
	w.mu.Lock()
	st := w.state[name]
	if st == nil {
		st = &nodeState{}
		w.state[name] = st
	}
	cur := *st
	w.mu.Unlock()

	uid := string(node.UID)
	if oos := outOfService(node); oos != nil && node.Annotations[recovery.AnnotationTaintedBy] == "" {
		at := h.SpellStart
		if oos.TimeAdded != nil {
			at = oos.TimeAdded.Time
		}
		id := schemas.DeterministicID(uid, "fenced", unix(at))
		if cur.fenced != id {
			if err := w.publish(ctx, id, &schemas.NodeFenced{Node: name, Method: "out-of-service-taint",
				By: "node.kubernetes.io/out-of-service taint (nodewatch)"}); err != nil {
				return 0, err
			}
			cur.fenced = id
		}
	}
	switch {
	case !h.Healthy:
		id := schemas.DeterministicID(uid, unix(h.SpellStart))
		if cur.notReady != id {
			if err := w.publish(ctx, id, &schemas.NodeNotReady{Node: name, Since: h.SpellStart.UTC(), Reason: h.Reason, SourceDetail: h.Detail}); err != nil {
				return 0, err
			}
			cur.notReady = id
		}
	case h.Ready && (cur.notReady != "" || recovery.DroverTainted(node)):
		// Back from a spell this replica saw, or carrying the taint a
		// recovery left (a replica that started since): drover's
		// node.ready handler takes it off once the node is clean.
		id := schemas.DeterministicID(uid, "ready", unix(h.SpellStart))
		if cur.ready != id {
			if err := w.publish(ctx, id, &schemas.NodeReady{Node: name, Since: h.SpellStart.UTC()}); err != nil {
				return 0, err
			}
			cur.ready = id
		}
		cur.notReady = ""
	}
	w.mu.Lock()
	*st = cur
	w.mu.Unlock()
	if h.Healthy && !h.LeaseRenewed.IsZero() {
		recheck = h.LeaseRenewed.Add(w.LeaseTimeout).Sub(now) + 10*time.Millisecond
	}
	if h.Healthy && !h.Ready && !h.SpellStart.IsZero() {
		// Not Ready, not for long yet: look again when it would count.
		if d := h.SpellStart.Add(w.LeaseTimeout).Sub(now) + 10*time.Millisecond; d > 0 && (recheck <= 0 || d < recheck) {
			recheck = d
		}
	}
	return recheck, nil
}

func (w *Watcher) publish(ctx context.Context, id string, p schemas.Payload) error {
	e, err := schemas.New(Source, id, p)
	if err != nil {
		return err
	}
	m := w.Metrics
	if m == nil {
		m = unregistered
	}
	m.Received.WithLabelValues(MetricsSource, e.Type()).Inc()
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	res, err := w.Publisher.Publish(pctx, e)
	switch {
	case errors.Is(err, producers.ErrBackPressure):
		m.Rejected.WithLabelValues(MetricsSource, "back_pressure").Inc()
	case err != nil:
		m.Rejected.WithLabelValues(MetricsSource, "unavailable").Inc()
	default:
		m.Published.WithLabelValues(MetricsSource, e.Type()).Inc()
		if res.Duplicate {
			m.Duplicate.WithLabelValues(MetricsSource, e.Type()).Inc()
		}
	}
	if err != nil {
		return fmt.Errorf("publish %s of node %s: %w", e.Type(), p.Target(), err)
	}
	w.Log.Info().Str("node", p.Target()).Str("type", e.Type()).Str("id", id).Bool("duplicate", res.Duplicate).Msg("node event published")
	return nil
}

var unregistered = producers.NewMetrics(nil)

func outOfService(n *corev1.Node) *corev1.Taint {
	for i := range n.Spec.Taints {
		if n.Spec.Taints[i].Key == recovery.TaintOutOfService {
			return &n.Spec.Taints[i]
		}
	}
	return nil
}

func unix(t time.Time) string { return strconv.FormatInt(t.Unix(), 10) }
