package maintenance

import (
	"fmt"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	schedhelper "k8s.io/component-helpers/scheduling/corev1"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"

	"github.com/drover-io/drover/schemas"
)

// LabelStrategy is the VM label that says what a maintenance does with a VM
// (Harvester's maintain-mode-strategy, drover's spelling): StrategyMigrate
// (the default), StrategyShutdown or StrategyShutdownAndRestartAfter.
const LabelStrategy = "drover.io/maintenance-strategy"

// Values of LabelStrategy.
const (
	StrategyMigrate                 = "Migrate"
	StrategyShutdown                = "Shutdown"
	StrategyShutdownAndRestartAfter = "ShutdownAndRestartAfter"
)

// KubeVirt's eviction strategies (spec.evictionStrategy of a VMI, or the
// cluster-wide default of the KubeVirt CR).
const (
	EvictionNone                  = "None"
	EvictionLiveMigrate           = "LiveMigrate"
	EvictionLiveMigrateIfPossible = "LiveMigrateIfPossible"
	EvictionExternal              = "External"
)

// Action is what the plan does with one VM.
type Action string

// Actions of a plan.
const (
	// ActionMigrate live-migrates the VM to another node.
	ActionMigrate Action = "Migrate"
	// ActionRestart shuts the VM down; its run strategy starts it on another node.
	ActionRestart Action = "Restart"
	// ActionShutdown shuts the VM down; it stays down (reported).
	ActionShutdown Action = "Shutdown"
	// ActionShutdownRestartAfter shuts the VM down; drover starts it again
	// when the maintenance ends.
	ActionShutdownRestartAfter Action = "ShutdownAndRestartAfter"
	// ActionBlocked: the VM cannot leave the node as its strategies ask; the
	// request is rejected unless forced.
	ActionBlocked Action = "Blocked"
	// ActionNone: the VM does not run on the node; nothing to do.
	ActionNone Action = "None"
)

// KeepsRunning reports whether a VM with this action must find room on
// another node.
func (a Action) KeepsRunning() bool { return a == ActionMigrate || a == ActionRestart }

// Resources are what a pod requests or a node offers.
type Resources struct {
	CPUMilli    int64 `json:"cpuMilli"`
	MemoryBytes int64 `json:"memoryBytes"`
	Pods        int64 `json:"pods"`
}

func (r Resources) plus(o Resources) Resources {
	return Resources{r.CPUMilli + o.CPUMilli, r.MemoryBytes + o.MemoryBytes, r.Pods + o.Pods}
}

// fits says why need does not fit into free, "" when it does.
func (r Resources) fits(need Resources) string {
	switch {
	case need.Pods > r.Pods:
		return "Too many pods"
	case need.CPUMilli > r.CPUMilli:
		return fmt.Sprintf("Insufficient cpu (needs %dm, %dm free)", need.CPUMilli, r.CPUMilli)
	case need.MemoryBytes > r.MemoryBytes:
		return fmt.Sprintf("Insufficient memory (needs %s, %s free)", bytesText(need.MemoryBytes), bytesText(r.MemoryBytes))
	}
	return ""
}

// Placement is what constrains where a VM's pod may run.
type Placement struct {
	NodeSelector map[string]string   `json:"nodeSelector,omitempty"`
	Affinity     *corev1.Affinity    `json:"affinity,omitempty"`
	Tolerations  []corev1.Toleration `json:"tolerations,omitempty"`
}

// VM is one VM as the plan sees it.
type VM struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	// Running: the VM runs (a VMI in phase Running) on the node.
	Running bool `json:"running"`
	// GuestMemory is what a live migration transfers.
	GuestMemory int64 `json:"guestMemory"`
	// Requests are the launcher pod's requests: what another node must hold.
	Requests   Resources `json:"requests"`
	Migratable bool      `json:"migratable"`
	// NotMigratableReason is KubeVirt's LiveMigratable condition message.
	NotMigratableReason string `json:"notMigratableReason,omitempty"`
	// EvictionStrategy is the VMI's own, "" for the cluster's default.
	EvictionStrategy string `json:"evictionStrategy,omitempty"`
	// RunStrategy is KubeVirt's spec.runStrategy or Deckhouse's spec.runPolicy.
	RunStrategy string `json:"runStrategy"`
	// Strategy is the value of LabelStrategy, "" when unset.
	Strategy  string    `json:"strategy,omitempty"`
	Placement Placement `json:"placement"`
	// Target is the node a migration of the VM in flight already holds a
	// pod on: its room is taken there already.
	Target string `json:"target,omitempty"`
	// LastMigrationFailed is why the VM's last migration failed ("" when it
	// did not): such a VM is migrated after the others, so that a guest that
	// may not converge does not hold a slot they could use.
	LastMigrationFailed string `json:"lastMigrationFailed,omitempty"`
}

// Key is namespace/name.
func (v VM) Key() string { return v.Namespace + "/" + v.Name }

// Node is another node of the cluster as the plan sees it.
type Node struct {
	Name          string            `json:"name"`
	Labels        map[string]string `json:"labels,omitempty"`
	Taints        []corev1.Taint    `json:"taints,omitempty"`
	Unschedulable bool              `json:"unschedulable,omitempty"`
	Ready         bool              `json:"ready"`
	Allocatable   Resources         `json:"allocatable"`
	// Used is what the pods bound to it request.
	Used Resources `json:"used"`
	// Maintenance names the drover maintenance that has the node, "" for none.
	Maintenance string `json:"maintenance,omitempty"`
}

// Limits are the cluster's migration limits (KubeVirt CR
// spec.configuration.migrations, or Deckhouse's settings).
type Limits struct {
	PerCluster int `json:"parallelMigrationsPerCluster"`
	PerNode    int `json:"parallelOutboundMigrationsPerNode"`
}

// Model turns a guest's memory into an expected migration time: a fixed
// overhead (target pod, preparation, hand-off) plus the transfer at the
// configured bandwidth, scaled by what drover measured on this cluster
// (Correction: measured over predicted, 1 when nothing was measured).
type Model struct {
	Bandwidth   int64         `json:"bandwidth"`
	Overhead    time.Duration `json:"overhead"`
	Correction  float64       `json:"correction"`
	RestartTime time.Duration `json:"restartTime"`
	Samples     int           `json:"samples"`
}

// MigrationTime is the expected duration of a live migration of a guest
// with mem bytes of memory.
func (m Model) MigrationTime(mem int64) time.Duration {
	bw := m.Bandwidth
	if bw <= 0 {
		bw = 1 << 30
	}
	c := m.Correction
	if c <= 0 {
		c = 1
	}
	transfer := time.Duration(float64(mem) / float64(bw) * float64(time.Second))
	return time.Duration(float64(m.Overhead+transfer) * c)
}

// restartTime is the expected time to shut a VM down and see it run elsewhere.
func (m Model) restartTime() time.Duration {
	c := m.Correction
	if c <= 0 {
		c = 1
	}
	return time.Duration(float64(m.RestartTime) * c)
}

// Input is everything the plan looks at.
type Input struct {
	Node string
	// Mode is schemas.ModeLiveMigrate or schemas.ModeEvict.
	Mode  string
	Force bool
	// VMs are the VMs whose VMIs are on the node.
	VMs []VM
	// Others are the other nodes.
	Others []Node
	// Displaced are the VMs of other nodes in maintenance that have not left
	// them yet: they need room too, and get it first.
	Displaced []VM
	Limits    Limits
	// InFlightCluster and InFlightNode count the unfinished migrations this
	// plan does not own: in the cluster, and from this node.
	InFlightCluster int
	InFlightNode    int
	// ClusterEvictionStrategy is the KubeVirt CR's default ("" is None).
	ClusterEvictionStrategy string
	Model                   Model
}

// Step is the plan for one VM.
type Step struct {
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Action    Action `json:"action"`
	// Reason says why this action, or why the VM is blocked.
	Reason string `json:"reason"`
	// Expected is how long the action should take once started.
	Expected time.Duration `json:"expected"`
	// Room is the node the capacity check found for a VM that keeps
	// running ("" when it found none); the scheduler decides in the end.
	Room        string `json:"room,omitempty"`
	GuestMemory int64  `json:"guestMemory"`
	RunStrategy string `json:"runStrategy,omitempty"`
	// Doubtful: its last migration failed; it goes after the others.
	Doubtful bool `json:"doubtful,omitempty"`
}

// Key is namespace/name.
func (s Step) Key() string { return s.Namespace + "/" + s.Name }

// Verdict is the capacity verdict: whether every VM that must keep running
// fits on the nodes that remain schedulable.
type Verdict struct {
	OK bool `json:"ok"`
	// NoRoom maps the VMs that fit nowhere to why.
	NoRoom map[string]string `json:"noRoom,omitempty"`
	// Schedulable are the nodes considered.
	Schedulable []string `json:"schedulable,omitempty"`
	placed      map[string]string
}

// Plan is the outcome of Make: what to do with each VM, in order, whether it
// may start, and how long it should take.
type Plan struct {
	Node  string `json:"node"`
	Mode  string `json:"mode"`
	Force bool   `json:"force,omitempty"`
	// Steps in execution order: migrations longest first (so the node empties
	// as early as the limits allow), then restarts and shutdowns, then VMs
	// with nothing to do.
	Steps    []Step  `json:"steps"`
	Capacity Verdict `json:"capacity"`
	// Slots is how many migrations may run at once for this node now.
	Slots int `json:"slots"`
	// Estimate is the expected makespan; LowerBound is max(longest single
	// migration, total migration time / the per-node outbound limit).
	Estimate   time.Duration `json:"estimate"`
	LowerBound time.Duration `json:"lowerBound"`
	// Rejected says why the request must not start ("" when it may).
	Rejected string `json:"rejected,omitempty"`
	Limits   Limits `json:"limits"`
	Model    Model  `json:"model"`
}

// Count returns how many steps have action a.
func (p Plan) Count(a Action) int {
	n := 0
	for _, s := range p.Steps {
		if s.Action == a {
			n++
		}
	}
	return n
}

// Step returns the step of VM key.
func (p Plan) Step(key string) (Step, bool) {
	for _, s := range p.Steps {
		if s.Key() == key {
			return s, true
		}
	}
	return Step{}, false
}

// Blocked lists the blocked steps as "ns/name: reason".
func (p Plan) Blocked() []string {
	var out []string
	for _, s := range p.Steps {
		if s.Action == ActionBlocked {
			out = append(out, s.Key()+": "+s.Reason)
		}
	}
	return out
}

// Summary is one line about the plan.
func (p Plan) Summary() string {
	parts := []string{}
	for _, a := range []Action{ActionMigrate, ActionRestart, ActionShutdownRestartAfter, ActionShutdown, ActionBlocked} {
		if n := p.Count(a); n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, strings.ToLower(string(a))))
		}
	}
	if len(parts) == 0 {
		parts = append(parts, "no VM to move")
	}
	s := fmt.Sprintf("plan for %s (%s): %s; %d at a time; estimate %s, lower bound %s",
		p.Node, p.Mode, strings.Join(parts, ", "), p.Slots, roundDur(p.Estimate), roundDur(p.LowerBound))
	if !p.Capacity.OK {
		s += fmt.Sprintf("; %d VMs do not fit", len(p.Capacity.NoRoom))
	}
	return s
}

// Text is the plan as a table for people (the CLI prints it for a dry run).
func (p Plan) Text() string {
	var b strings.Builder
	fmt.Fprintln(&b, p.Summary())
	for i, s := range p.Steps {
		exp := ""
		if s.Expected > 0 {
			exp = "~" + roundDur(s.Expected).String()
		}
		room := ""
		if s.Room != "" {
			room = "-> " + s.Room
		}
		fmt.Fprintf(&b, "  %2d. %-28s %-24s %-8s %-12s %s\n", i+1, s.Key(), s.Action, exp, room, s.Reason)
	}
	if !p.Capacity.OK {
		keys := make([]string, 0, len(p.Capacity.NoRoom))
		for k := range p.Capacity.NoRoom {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Fprintf(&b, "  no room for %s: %s\n", k, p.Capacity.NoRoom[k])
		}
	}
	if p.Rejected != "" {
		fmt.Fprintf(&b, "  rejected: %s\n", p.Rejected)
	}
	return b.String()
}

// restartable reports whether a run strategy (KubeVirt) or run policy
// (Deckhouse) starts a VM again once it was shut down by someone else.
func restartable(runStrategy string) bool {
	switch runStrategy {
	case "Always", "RerunOnFailure", "AlwaysOn", "AlwaysOnUnlessStoppedManually":
		return true
	}
	return false
}

// decide picks one VM's action and says why.
func decide(vm VM, in Input) (Action, string) {
	if !vm.Running {
		return ActionNone, "not running"
	}
	restartOr := func(why string) (Action, string) {
		if restartable(vm.RunStrategy) {
			return ActionRestart, why + "; run strategy " + vm.RunStrategy + " starts it elsewhere"
		}
		return ActionShutdown, why + "; run strategy " + orDash(vm.RunStrategy) + " does not start it again"
	}
	switch vm.Strategy {
	case "", StrategyMigrate:
	case StrategyShutdown:
		return ActionShutdown, "label " + LabelStrategy + "=" + StrategyShutdown
	case StrategyShutdownAndRestartAfter:
		return ActionShutdownRestartAfter, "label " + LabelStrategy + "=" + StrategyShutdownAndRestartAfter
	default:
		return ActionBlocked, fmt.Sprintf("label %s has unknown value %q (want %s, %s or %s)",
			LabelStrategy, vm.Strategy, StrategyMigrate, StrategyShutdown, StrategyShutdownAndRestartAfter)
	}
	if in.Mode == schemas.ModeEvict {
		return restartOr("mode Evict")
	}
	strategy := vm.EvictionStrategy
	if strategy == "" {
		strategy = in.ClusterEvictionStrategy
	}
	if strategy == "" {
		strategy = EvictionNone
	}
	notMigratable := "not live-migratable"
	if vm.NotMigratableReason != "" {
		notMigratable += ": " + vm.NotMigratableReason
	}
	switch strategy {
	case EvictionLiveMigrate, EvictionExternal:
		if vm.Migratable {
			return ActionMigrate, "eviction strategy " + strategy
		}
		return ActionBlocked, "eviction strategy " + strategy + " but " + notMigratable
	case EvictionLiveMigrateIfPossible:
		if vm.Migratable {
			return ActionMigrate, "eviction strategy " + strategy
		}
		return restartOr("eviction strategy " + strategy + ", " + notMigratable)
	case EvictionNone:
		return restartOr("eviction strategy None")
	default:
		return ActionBlocked, fmt.Sprintf("unknown eviction strategy %q", strategy)
	}
}

// Make plans the maintenance of in.Node. It is a pure function of its input.
func Make(in Input) Plan {
	p := Plan{Node: in.Node, Mode: in.Mode, Force: in.Force, Limits: in.Limits, Model: in.Model}
	if p.Mode == "" {
		p.Mode = schemas.ModeLiveMigrate
	}
	vms := append([]VM(nil), in.VMs...)
	sort.Slice(vms, func(i, j int) bool { return vms[i].Key() < vms[j].Key() })
	var blocked []string
	byKey := map[string]VM{}
	for _, vm := range vms {
		byKey[vm.Key()] = vm
		a, why := decide(vm, in)
		if a == ActionBlocked {
			blocked = append(blocked, vm.Key()+": "+why)
			if in.Force {
				if restartable(vm.RunStrategy) {
					a, why = ActionRestart, "forced ("+why+"); run strategy "+vm.RunStrategy+" starts it elsewhere"
				} else {
					a, why = ActionShutdown, "forced ("+why+"); run strategy "+orDash(vm.RunStrategy)+" does not start it again"
				}
			}
		}
		st := Step{Namespace: vm.Namespace, Name: vm.Name, Action: a, Reason: why, GuestMemory: vm.GuestMemory, RunStrategy: vm.RunStrategy}
		switch a {
		case ActionMigrate:
			st.Expected = in.Model.MigrationTime(vm.GuestMemory)
			if vm.LastMigrationFailed != "" {
				st.Doubtful = true
				st.Reason += "; its last migration failed (" + vm.LastMigrationFailed + "): after the others"
			}
		case ActionRestart, ActionShutdown, ActionShutdownRestartAfter:
			st.Expected = in.Model.restartTime()
		}
		p.Steps = append(p.Steps, st)
	}
	rank := map[Action]int{ActionMigrate: 0, ActionRestart: 1, ActionShutdownRestartAfter: 2, ActionShutdown: 3, ActionBlocked: 4, ActionNone: 5}
	sort.SliceStable(p.Steps, func(i, j int) bool {
		a, b := p.Steps[i], p.Steps[j]
		if rank[a.Action] != rank[b.Action] {
			return rank[a.Action] < rank[b.Action]
		}
		if a.Doubtful != b.Doubtful {
			return !a.Doubtful
		}
		if a.Expected != b.Expected {
			return a.Expected > b.Expected
		}
		return a.Key() < b.Key()
	})

	p.Capacity = capacity(in, p.Steps, byKey)
	for i := range p.Steps {
		if room, ok := p.Capacity.placed[p.Steps[i].Key()]; ok {
			p.Steps[i].Room = room
		}
	}
	p.Capacity.placed = nil

	p.Slots, p.Estimate, p.LowerBound = schedule(in, p.Steps)

	var why []string
	if len(blocked) > 0 && !in.Force {
		why = append(why, fmt.Sprintf("%d VMs cannot leave the node: %s", len(blocked), strings.Join(blocked, "; ")))
	}
	if !p.Capacity.OK && !in.Force {
		keys := make([]string, 0, len(p.Capacity.NoRoom))
		for k := range p.Capacity.NoRoom {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		items := make([]string, 0, len(keys))
		for _, k := range keys {
			items = append(items, k+": "+p.Capacity.NoRoom[k])
		}
		why = append(why, fmt.Sprintf("not enough room on the schedulable nodes for %d VMs: %s", len(keys), strings.Join(items, "; ")))
	}
	p.Rejected = strings.Join(why, "; ")
	return p
}

// capacity places every VM that must keep running (and first the displaced
// VMs of other nodes in maintenance) on the other schedulable nodes, largest
// first, first fit, as a scheduler honouring cordon, taints, selectors,
// required node affinity and requests would.
func capacity(in Input, steps []Step, byKey map[string]VM) Verdict {
	type bin struct {
		node *corev1.Node
		free Resources
	}
	var bins []*bin
	v := Verdict{OK: true, placed: map[string]string{}}
	for _, n := range in.Others {
		if n.Name == in.Node || n.Unschedulable || !n.Ready || n.Maintenance != "" {
			continue
		}
		free := Resources{n.Allocatable.CPUMilli - n.Used.CPUMilli, n.Allocatable.MemoryBytes - n.Used.MemoryBytes, n.Allocatable.Pods - n.Used.Pods}
		bins = append(bins, &bin{node: &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: n.Labels}, Spec: corev1.NodeSpec{Taints: n.Taints}}, free: free})
		v.Schedulable = append(v.Schedulable, n.Name)
	}
	sort.Strings(v.Schedulable)
	sort.Slice(bins, func(i, j int) bool { return bins[i].node.Name < bins[j].node.Name })

	var need []VM
	displaced := append([]VM(nil), in.Displaced...)
	sortLargest(displaced)
	need = append(need, displaced...)
	var ours []VM
	for _, s := range steps {
		if s.Action.KeepsRunning() {
			ours = append(ours, byKey[s.Key()])
		}
	}
	sortLargest(ours)
	need = append(need, ours...)
	mine := map[string]bool{}
	for _, vm := range ours {
		mine[vm.Key()] = true
	}
	for _, vm := range need {
		if vm.Target != "" {
			if mine[vm.Key()] {
				v.placed[vm.Key()] = vm.Target
			}
			continue // its migration's target pod holds its room
		}
		pod := &corev1.Pod{Spec: corev1.PodSpec{NodeSelector: vm.Placement.NodeSelector, Affinity: vm.Placement.Affinity, Tolerations: vm.Placement.Tolerations}}
		req := vm.Requests
		if req.Pods == 0 {
			req.Pods = 1
		}
		reasons := map[string]int{}
		placed := false
		for _, b := range bins {
			if why := fitsNode(pod, b.node, b.free, req); why != "" {
				reasons[why]++
				continue
			}
			b.free = Resources{b.free.CPUMilli - req.CPUMilli, b.free.MemoryBytes - req.MemoryBytes, b.free.Pods - req.Pods}
			if mine[vm.Key()] {
				v.placed[vm.Key()] = b.node.Name
			}
			placed = true
			break
		}
		if placed || !mine[vm.Key()] {
			continue
		}
		v.OK = false
		if v.NoRoom == nil {
			v.NoRoom = map[string]string{}
		}
		v.NoRoom[vm.Key()] = noRoomText(len(bins), reasons)
	}
	return v
}

func sortLargest(vms []VM) {
	sort.SliceStable(vms, func(i, j int) bool {
		if vms[i].Requests.MemoryBytes != vms[j].Requests.MemoryBytes {
			return vms[i].Requests.MemoryBytes > vms[j].Requests.MemoryBytes
		}
		if vms[i].Requests.CPUMilli != vms[j].Requests.CPUMilli {
			return vms[i].Requests.CPUMilli > vms[j].Requests.CPUMilli
		}
		return vms[i].Key() < vms[j].Key()
	})
}

func noRoomText(nodes int, reasons map[string]int) string {
	if nodes == 0 {
		return "no other node is schedulable"
	}
	keys := make([]string, 0, len(reasons))
	for k := range reasons {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%d %s", reasons[k], k))
	}
	return fmt.Sprintf("0/%d nodes available: %s", nodes, strings.Join(parts, ", "))
}

// fitsNode says why pod (with requests req) cannot go to node n with free
// resources, "" when it fits.
func fitsNode(pod *corev1.Pod, n *corev1.Node, free, req Resources) string {
	if t, bad := schedhelper.FindMatchingUntoleratedTaint(n.Spec.Taints, pod.Spec.Tolerations, func(t *corev1.Taint) bool {
		return t.Effect == corev1.TaintEffectNoSchedule || t.Effect == corev1.TaintEffectNoExecute
	}); bad {
		return fmt.Sprintf("untolerated taint %s", t.Key)
	}
	if ok, err := nodeaffinity.GetRequiredNodeAffinity(pod).Match(n); err != nil || !ok {
		return "node selector or affinity mismatch"
	}
	if why := free.fits(req); why != "" {
		// Name the resource only: the amounts differ per node.
		return strings.SplitN(why, " (", 2)[0]
	}
	return ""
}

// schedule estimates the makespan: migrations in plan order on the free
// migration slots (each starts when a slot frees up: list scheduling, which
// with the longest-first order is LPT), restarts and shutdowns at once
// beside them. It returns the slots, the estimate and the lower bound
// max(longest migration, total migration time / per-node limit).
func schedule(in Input, steps []Step) (int, time.Duration, time.Duration) {
	perNode, perCluster := in.Limits.PerNode, in.Limits.PerCluster
	if perNode <= 0 {
		perNode = 2
	}
	if perCluster <= 0 {
		perCluster = 5
	}
	slots := min(perNode-in.InFlightNode, perCluster-in.InFlightCluster)
	slots = max(slots, 1)
	var durations []time.Duration
	var others time.Duration
	for _, s := range steps {
		switch {
		case s.Action == ActionMigrate:
			durations = append(durations, s.Expected)
		case s.Action == ActionRestart || s.Action == ActionShutdown || s.Action == ActionShutdownRestartAfter:
			others = max(others, s.Expected)
		}
	}
	free := make([]time.Duration, slots)
	var total, longest time.Duration
	for _, d := range durations {
		i := 0
		for j := range free {
			if free[j] < free[i] {
				i = j
			}
		}
		free[i] += d
		total += d
		longest = max(longest, d)
	}
	var makespan time.Duration
	for _, f := range free {
		makespan = max(makespan, f)
	}
	bound := max(longest, total/time.Duration(min(perNode, perCluster)))
	return slots, max(makespan, others), max(bound, others)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func roundDur(d time.Duration) time.Duration {
	switch {
	case d >= time.Minute:
		return d.Round(time.Second)
	case d >= time.Second:
		return d.Round(100 * time.Millisecond)
	default:
		return d.Round(time.Millisecond)
	}
}

func bytesText(b int64) string {
	switch {
	case b >= 1<<30 && b%(1<<30) == 0:
		return fmt.Sprintf("%dGi", b>>30)
	case b >= 1<<30:
		return fmt.Sprintf("%.1fGi", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%dMi", b>>20)
	default:
		return fmt.Sprintf("%d", b)
	}
}
