// Package recovery holds the recovery workflow's cluster logic. This file
// names incidents: every producer's node.notready event of one failure of a
// node (the node watcher's, Alertmanager's, a person's) is one operation.
package recovery

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

// DefaultLeaseTimeout is how long a kubelet Lease may go unrenewed before
// the node counts as gone (the node watcher's --node-lease-timeout).
const DefaultLeaseTimeout = 40 * time.Second

// Incident resolves the operation key of a node.notready event from the
// Node as the API shows it, not from the producer's "since" (the node
// watcher sees a failure at the lease timeout, Alertmanager fifteen minutes
// later): the node's UID and the start of its current spell. For a node
// whose kubelet Lease has stopped (a dead or cut-off node) the spell starts
// at the last renewal, which stays put while the node is gone; for a node
// that still renews its Lease but is not Ready, at the Ready condition's last
// transition; for a node Ready again, the event's own since (its spell is
// over). A node that no longer exists keeps the event's own key. An event
// keeps the operation it was first given when it is delivered again.
type Incident struct {
	Kube kubernetes.Interface
	// LeaseTimeout: see DefaultLeaseTimeout.
	LeaseTimeout time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time

	// seen remembers the operation each event was first given: a message
	// redelivered after its node changed (it came back while the recovery
	// waited at its gate) still belongs to the operation it started.
	mu   sync.Mutex
	seen map[string]string
	ring []string
}

// seenMax bounds the memory of Incident.seen.
const seenMax = 10000

var _ consumers.Resolver = (*Incident)(nil)

// Resolve implements consumers.Resolver. Errors reading the API are
// returned for a retry. A node.ready event that the live cluster
// contradicts (the node is not Ready, or its Lease is stale: Alertmanager's
// KubeNodeNotReady resolves as soon as a dead node is cordoned) cancels no
// recovery.
func (i *Incident) Resolve(ctx context.Context, e consumers.Event, keys consumers.Keys) (consumers.Keys, error) {
	if r, ok := e.Payload.(*schemas.NodeReady); ok {
		return i.resolveReady(ctx, r, keys)
	}
	p, ok := e.Payload.(*schemas.NodeNotReady)
	if !ok {
		return keys, nil
	}
	id := ""
	if e.CloudEvent.ID() != "" {
		id = schemas.MsgID(e.CloudEvent)
		i.mu.Lock()
		op, known := i.seen[id]
		i.mu.Unlock()
		if known {
			keys.Operation = op
			return keys, nil
		}
	}
	node, err := i.Kube.CoreV1().Nodes().Get(ctx, p.Node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		i.remember(id, keys.Operation)
		return keys, nil
	}
	if err != nil {
		return keys, fmt.Errorf("read node %s to name its incident: %w", p.Node, err)
	}
	lease, err := i.Kube.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, p.Node, metav1.GetOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return keys, fmt.Errorf("read lease of node %s to name its incident: %w", p.Node, err)
	}
	if err != nil {
		lease = nil
	}
	keys.Operation = consumers.RecoveryOperationKey(p.Node, i.name(node, lease, p.Since))
	i.remember(id, keys.Operation)
	return keys, nil
}

func (i *Incident) remember(id, op string) {
	if id == "" {
		return
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.seen == nil {
		i.seen = map[string]string{}
	}
	if _, ok := i.seen[id]; ok {
		return
	}
	if len(i.ring) >= seenMax {
		delete(i.seen, i.ring[0])
		i.ring = i.ring[1:]
	}
	i.seen[id] = op
	i.ring = append(i.ring, id)
}

func (i *Incident) clock() (time.Duration, func() time.Time) {
	timeout, now := i.LeaseTimeout, time.Now
	if timeout <= 0 {
		timeout = DefaultLeaseTimeout
	}
	if i.Now != nil {
		now = i.Now
	}
	return timeout, now
}

// name is <uid>-<unix seconds of the spell's start>. For a node Ready again
// the start is the event's since: a node watcher's event redelivered after
// the node came back names the operation it started (the watcher's since is
// the spell's start), and a stale event's operation, which finishes at once,
// shares no name with a later failure.
func (i *Incident) name(node *corev1.Node, lease *coordinationv1.Lease, since time.Time) string {
	timeout, now := i.clock()
	start := since
	switch {
	case lease != nil && lease.Spec.RenewTime != nil && now().Sub(lease.Spec.RenewTime.Time) >= timeout:
		start = lease.Spec.RenewTime.Time
	case Health(node, lease, now(), timeout).Ready:
	default:
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady && !c.LastTransitionTime.IsZero() {
				start = c.LastTransitionTime.Time
			}
		}
	}
	return string(node.UID) + "-" + strconv.FormatInt(start.UTC().Unix(), 10)
}

func (i *Incident) resolveReady(ctx context.Context, p *schemas.NodeReady, keys consumers.Keys) (consumers.Keys, error) {
	if keys.Cancels == "" {
		return keys, nil
	}
	node, err := i.Kube.CoreV1().Nodes().Get(ctx, p.Node, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		keys.Cancels = ""
		return keys, nil
	}
	if err != nil {
		return keys, fmt.Errorf("read node %s to check its node.ready: %w", p.Node, err)
	}
	lease, err := i.Kube.CoordinationV1().Leases(corev1.NamespaceNodeLease).Get(ctx, p.Node, metav1.GetOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		return keys, fmt.Errorf("read lease of node %s to check its node.ready: %w", p.Node, err)
	}
	if err != nil {
		lease = nil
	}
	timeout, now := i.clock()
	if !Health(node, lease, now(), timeout).Ready {
		keys.Cancels = ""
	}
	return keys, nil
}
