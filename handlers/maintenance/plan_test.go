package maintenance

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"

	"github.com/drover-io/drover/schemas"
)

const gi = int64(1) << 30

// model: 10 s overhead, 1 GiB/s, so a guest of n GiB takes 10+n seconds.
var model = Model{Bandwidth: gi, Overhead: 10 * time.Second, Correction: 1, RestartTime: 20 * time.Second}

func vm(name string, memGi int64, edit ...func(*VM)) VM {
	v := VM{Namespace: "default", Name: name, Running: true, GuestMemory: memGi * gi,
		Requests: Resources{CPUMilli: 1000, MemoryBytes: memGi * gi, Pods: 1}, Migratable: true,
		EvictionStrategy: EvictionLiveMigrate, RunStrategy: "Always"}
	for _, e := range edit {
		e(&v)
	}
	return v
}

func node(name string, memGi int64, edit ...func(*Node)) Node {
	n := Node{Name: name, Ready: true, Labels: map[string]string{"kubernetes.io/hostname": name},
		Allocatable: Resources{CPUMilli: 32000, MemoryBytes: memGi * gi, Pods: 110}}
	for _, e := range edit {
		e(&n)
	}
	return n
}

func notMigratable(v *VM) {
	v.Migratable, v.NotMigratableReason = false, "PVC disk-1 is not shared, live migration requires that all PVCs must be shared (using ReadWriteMany access mode)"
}

func input(vms []VM, others ...Node) Input {
	if len(others) == 0 {
		others = []Node{node("node-2", 64), node("node-3", 64)}
	}
	return Input{Node: "node-1", Mode: schemas.ModeLiveMigrate, VMs: vms, Others: others,
		Limits: Limits{PerCluster: 5, PerNode: 2}, Model: model}
}

func actions(p Plan) map[string]Action {
	out := map[string]Action{}
	for _, s := range p.Steps {
		out[s.Name] = s.Action
	}
	return out
}

func TestPlanActions(t *testing.T) {
	tests := []struct {
		name         string
		in           Input
		want         map[string]Action
		wantRejected []string // substrings; none: not rejected
	}{
		{name: "live-migratable VMs migrate",
			in:   input([]VM{vm("a", 2), vm("b", 4)}),
			want: map[string]Action{"a": ActionMigrate, "b": ActionMigrate}},
		{name: "LiveMigrate but not migratable blocks the request with its name and reason",
			in:           input([]VM{vm("a", 2), vm("legacy", 2, notMigratable)}),
			want:         map[string]Action{"a": ActionMigrate, "legacy": ActionBlocked},
			wantRejected: []string{"default/legacy", "not live-migratable", "ReadWriteMany"}},
		{name: "forced: a blocked VM with run strategy Always restarts elsewhere",
			in:   func() Input { in := input([]VM{vm("legacy", 2, notMigratable)}); in.Force = true; return in }(),
			want: map[string]Action{"legacy": ActionRestart}},
		{name: "forced: a blocked VM with run strategy Manual is shut down",
			in: func() Input {
				in := input([]VM{vm("legacy", 2, notMigratable, func(v *VM) { v.RunStrategy = "Manual" })})
				in.Force = true
				return in
			}(),
			want: map[string]Action{"legacy": ActionShutdown}},
		{name: "LiveMigrateIfPossible: migrates when it can, else restarts or shuts down by run strategy",
			in: input([]VM{
				vm("ok", 2, func(v *VM) { v.EvictionStrategy = EvictionLiveMigrateIfPossible }),
				vm("rwo", 2, notMigratable, func(v *VM) { v.EvictionStrategy = EvictionLiveMigrateIfPossible; v.RunStrategy = "RerunOnFailure" }),
				vm("rwo-manual", 2, notMigratable, func(v *VM) { v.EvictionStrategy = EvictionLiveMigrateIfPossible; v.RunStrategy = "Manual" }),
			}),
			want: map[string]Action{"ok": ActionMigrate, "rwo": ActionRestart, "rwo-manual": ActionShutdown}},
		{name: "None shuts down; Always and Deckhouse AlwaysOn start again elsewhere",
			in: input([]VM{
				vm("batch", 1, func(v *VM) { v.EvictionStrategy = EvictionNone }),
				vm("manual", 1, func(v *VM) { v.EvictionStrategy = EvictionNone; v.RunStrategy = "Manual" }),
				vm("dh", 1, func(v *VM) { v.EvictionStrategy = EvictionNone; v.RunStrategy = "AlwaysOnUnlessStoppedManually" }),
			}),
			want: map[string]Action{"batch": ActionRestart, "manual": ActionShutdown, "dh": ActionRestart}},
		{name: "the cluster's default eviction strategy applies to a VMI without one",
			in: func() Input {
				in := input([]VM{vm("a", 1, func(v *VM) { v.EvictionStrategy = "" })})
				in.ClusterEvictionStrategy = EvictionLiveMigrate
				return in
			}(),
			want: map[string]Action{"a": ActionMigrate}},
		{name: "no eviction strategy anywhere is None",
			in:   input([]VM{vm("a", 1, func(v *VM) { v.EvictionStrategy = "" })}),
			want: map[string]Action{"a": ActionRestart}},
		{name: "External: the label decides",
			in: input([]VM{
				vm("ext", 1, func(v *VM) { v.EvictionStrategy = EvictionExternal }),
				vm("ext-down", 1, func(v *VM) { v.EvictionStrategy = EvictionExternal; v.Strategy = StrategyShutdown }),
				vm("ext-after", 1, func(v *VM) { v.EvictionStrategy = EvictionExternal; v.Strategy = StrategyShutdownAndRestartAfter }),
			}),
			want: map[string]Action{"ext": ActionMigrate, "ext-down": ActionShutdown, "ext-after": ActionShutdownRestartAfter}},
		{name: "an unknown label value blocks",
			in:           input([]VM{vm("odd", 1, func(v *VM) { v.Strategy = "Teleport" })}),
			want:         map[string]Action{"odd": ActionBlocked},
			wantRejected: []string{"default/odd", "Teleport"}},
		{name: "mode Evict plans no migration",
			in: func() Input {
				in := input([]VM{vm("a", 2), vm("m", 2, func(v *VM) { v.RunStrategy = "Manual" }), vm("legacy", 2, notMigratable)})
				in.Mode = schemas.ModeEvict
				return in
			}(),
			want: map[string]Action{"a": ActionRestart, "m": ActionShutdown, "legacy": ActionRestart}},
		{name: "a VM that does not run has nothing to do",
			in:   input([]VM{vm("off", 2, func(v *VM) { v.Running = false })}),
			want: map[string]Action{"off": ActionNone}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := Make(tt.in)
			require.Equal(t, tt.want, actions(p), p.Text())
			if len(tt.wantRejected) == 0 {
				require.Empty(t, p.Rejected)
				return
			}
			for _, s := range tt.wantRejected {
				require.Contains(t, p.Rejected, s)
			}
		})
	}
}

func TestPlanCapacity(t *testing.T) {
	cordoned := func(n *Node) { n.Unschedulable = true }
	tests := []struct {
		name      string
		in        Input
		wantOK    bool
		wantNoFit []string
		wantRoom  map[string]string
		rejected  bool
	}{
		{name: "everything fits", in: input([]VM{vm("a", 8), vm("b", 8)}, node("node-2", 16)), wantOK: true,
			wantRoom: map[string]string{"a": "node-2", "b": "node-2"}},
		{name: "the largest VMs do not fit: rejected, naming them",
			in:     input([]VM{vm("big", 40), vm("small", 4)}, node("node-2", 32)),
			wantOK: false, wantNoFit: []string{"default/big"}, rejected: true},
		{name: "forced: proceeds without room",
			in:     func() Input { in := input([]VM{vm("big", 40)}, node("node-2", 32)); in.Force = true; return in }(),
			wantOK: false, wantNoFit: []string{"default/big"}, rejected: false},
		{name: "cordoned, NotReady and in-maintenance nodes are no room",
			in: input([]VM{vm("a", 4)},
				node("node-2", 64, cordoned), node("node-3", 64, func(n *Node) { n.Ready = false }),
				node("node-4", 64, func(n *Node) { n.Maintenance = "maintenance.node-4.r1" })),
			wantOK: false, wantNoFit: []string{"default/a"}, rejected: true},
		{name: "a NoSchedule taint keeps a VM out unless it tolerates it",
			in: input([]VM{vm("plain", 4), vm("tolerant", 4, func(v *VM) {
				v.Placement.Tolerations = []corev1.Toleration{{Key: "dedicated", Operator: corev1.TolerationOpExists}}
			})}, node("node-2", 64, func(n *Node) {
				n.Taints = []corev1.Taint{{Key: "dedicated", Value: "gpu", Effect: corev1.TaintEffectNoSchedule}}
			})),
			wantOK: false, wantNoFit: []string{"default/plain"}, wantRoom: map[string]string{"tolerant": "node-2"}, rejected: true},
		{name: "a node selector picks the node",
			in: input([]VM{vm("zoned", 4, func(v *VM) { v.Placement.NodeSelector = map[string]string{"zone": "b"} })},
				node("node-2", 64), node("node-3", 64, func(n *Node) { n.Labels["zone"] = "b" })),
			wantOK: true, wantRoom: map[string]string{"zoned": "node-3"}},
		{name: "VMs that are shut down need no room",
			in:     input([]VM{vm("big", 40, func(v *VM) { v.Strategy = StrategyShutdown }), vm("small", 4)}, node("node-2", 32)),
			wantOK: true, wantRoom: map[string]string{"small": "node-2"}},
		{name: "a rack: the VMs still on another node in maintenance take the room first",
			in: func() Input {
				in := input([]VM{vm("mine", 8)}, node("node-2", 16))
				in.Displaced = []VM{vm("theirs", 12)}
				return in
			}(),
			wantOK: false, wantNoFit: []string{"default/mine"}, rejected: true},
		{name: "a VM whose migration already holds a target pod needs no more room",
			in: func() Input {
				in := input([]VM{vm("mine", 8)}, node("node-2", 16, func(n *Node) { n.Used = Resources{MemoryBytes: 12 * gi, Pods: 1} }))
				in.Displaced = []VM{vm("theirs", 12, func(v *VM) { v.Target = "node-2" })}
				return in
			}(),
			wantOK: false, wantNoFit: []string{"default/mine"}, rejected: true},
		{name: "displaced VMs in flight are not counted twice",
			in: func() Input {
				in := input([]VM{vm("mine", 4)}, node("node-2", 16, func(n *Node) { n.Used = Resources{MemoryBytes: 12 * gi, Pods: 1} }))
				in.Displaced = []VM{vm("theirs", 12, func(v *VM) { v.Target = "node-2" })}
				return in
			}(),
			wantOK: true, wantRoom: map[string]string{"mine": "node-2"}},
		{name: "used resources count",
			in:     input([]VM{vm("a", 8)}, node("node-2", 16, func(n *Node) { n.Used = Resources{MemoryBytes: 10 * gi, Pods: 5} })),
			wantOK: false, wantNoFit: []string{"default/a"}, rejected: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := Make(tt.in)
			require.Equal(t, tt.wantOK, p.Capacity.OK, p.Text())
			var noFit []string
			for k := range p.Capacity.NoRoom {
				noFit = append(noFit, k)
			}
			require.ElementsMatch(t, tt.wantNoFit, noFit)
			for name, room := range tt.wantRoom {
				s, ok := p.Step("default/" + name)
				require.True(t, ok)
				require.Equal(t, room, s.Room, name)
			}
			require.Equal(t, tt.rejected, p.Rejected != "", p.Rejected)
			for _, k := range tt.wantNoFit {
				if tt.rejected {
					require.Contains(t, p.Rejected, k)
				}
			}
		})
	}
}

func TestPlanOrderAndEstimate(t *testing.T) {
	sec := func(n int) time.Duration { return time.Duration(n) * time.Second }
	tests := []struct {
		name       string
		in         Input
		wantOrder  []string
		wantSlots  int
		wantEst    time.Duration
		wantBound  time.Duration
		wantAction map[string]Action
	}{
		{
			// Durations 18, 14, 12, 11 s on 2 slots: LPT puts 18+11 and 14+12.
			name:      "longest first on two slots",
			in:        input([]VM{vm("a", 1), vm("b", 8), vm("c", 2), vm("d", 4)}),
			wantOrder: []string{"b", "d", "c", "a"}, wantSlots: 2,
			wantEst: sec(29), wantBound: max(sec(18), sec(55)/2),
		},
		{
			name:      "a VM whose last migration failed goes after the others",
			in:        input([]VM{vm("a", 1), vm("big", 8, func(v *VM) { v.LastMigrationFailed = "Live migration stuck for 150 seconds" }), vm("c", 2)}),
			wantOrder: []string{"c", "a", "big"}, wantSlots: 2,
			wantEst: sec(29), wantBound: max(sec(18), sec(41)/2),
		},
		{
			name: "one outbound migration per node (Deckhouse): serial",
			in: func() Input {
				in := input([]VM{vm("a", 1), vm("b", 8)})
				in.Limits = Limits{PerCluster: 3, PerNode: 1}
				return in
			}(),
			wantOrder: []string{"b", "a"}, wantSlots: 1, wantEst: sec(29), wantBound: sec(29),
		},
		{
			name: "migrations drover did not start take slots",
			in: func() Input {
				in := input([]VM{vm("a", 1), vm("b", 8)})
				in.InFlightNode = 1
				return in
			}(),
			wantOrder: []string{"b", "a"}, wantSlots: 1, wantEst: sec(29), wantBound: sec(18),
		},
		{
			name: "the cluster limit caps the node's",
			in: func() Input {
				in := input([]VM{vm("a", 2), vm("b", 2), vm("c", 2)})
				in.Limits = Limits{PerCluster: 4, PerNode: 3}
				in.InFlightCluster = 3
				return in
			}(),
			wantOrder: []string{"a", "b", "c"}, wantSlots: 1, wantEst: sec(36), wantBound: sec(12),
		},
		{
			name: "restarts run beside migrations; measured correction scales everything",
			in: func() Input {
				in := input([]VM{vm("a", 10), vm("r", 1, func(v *VM) { v.EvictionStrategy = EvictionNone })})
				in.Model.Correction = 0.5
				return in
			}(),
			wantOrder: []string{"a", "r"}, wantSlots: 2, wantEst: sec(10), wantBound: sec(10),
			wantAction: map[string]Action{"a": ActionMigrate, "r": ActionRestart},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := Make(tt.in)
			var order []string
			for _, s := range p.Steps {
				order = append(order, s.Name)
			}
			require.Equal(t, tt.wantOrder, order, p.Text())
			require.Equal(t, tt.wantSlots, p.Slots)
			require.Equal(t, tt.wantEst, p.Estimate, p.Text())
			require.Equal(t, tt.wantBound, p.LowerBound, p.Text())
			require.LessOrEqual(t, p.LowerBound, p.Estimate)
			for name, a := range tt.wantAction {
				s, _ := p.Step("default/" + name)
				require.Equal(t, a, s.Action)
			}
		})
	}
}

func TestPlanText(t *testing.T) {
	p := Make(input([]VM{vm("a", 2), vm("legacy", 2, notMigratable)}, node("node-2", 1)))
	txt := p.Text()
	for _, s := range []string{"plan for node-1", "default/a", "Migrate", "default/legacy", "Blocked", "no room for default/a", "rejected:"} {
		require.Contains(t, txt, s)
	}
	require.True(t, strings.HasPrefix(p.Summary(), "plan for node-1 (LiveMigrate): 1 migrate, 1 blocked"), p.Summary())
}
