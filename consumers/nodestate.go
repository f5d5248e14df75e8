package consumers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// nodeStatePrefix prefixes node state records in the drover-ops bucket.
const nodeStatePrefix = "node."

// NodeStateKey is the drover-ops key of a node's state record.
func NodeStateKey(node string) string { return nodeStatePrefix + keyToken(node) }

// Taint is a node taint drover put on a node (and must take off again).
type Taint struct {
	Key    string `json:"key"`
	Value  string `json:"value,omitempty"`
	Effect string `json:"effect"`
}

// NodeState says what drover is doing to a node. Every workflow reads it
// before acting: a node.notready for a node that drover emptied for a planned
// reboot is not an incident, a maintenance must not uncordon a node it did
// not cordon. Only the holder of the node's lease writes it.
type NodeState struct {
	Node string `json:"node"`
	// Maintenance is the maintenance operation that has the node, "" for none.
	Maintenance string `json:"maintenance,omitempty"`
	// Recovery is the recovery operation working on the node, "" for none.
	Recovery string `json:"recovery,omitempty"`
	// CordonedByDrover is true when drover cordoned the node (it was
	// schedulable before); a node a person cordoned is never uncordoned by drover.
	CordonedByDrover bool `json:"cordonedByDrover,omitempty"`
	// Taints are the taints drover added and will remove.
	Taints []Taint `json:"taints,omitempty"`
	// ExpectDown is set while drover expects the node to go NotReady (a
	// planned reboot in maintenance).
	ExpectDown bool `json:"expectDown,omitempty"`
	// Note is free text for people.
	Note      string    `json:"note,omitempty"`
	UpdatedBy string    `json:"updatedBy,omitempty"`
	Updated   time.Time `json:"updated,omitzero"`
}

// GetNodeState reads a node's state record; a node drover never touched has
// an empty one (found == false).
func GetNodeState(ctx context.Context, kv jetstream.KeyValue, node string) (NodeState, uint64, bool, error) {
	e, err := kv.Get(ctx, NodeStateKey(node))
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return NodeState{Node: node}, 0, false, nil
	}
	if err != nil {
		return NodeState{}, 0, false, fmt.Errorf("get node state %s: %w", node, err)
	}
	var st NodeState
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		return NodeState{}, 0, false, fmt.Errorf("decode node state %s: %w", node, err)
	}
	return st, e.Revision(), true, nil
}

// updateNodeState applies fn to a node's state with compare-and-set. check,
// called before each write, refuses it when the caller no longer holds the
// node (fencing).
func updateNodeState(ctx context.Context, kv jetstream.KeyValue, node, by string, check func() error, fn func(*NodeState) error) (NodeState, error) {
	for attempt := 0; attempt < 20; attempt++ {
		st, rev, found, err := GetNodeState(ctx, kv, node)
		if err != nil {
			return NodeState{}, err
		}
		if err := fn(&st); err != nil {
			return st, err
		}
		st.Node, st.UpdatedBy, st.Updated = node, by, time.Now().UTC()
		b, err := json.Marshal(st)
		if err != nil {
			return st, err
		}
		if err := check(); err != nil {
			return st, err
		}
		if found {
			_, err = kv.Update(ctx, NodeStateKey(node), b, rev)
		} else {
			_, err = kv.Create(ctx, NodeStateKey(node), b)
		}
		if err == nil {
			return st, nil
		}
		if !isRevisionConflict(err) {
			return st, fmt.Errorf("write node state %s: %w", node, err)
		}
	}
	return NodeState{}, fmt.Errorf("write node state %s: too many concurrent writers", node)
}
