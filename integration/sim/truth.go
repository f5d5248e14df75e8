package sim

import (
	"errors"
	"fmt"
	"slices"
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
// double run that lasts a microsecond is still recorded. The guests are
// indexed by VMI, by RWO volume and by node, and a mutation checks only the
// VMIs and volumes it touches, so its cost does not grow with the cluster.
type truth struct {
	clock      clock.Clock
	mu         sync.Mutex
	guests     map[types.UID]*Guest
	byVMI      map[string]map[types.UID]*Guest // VMI -> its guests
	byVolume   map[string]map[types.UID]*Guest // RWO claim -> guests writing it
	byNode     map[string]map[types.UID]*Guest // node -> guests on it
	ranIn      map[types.UID]bool              // pods that ever hosted a guest
	violations []Violation
	open       map[string]bool // violations currently ongoing, recorded once per episode
	planted    int
	listeners  []func(Violation)
	// attached maps each RWO volume with VolumeAttachments (claim
	// namespace/name) to their nodes, as last observed in the API.
	attached map[string][]string
}

func newTruth(c clock.Clock) *truth {
	return &truth{
		clock: c, guests: map[types.UID]*Guest{}, ranIn: map[types.UID]bool{}, open: map[string]bool{}, attached: map[string][]string{},
		byVMI: map[string]map[types.UID]*Guest{}, byVolume: map[string]map[types.UID]*Guest{}, byNode: map[string]map[types.UID]*Guest{},
	}
}

// subjects collects the VMIs and volumes a mutation touched, to check.
type subjects struct{ vmis, volumes map[string]bool }

func newSubjects() subjects { return subjects{vmis: map[string]bool{}, volumes: map[string]bool{}} }

func (sj subjects) guest(g *Guest) {
	sj.vmis[g.VMI] = true
	for _, v := range g.RWOVolumes {
		sj.volumes[v] = true
	}
}

func addIndex(idx map[string]map[types.UID]*Guest, key string, g *Guest) {
	if idx[key] == nil {
		idx[key] = map[types.UID]*Guest{}
	}
	idx[key][g.PodUID] = g
}

func dropIndex(idx map[string]map[types.UID]*Guest, key string, uid types.UID) {
	delete(idx[key], uid)
	if len(idx[key]) == 0 {
		delete(idx, key)
	}
}

// addLocked records g and marks what it touches.
func (t *truth) addLocked(g *Guest, sj subjects) {
	t.guests[g.PodUID] = g
	addIndex(t.byVMI, g.VMI, g)
	addIndex(t.byNode, g.Node, g)
	for _, v := range g.RWOVolumes {
		addIndex(t.byVolume, v, g)
	}
	sj.guest(g)
}

// removeLocked forgets the guest of pod uid and marks what it touched; it
// reports whether there was one.
func (t *truth) removeLocked(uid types.UID, sj subjects) (*Guest, bool) {
	g, ok := t.guests[uid]
	if !ok {
		return nil, false
	}
	delete(t.guests, uid)
	dropIndex(t.byVMI, g.VMI, uid)
	dropIndex(t.byNode, g.Node, uid)
	for _, v := range g.RWOVolumes {
		dropIndex(t.byVolume, v, uid)
	}
	sj.guest(g)
	return g, true
}

// observeAttachments replaces what the checker knows of the RWO volumes'
// VolumeAttachments with what list returns (volume -> nodes) and records
// any violation that begins. list runs under the lock, so observations
// apply in the order they were made.
func (t *truth) observeAttachments(list func() map[string][]string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	sj := newSubjects()
	for v := range t.attached {
		sj.volumes[v] = true
	}
	t.attached = list()
	for v := range t.attached {
		sj.volumes[v] = true
	}
	t.checkLocked(sj)
}

// observeVolumes updates what the checker knows of some RWO volumes'
// VolumeAttachments: list returns them (volume -> nodes; no nodes: none)
// and runs under the lock, as in observeAttachments.
func (t *truth) observeVolumes(list func() map[string][]string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	sj := newSubjects()
	for v, nodes := range list() {
		if slices.Equal(t.attached[v], nodes) {
			continue
		}
		if len(nodes) == 0 {
			delete(t.attached, v)
		} else {
			t.attached[v] = nodes
		}
		sj.volumes[v] = true
	}
	t.checkLocked(sj)
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
	sj := newSubjects()
	t.addLocked(&g, sj)
	t.ranIn[g.PodUID] = true
	t.checkLocked(sj)
}

// stop records the guest in pod uid ending. It reports whether one ran.
func (t *truth) stop(uid types.UID) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	sj := newSubjects()
	_, ok := t.removeLocked(uid, sj)
	t.checkLocked(sj)
	return ok
}

// move hands the guest over from one pod to another in one step, as a
// completed live migration does.
func (t *truth) move(from types.UID, to Guest) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if from == to.PodUID {
		return false
	}
	sj := newSubjects()
	old, ok := t.removeLocked(from, sj)
	if !ok {
		return false
	}
	to.Since = t.clock.Now()
	if to.RWOVolumes == nil {
		to.RWOVolumes = old.RWOVolumes
	}
	t.removeLocked(to.PodUID, sj) // a guest already in the target pod is replaced
	t.addLocked(&to, sj)
	t.ranIn[to.PodUID] = true
	t.checkLocked(sj)
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
	sj := newSubjects()
	n := 0
	for uid, g := range t.byNode[node] {
		if !g.Planted {
			t.removeLocked(uid, sj)
			n++
		}
	}
	t.checkLocked(sj)
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
	for _, g := range t.byNode[node] {
		if !g.Planted {
			out = append(out, *g)
		}
	}
	return out
}

// checkLocked evaluates the invariants of the subjects sj names and records
// new violations.
func (t *truth) checkLocked(sj subjects) {
	now := t.clock.Now()
	var current []Violation
	for vmi := range sj.vmis {
		if v, ok := t.doubleRunLocked(vmi, now); ok {
			current = append(current, v)
		} else {
			delete(t.open, string(DoubleRun)+"/"+vmi)
		}
	}
	for vol := range sj.volumes {
		if v, ok := t.multiAttachLocked(vol, now); ok {
			current = append(current, v)
		} else {
			delete(t.open, string(RWOMultiAttach)+"/"+vol)
		}
	}
	sortViolations(current)
	for _, v := range current {
		k := string(v.Kind) + "/" + v.Subject
		if !t.open[k] {
			t.open[k] = true
			t.violations = append(t.violations, v)
			for _, l := range t.listeners {
				l(v)
			}
		}
	}
}

// doubleRunLocked: the guest of vmi runs in two places.
func (t *truth) doubleRunLocked(vmi string, now time.Time) (Violation, bool) {
	gs := t.byVMI[vmi]
	if len(gs) < 2 {
		return Violation{}, false
	}
	v := Violation{At: now, Kind: DoubleRun, Subject: vmi}
	for _, g := range gs {
		v.Nodes = append(v.Nodes, g.Node)
		v.Pods = append(v.Pods, g.Pod)
	}
	sort.Strings(v.Nodes)
	sort.Strings(v.Pods)
	return v, true
}

// multiAttachLocked: RWO volume claim is written from two nodes, or has
// VolumeAttachments for two.
func (t *truth) multiAttachLocked(claim string, now time.Time) (Violation, bool) {
	written := map[string][]string{} // node -> pods
	for _, g := range t.byVolume[claim] {
		written[g.Node] = append(written[g.Node], g.Pod)
	}
	attached := t.attached[claim]
	if len(written) < 2 && len(attached) < 2 {
		return Violation{}, false
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
	return v, true
}

// currentLocked evaluates every invariant.
func (t *truth) currentLocked(now time.Time) []Violation {
	var out []Violation
	for vmi := range t.byVMI {
		if v, ok := t.doubleRunLocked(vmi, now); ok {
			out = append(out, v)
		}
	}
	vols := map[string]bool{}
	for claim := range t.byVolume {
		vols[claim] = true
	}
	for claim := range t.attached {
		vols[claim] = true
	}
	for claim := range vols {
		if v, ok := t.multiAttachLocked(claim, now); ok {
			out = append(out, v)
		}
	}
	sortViolations(out)
	return out
}

func sortViolations(vs []Violation) {
	sort.Slice(vs, func(i, j int) bool {
		if vs[i].Subject != vs[j].Subject {
			return vs[i].Subject < vs[j].Subject
		}
		return vs[i].Kind < vs[j].Kind
	})
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
