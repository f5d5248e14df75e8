package sim

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/clock"
)

// Guest is one running guest (a QEMU process) as the simulator knows it,
// whatever the API says.
type Guest struct {
	// VMI is namespace/name of the VirtualMachineInstance the guest belongs to.
	VMI string
	// Node is where the guest runs.
	Node string
	// Pod is namespace/name of the virt-launcher pod that hosts it.
	Pod string
	// PodUID identifies that pod.
	PodUID types.UID
	// RWOVolumes are the ReadWriteOnce claims (namespace/name) the guest writes to.
	RWOVolumes []string
	// Since is when the guest started on Node.
	Since time.Time
	// Planted marks a guest added by PlantGuest.
	Planted bool
}

// NodeState is the ground truth of a node.
type NodeState string

// Node states.
const (
	NodeHealthy     NodeState = "Healthy"     // kubelet and guests run
	NodeDown        NodeState = "Down"        // powered off: guests dead, kubelet silent
	NodePartitioned NodeState = "Partitioned" // cut off from the API: guests run, kubelet silent
	NodeFenced      NodeState = "Fenced"      // partitioned and rebooted by its watchdog: guests dead
	NodeRebooting   NodeState = "Rebooting"   // off during a reboot
	NodeBooting     NodeState = "Booting"     // kubelet up, reporting NotReady
)

// Snapshot is the ground truth at one moment.
type Snapshot struct {
	At time.Time
	// Guests lists every running guest, sorted by VMI then node.
	Guests []Guest
	// Volumes maps each RWO claim (namespace/name) in use by a running guest
	// to the nodes it is attached to and written from.
	Volumes map[string][]string
	// Nodes is the state of every node the simulator manages.
	Nodes map[string]NodeState
}

// GuestNodes returns the nodes where the guest of VMI key (namespace/name) runs.
func (s Snapshot) GuestNodes(vmi string) []string {
	var out []string
	for _, g := range s.Guests {
		if g.VMI == vmi {
			out = append(out, g.Node)
		}
	}
	return out
}

// ViolationKind names an invariant.
type ViolationKind string

// Invariants the checker enforces.
const (
	// DoubleRun: one VM's guest runs in two places at once.
	DoubleRun ViolationKind = "DoubleRun"
	// RWOMultiAttach: a ReadWriteOnce volume is written from two nodes (two
	// running guests), or has VolumeAttachments for two nodes.
	RWOMultiAttach ViolationKind = "RWOMultiAttach"
)

// Violation is one invariant broken at one moment.
type Violation struct {
	At      time.Time
	Kind    ViolationKind
	Subject string   // the VMI or the claim, namespace/name (the PV's name for a volume without a claim)
	Nodes   []string // where it runs / is attached
	Pods    []string // the guests' pods (none when only VolumeAttachments show it)
}

func (v Violation) String() string {
	return fmt.Sprintf("%s %s on nodes %v (pods %v) at %s", v.Kind, v.Subject, v.Nodes, v.Pods, v.At.Format(time.RFC3339Nano))
}

// ErrInvariant is wrapped by the error Check returns.
var ErrInvariant = errors.New("sim: invariant violated")

// truth holds the guests. Every mutation checks the invariants at once, so a
// double run that lasts a microsecond is still recorded.
type truth struct {
	clock      clock.Clock
	mu         sync.Mutex
	guests     map[types.UID]*Guest
	ranIn      map[types.UID]bool // pods that ever hosted a guest
	violations []Violation
	open       map[string]bool // violations currently ongoing, recorded once per episode
	planted    int
	listeners  []func(Violation)
	// attached maps each RWO volume with VolumeAttachments (claim
	// namespace/name) to their nodes, as last observed in the API.
	attached map[string][]string
}

func newTruth(c clock.Clock) *truth {
	return &truth{clock: c, guests: map[types.UID]*Guest{}, ranIn: map[types.UID]bool{}, open: map[string]bool{}, attached: map[string][]string{}}
}

// observeAttachments replaces what the checker knows of the RWO volumes'
// VolumeAttachments with what list returns (volume -> nodes) and records
// any violation that begins. list runs under the lock, so observations
// apply in the order they were made.
func (t *truth) observeAttachments(list func() map[string][]string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.attached = list()
	t.checkLocked()
}

// start records a guest starting in pod; it is a no-op if that pod already
// runs it.
func (t *truth) start(g Guest) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.guests[g.PodUID]; ok {
		return
	}
	if g.Since.IsZero() {
		g.Since = t.clock.Now()
	}
	t.guests[g.PodUID] = &g
	t.ranIn[g.PodUID] = true
	t.checkLocked()
}

// stop records the guest in pod uid ending. It reports whether one ran.
func (t *truth) stop(uid types.UID) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.guests[uid]
	delete(t.guests, uid)
	t.checkLocked()
	return ok
}

// move hands the guest over from one pod to another in one step, as a
// completed live migration does.
func (t *truth) move(from types.UID, to Guest) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	old, ok := t.guests[from]
	if !ok || from == to.PodUID {
		return false
	}
	delete(t.guests, from)
	to.Since = t.clock.Now()
	if to.RWOVolumes == nil {
		to.RWOVolumes = old.RWOVolumes
	}
	t.guests[to.PodUID] = &to
	t.ranIn[to.PodUID] = true
	t.checkLocked()
	return true
}

// ran reports whether pod uid ever hosted a guest.
func (t *truth) ran(uid types.UID) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.ranIn[uid]
}

// killNode stops every guest on node and returns how many died.
func (t *truth) killNode(node string) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for uid, g := range t.guests {
		if g.Node == node && !g.Planted {
			delete(t.guests, uid)
			n++
		}
	}
	t.checkLocked()
	return n
}

func (t *truth) running(uid types.UID) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.guests[uid]
	return ok
}

func (t *truth) guestsOn(node string) []Guest {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Guest
	for _, g := range t.guests {
		if g.Node == node && !g.Planted {
			out = append(out, *g)
		}
	}
	return out
}

// checkLocked evaluates the invariants and records new violations.
func (t *truth) checkLocked() {
	now := t.clock.Now()
	current := t.currentLocked(now)
	seen := map[string]bool{}
	for _, v := range current {
		k := string(v.Kind) + "/" + v.Subject
		seen[k] = true
		if !t.open[k] {
			t.open[k] = true
			t.violations = append(t.violations, v)
			for _, l := range t.listeners {
				l(v)
			}
		}
	}
	for k := range t.open {
		if !seen[k] {
			delete(t.open, k)
		}
	}
}

func (t *truth) currentLocked(now time.Time) []Violation {
	byVMI := map[string][]*Guest{}
	byVol := map[string]map[string][]string{} // claim -> node -> pods
	for _, g := range t.guests {
		byVMI[g.VMI] = append(byVMI[g.VMI], g)
		for _, v := range g.RWOVolumes {
			if byVol[v] == nil {
				byVol[v] = map[string][]string{}
			}
			byVol[v][g.Node] = append(byVol[v][g.Node], g.Pod)
		}
	}
	var out []Violation
	for vmi, gs := range byVMI {
		if len(gs) < 2 {
			continue
		}
		v := Violation{At: now, Kind: DoubleRun, Subject: vmi}
		for _, g := range gs {
			v.Nodes = append(v.Nodes, g.Node)
			v.Pods = append(v.Pods, g.Pod)
		}
		sort.Strings(v.Nodes)
		sort.Strings(v.Pods)
		out = append(out, v)
	}
	vols := map[string]bool{}
	for claim := range byVol {
		vols[claim] = true
	}
	for claim := range t.attached {
		vols[claim] = true
	}
	for claim := range vols {
		written, attached := byVol[claim], t.attached[claim]
		if len(written) < 2 && len(attached) < 2 {
			continue
		}
		v := Violation{At: now, Kind: RWOMultiAttach, Subject: claim}
		nodes := map[string]bool{}
		if len(written) >= 2 {
			for n, pods := range written {
				nodes[n] = true
				v.Pods = append(v.Pods, pods...)
			}
		}
		if len(attached) >= 2 {
			for _, n := range attached {
				nodes[n] = true
			}
		}
		for n := range nodes {
			v.Nodes = append(v.Nodes, n)
		}
		sort.Strings(v.Nodes)
		sort.Strings(v.Pods)
		out = append(out, v)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Subject < out[j].Subject })
	return out
}

// Truth returns a snapshot of the ground truth.
func (s *Simulator) Truth() Snapshot {
	t := s.truth
	t.mu.Lock()
	snap := Snapshot{At: t.clock.Now(), Volumes: map[string][]string{}, Nodes: s.nodes.snapshot()}
	vols := map[string]map[string]bool{}
	for _, g := range t.guests {
		snap.Guests = append(snap.Guests, *g)
		for _, v := range g.RWOVolumes {
			if vols[v] == nil {
				vols[v] = map[string]bool{}
			}
			vols[v][g.Node] = true
		}
	}
	t.mu.Unlock()
	for v, nodes := range vols {
		for n := range nodes {
			snap.Volumes[v] = append(snap.Volumes[v], n)
		}
		sort.Strings(snap.Volumes[v])
	}
	sort.Slice(snap.Guests, func(i, j int) bool {
		if snap.Guests[i].VMI != snap.Guests[j].VMI {
			return snap.Guests[i].VMI < snap.Guests[j].VMI
		}
		return snap.Guests[i].Node < snap.Guests[j].Node
	})
	return snap
}

// Check evaluates the invariants now: the running guests and the
// VolumeAttachments the simulator's cache holds. It returns an error
// wrapping ErrInvariant that lists every current violation, or nil. A
// violation that has ended (a double run a healed partition ended) is no
// longer reported here: to know whether anything went wrong during a test,
// use Violations.
func (s *Simulator) Check() error {
	t := s.truth
	t.observeAttachments(s.rwoAttachments)
	t.mu.Lock()
	current := t.currentLocked(t.clock.Now())
	t.mu.Unlock()
	if len(current) == 0 {
		return nil
	}
	msgs := make([]string, 0, len(current))
	for _, v := range current {
		msgs = append(msgs, v.String())
	}
	return fmt.Errorf("%w: %s", ErrInvariant, strings.Join(msgs, "; "))
}

// Violations returns the history: every violation recorded since the
// simulator was built, including those that have since ended. Each is
// recorded once per episode, when it begins (every change of the ground
// truth checks the invariants, so one that lasts a microsecond is there).
// Tests assert on it: require.Empty(t, s.Violations()).
func (s *Simulator) Violations() []Violation {
	s.truth.mu.Lock()
	defer s.truth.mu.Unlock()
	return append([]Violation(nil), s.truth.violations...)
}

// OnViolation registers f to be called (synchronously, keep it short) when a
// violation begins.
func (s *Simulator) OnViolation(f func(Violation)) {
	s.truth.mu.Lock()
	defer s.truth.mu.Unlock()
	s.truth.listeners = append(s.truth.listeners, f)
}

// PlantGuest makes the ground truth believe a guest of VMI vmi
// (namespace/name) runs on node, with the given RWO claims, so that a test
// can check the checker. The returned func removes it.
func (s *Simulator) PlantGuest(vmi, node string, rwoClaims ...string) (remove func()) {
	t := s.truth
	t.mu.Lock()
	t.planted++
	uid := types.UID(fmt.Sprintf("planted-%d", t.planted))
	t.mu.Unlock()
	t.start(Guest{VMI: vmi, Node: node, Pod: "planted/" + string(uid), PodUID: uid, RWOVolumes: rwoClaims, Planted: true})
	return func() { t.stop(uid) }
}
