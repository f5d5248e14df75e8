package recovery

import (
	"fmt"
	"sort"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// This file is the recovery's plan: pure functions from what the cluster
// looks like to what to do, tested with tables and no cluster.

// NodeHealth is what drover concludes about a node from its Node object and
// kubelet Lease.
type NodeHealth struct {
	// Healthy is false during an incident: the Lease stale, or the Ready
	// condition not True for the lease timeout (a kubelet starting up
	// reports NotReady for seconds: that is no incident).
	Healthy bool
	// Ready: the Ready condition is True and the Lease fresh.
	Ready bool
	// SpellStart is when the current spell of ill health started: the last
	// Lease renewal of a node whose Lease stopped, else the Ready
	// condition's last transition.
	SpellStart time.Time
	// Reason is LeaseExpired, or the Ready condition's reason.
	Reason string
	// Detail says what was seen, for people.
	Detail string
	// LeaseRenewed is the Lease's last renewal (zero without a Lease).
	LeaseRenewed time.Time
}

// Health judges a node: unhealthy when its Lease has not been renewed for
// leaseTimeout or its Ready condition has not been True for leaseTimeout.
// lease may be nil.
func Health(node *corev1.Node, lease *coordinationv1.Lease, now time.Time, leaseTimeout time.Duration) NodeHealth {
	var h NodeHealth
	ready := corev1.ConditionUnknown
	var readyCond *corev1.NodeCondition
	for i := range node.Status.Conditions {
		if node.Status.Conditions[i].Type == corev1.NodeReady {
			readyCond = &node.Status.Conditions[i]
			ready = readyCond.Status
		}
	}
	if lease != nil && lease.Spec.RenewTime != nil {
		h.LeaseRenewed = lease.Spec.RenewTime.Time
	}
	leaseStale := !h.LeaseRenewed.IsZero() && now.Sub(h.LeaseRenewed) >= leaseTimeout
	switch {
	case leaseStale:
		h.SpellStart = h.LeaseRenewed
		h.Reason = "LeaseExpired"
		h.Detail = fmt.Sprintf("kubelet Lease last renewed %s ago (timeout %s); Ready=%s", now.Sub(h.LeaseRenewed).Round(time.Second), leaseTimeout, ready)
	case ready != corev1.ConditionTrue && (readyCond == nil || now.Sub(readyCond.LastTransitionTime.Time) >= leaseTimeout):
		h.Reason = "NodeNotReady"
		h.Detail = "Ready=" + string(ready)
		if readyCond != nil {
			h.SpellStart = readyCond.LastTransitionTime.Time
			if readyCond.Reason != "" {
				h.Reason = readyCond.Reason
			}
			if readyCond.Message != "" {
				h.Detail += ": " + readyCond.Message
			}
		} else {
			h.SpellStart = node.CreationTimestamp.Time
		}
	default:
		h.Healthy = true
		h.Ready = ready == corev1.ConditionTrue
		if readyCond != nil {
			h.SpellStart = readyCond.LastTransitionTime.Time
		}
		h.Detail = "Ready=" + string(ready)
	}
	return h
}

// Storm is the storm guard's verdict.
type Storm struct {
	Active    bool
	Unhealthy []string // names of the unhealthy nodes in scope
	InScope   int
	Limit     StormLimit
}

func (s Storm) String() string {
	return fmt.Sprintf("%d of %d nodes unhealthy at once (limit %s): %s", len(s.Unhealthy), s.InScope, s.Limit, strings.Join(s.Unhealthy, ", "))
}

// CheckStorm applies the storm guard to the nodes in scope (not excluded),
// given their health.
func CheckStorm(health map[string]NodeHealth, limit StormLimit) Storm {
	s := Storm{InScope: len(health), Limit: limit}
	for name, h := range health {
		if !h.Healthy {
			s.Unhealthy = append(s.Unhealthy, name)
		}
	}
	sort.Strings(s.Unhealthy)
	s.Active = limit.exceeded(len(s.Unhealthy), s.InScope)
	return s
}

// Evidence is a node.fenced event drover recorded.
type Evidence struct {
	Method, By string
	At         time.Time
}

// GateInput is what the fencing gate looks at.
type GateInput struct {
	Policy Policy
	// NodeExists is false once the Node object is gone.
	NodeExists bool
	// OutOfService: the out-of-service taint is on the node.
	OutOfService bool
	// LeaseRenewed is the kubelet Lease's last renewal (zero: no Lease).
	LeaseRenewed time.Time
	Now          time.Time
	// Fenced is a node.fenced event received after the spell started.
	Fenced *Evidence
	// Deckhouse: the node carries Deckhouse's fencing label and no
	// maintenance annotation, so Deckhouse's watchdog fencing is armed.
	Deckhouse bool
}

// Gate modes reported in GateDecision.Mode beside the fencing modes.
const (
	GateDeleted   = "deleted"
	GateDeckhouse = "deckhouse"
)

// GateDecision says whether the node is proven dead.
type GateDecision struct {
	Open bool
	// Mode is the fencing mode that decided (a Fencing* constant,
	// GateDeleted or GateDeckhouse).
	Mode string
	// By says what opened the gate, or what it waits for.
	By string
	// Unsafe: opened without proof (FencingNone).
	Unsafe bool
	// AddTaint: drover must put the out-of-service taint on the node.
	AddTaint bool
	// Recheck: when closed, how long until the decision can change by
	// itself (0: only an outside event changes it).
	Recheck time.Duration
}

// Gate decides whether the node is proven dead, so that its VMs cannot be
// running there any more. An out-of-service taint, a node.fenced event, or
// a deleted Node object open it in every mode; then the policy's mode.
func Gate(in GateInput) GateDecision {
	leaseAge := in.Now.Sub(in.LeaseRenewed)
	switch {
	case !in.NodeExists:
		return GateDecision{Open: true, Mode: GateDeleted, By: "the Node object was deleted (Kubernetes collects its pods as orphans)"}
	case in.OutOfService:
		return GateDecision{Open: true, Mode: FencingTaint, By: "the out-of-service taint is on the node"}
	case in.Fenced != nil:
		return GateDecision{Open: true, Mode: FencingTaint, AddTaint: true,
			By: fmt.Sprintf("node.fenced at %s: %s by %s", in.Fenced.At.UTC().Format(time.RFC3339), in.Fenced.Method, in.Fenced.By)}
	case in.Deckhouse:
		wait := DeckhouseFencingTimeout + in.Policy.margin()
		if in.LeaseRenewed.IsZero() {
			return GateDecision{Mode: GateDeckhouse, By: "Deckhouse watchdog fencing: the node has no kubelet Lease to time it by"}
		}
		if leaseAge >= wait {
			return GateDecision{Open: true, Mode: GateDeckhouse, AddTaint: true,
				By: fmt.Sprintf("Deckhouse watchdog fencing: kubelet Lease %s old, past the %s timeout + %s margin", leaseAge.Round(time.Second), DeckhouseFencingTimeout, in.Policy.margin())}
		}
		return GateDecision{Mode: GateDeckhouse, Recheck: wait - leaseAge,
			By: fmt.Sprintf("Deckhouse watchdog fencing: the kubelet Lease to be %s old (now %s)", wait, leaseAge.Round(time.Second))}
	}
	switch in.Policy.Fencing {
	case FencingNone:
		return GateDecision{Open: true, Mode: FencingNone, Unsafe: true, AddTaint: true,
			By: "fencing none: the node is NOT proven dead (unsafe, chosen by configuration)"}
	case FencingWatchdog:
		wait := in.Policy.WatchdogTimeout + in.Policy.margin()
		if in.LeaseRenewed.IsZero() {
			return GateDecision{Mode: FencingWatchdog, By: "watchdog fencing: the node has no kubelet Lease to time it by; the out-of-service taint or a node.fenced event"}
		}
		if leaseAge >= wait {
			return GateDecision{Open: true, Mode: FencingWatchdog, AddTaint: true,
				By: fmt.Sprintf("watchdog: kubelet Lease %s old, past the %s watchdog timeout + %s margin", leaseAge.Round(time.Second), in.Policy.WatchdogTimeout, in.Policy.margin())}
		}
		return GateDecision{Mode: FencingWatchdog, Recheck: wait - leaseAge,
			By: fmt.Sprintf("watchdog: the kubelet Lease to be %s old (now %s), or the out-of-service taint, or a node.fenced event", wait, leaseAge.Round(time.Second))}
	default:
		return GateDecision{Mode: FencingTaint, By: "the out-of-service taint on the node or a node.fenced event"}
	}
}

// Platforms of a VM.
const (
	PlatformKubeVirt  = "kubevirt"
	PlatformDeckhouse = "deckhouse"
)

// VM is one VM that ran on the failed node.
type VM struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Platform  string `json:"platform"`
	// UID is the VMI's UID at the failure (KubeVirt), or the
	// VirtualMachine's (Deckhouse).
	UID string `json:"uid,omitempty"`
	// RunPolicy is the run strategy (KubeVirt) or run policy (Deckhouse).
	RunPolicy string `json:"runPolicy"`
	Restarts  bool   `json:"restarts"`
	Priority  int    `json:"priority,omitempty"`
	// CPU (millicores) and Memory (bytes) its launcher pod requests.
	CPU          int64               `json:"cpu,omitempty"`
	Memory       int64               `json:"memory,omitempty"`
	NodeSelector map[string]string   `json:"nodeSelector,omitempty"`
	Tolerations  []corev1.Toleration `json:"tolerations,omitempty"`
}

// Key is namespace/name.
func (v VM) Key() string { return v.Namespace + "/" + v.Name }

// Restarts reports whether a VM with this run strategy (KubeVirt) or run
// policy (Deckhouse) is started again when it fails.
func Restarts(platform, policy string) bool {
	switch platform {
	case PlatformDeckhouse:
		return policy == "AlwaysOn" || policy == "AlwaysOnUnlessStoppedManually" || policy == ""
	default:
		return policy == "Always" || policy == "RerunOnFailure"
	}
}

// NodeRoom is the room a node has for VMs.
type NodeRoom struct {
	Name   string
	CPU    int64 // free millicores
	Memory int64 // free bytes
	Labels map[string]string
	Taints []corev1.Taint
}

func (r NodeRoom) admits(v VM) bool {
	if v.CPU > r.CPU || v.Memory > r.Memory {
		return false
	}
	if !labels.SelectorFromSet(v.NodeSelector).Matches(labels.Set(r.Labels)) {
		return false
	}
	for i := range r.Taints {
		t := &r.Taints[i]
		if t.Effect != corev1.TaintEffectNoSchedule && t.Effect != corev1.TaintEffectNoExecute {
			continue
		}
		tolerated := false
		for j := range v.Tolerations {
			if v.Tolerations[j].ToleratesTaint(t) {
				tolerated = true
				break
			}
		}
		if !tolerated {
			return false
		}
	}
	return true
}

// RestartPlan says which of a failed node's VMs restart where there is room.
type RestartPlan struct {
	// Fit are the restartable VMs the other nodes can hold, highest
	// priority first: released first.
	Fit []VM
	// NoRoom are the restartable VMs that do not fit (lowest priorities).
	NoRoom []VM
	// Stay are the VMs whose run policy does not restart them.
	Stay []VM
}

// Short reports whether some restartable VM has no room.
func (p RestartPlan) Short() bool { return len(p.NoRoom) > 0 }

// PlanRestarts places the restartable VMs on the rooms, highest
// restart priority first (then larger first, then by name), each on the
// room with the most free memory that admits it, as the scheduler spreads
// them.
func PlanRestarts(vms []VM, rooms []NodeRoom) RestartPlan {
	var plan RestartPlan
	var want []VM
	for _, v := range vms {
		if v.Restarts {
			want = append(want, v)
		} else {
			plan.Stay = append(plan.Stay, v)
		}
	}
	sort.SliceStable(want, func(i, j int) bool {
		a, b := want[i], want[j]
		if a.Priority != b.Priority {
			return a.Priority > b.Priority
		}
		if a.Memory != b.Memory {
			return a.Memory > b.Memory
		}
		return a.Key() < b.Key()
	})
	free := append([]NodeRoom(nil), rooms...)
	for _, v := range want {
		best := -1
		for i := range free {
			if free[i].admits(v) && (best < 0 || free[i].Memory > free[best].Memory) {
				best = i
			}
		}
		if best < 0 {
			plan.NoRoom = append(plan.NoRoom, v)
			continue
		}
		free[best].CPU -= v.CPU
		free[best].Memory -= v.Memory
		plan.Fit = append(plan.Fit, v)
	}
	return plan
}

// NodeLoad is a healthy node as the failover capacity sees it: its
// allocatable memory (what makes it large), the room it has left, and the
// restartable VMs it runs.
type NodeLoad struct {
	Room        NodeRoom
	Allocatable int64
	VMs         []VM
}

// FailoverCapacity is how many of the largest nodes could fail now with
// every restartable VM still fitting on the others: 0 when even the largest
// node's VMs would not all restart.
func FailoverCapacity(nodes []NodeLoad) int {
	sorted := append([]NodeLoad(nil), nodes...)
	sort.SliceStable(sorted, func(i, j int) bool {
		if sorted[i].Allocatable != sorted[j].Allocatable {
			return sorted[i].Allocatable > sorted[j].Allocatable
		}
		return sorted[i].Room.Name < sorted[j].Room.Name
	})
	k := 0
	for k < len(sorted)-1 {
		var vms []VM
		for _, n := range sorted[:k+1] {
			vms = append(vms, n.VMs...)
		}
		var rooms []NodeRoom
		for _, n := range sorted[k+1:] {
			rooms = append(rooms, n.Room)
		}
		if PlanRestarts(vms, rooms).Short() {
			break
		}
		k++
	}
	return k
}

func vmNames(vms []VM) string {
	names := make([]string, 0, len(vms))
	for _, v := range vms {
		names = append(names, v.Key())
	}
	return strings.Join(names, ", ")
}
