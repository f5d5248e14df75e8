package recovery

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

var t0 = time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)

func node(ready corev1.ConditionStatus, since time.Time) *corev1.Node {
	return &corev1.Node{Status: corev1.NodeStatus{Conditions: []corev1.NodeCondition{{
		Type: corev1.NodeReady, Status: ready, Reason: "R", LastTransitionTime: metav1.NewTime(since)}}}}
}

func lease(renewed time.Time) *coordinationv1.Lease {
	rt := metav1.NewMicroTime(renewed)
	return &coordinationv1.Lease{Spec: coordinationv1.LeaseSpec{RenewTime: &rt}}
}

func TestHealth(t *testing.T) {
	tests := []struct {
		name    string
		node    *corev1.Node
		lease   *coordinationv1.Lease
		healthy bool
		spell   time.Time
		reason  string
	}{
		{name: "ready and renewing", node: node(corev1.ConditionTrue, t0.Add(-time.Hour)), lease: lease(t0.Add(-5 * time.Second)), healthy: true, spell: t0.Add(-time.Hour)},
		{name: "lease stale, still Ready (inside the 50 s grace)", node: node(corev1.ConditionTrue, t0.Add(-time.Hour)), lease: lease(t0.Add(-41 * time.Second)),
			spell: t0.Add(-41 * time.Second), reason: "LeaseExpired"},
		{name: "lease just under the timeout", node: node(corev1.ConditionTrue, t0.Add(-time.Hour)), lease: lease(t0.Add(-39 * time.Second)), healthy: true, spell: t0.Add(-time.Hour)},
		{name: "kubelet renews but reports NotReady", node: node(corev1.ConditionFalse, t0.Add(-40*time.Second)), lease: lease(t0), spell: t0.Add(-40 * time.Second), reason: "R"},
		{name: "a kubelet starting up reports NotReady for seconds: no incident", node: node(corev1.ConditionFalse, t0.Add(-5*time.Second)), lease: lease(t0), healthy: true, spell: t0.Add(-5 * time.Second)},
		{name: "Unknown and stale: the spell starts at the last renewal", node: node(corev1.ConditionUnknown, t0.Add(-10*time.Second)), lease: lease(t0.Add(-60 * time.Second)),
			spell: t0.Add(-60 * time.Second), reason: "LeaseExpired"},
		{name: "no lease, Ready", node: node(corev1.ConditionTrue, t0.Add(-time.Hour)), healthy: true, spell: t0.Add(-time.Hour)},
		{name: "no condition yet", node: &corev1.Node{ObjectMeta: metav1.ObjectMeta{CreationTimestamp: metav1.NewTime(t0.Add(-time.Minute))}}, spell: t0.Add(-time.Minute), reason: "NodeNotReady"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := Health(tc.node, tc.lease, t0, 40*time.Second)
			require.Equal(t, tc.healthy, h.Healthy, h.Detail)
			require.Equal(t, tc.healthy && tc.node.Status.Conditions != nil && tc.node.Status.Conditions[0].Status == corev1.ConditionTrue, h.Ready)
			require.True(t, tc.spell.Equal(h.SpellStart), "spell %s, want %s", h.SpellStart, tc.spell)
			if !tc.healthy {
				require.Equal(t, tc.reason, h.Reason)
			}
		})
	}
}

func TestStormLimit(t *testing.T) {
	pct, err := ParseStormLimit("30%")
	require.NoError(t, err)
	three, err := ParseStormLimit("3")
	require.NoError(t, err)
	for _, bad := range []string{"", "0", "-1", "0%", "101%", "many"} {
		_, err := ParseStormLimit(bad)
		require.Error(t, err, bad)
	}
	tests := []struct {
		name               string
		limit              StormLimit
		unhealthy, inScope int
		storm              bool
	}{
		{"one node of two is never a storm", pct, 1, 2, false},
		{"1 of 4 under 30%", pct, 1, 4, false},
		{"2 of 4 over 30%", pct, 2, 4, true},
		{"3 of 4", pct, 3, 4, true},
		{"3 of 10 is 30%, not more", pct, 3, 10, false},
		{"4 of 10", pct, 4, 10, true},
		{"count: 3 is allowed", three, 3, 100, false},
		{"count: 4 is not", three, 4, 100, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			health := map[string]NodeHealth{}
			for i := 0; i < tc.inScope; i++ {
				health[string(rune('a'+i))] = NodeHealth{Healthy: i >= tc.unhealthy}
			}
			s := CheckStorm(health, tc.limit)
			require.Equal(t, tc.storm, s.Active, s.String())
			require.Len(t, s.Unhealthy, tc.unhealthy)
		})
	}
}

func TestGate(t *testing.T) {
	taint := Policy{Fencing: FencingTaint}
	watchdog := Policy{Fencing: FencingWatchdog, WatchdogTimeout: 60 * time.Second, WatchdogMargin: 15 * time.Second}
	none := Policy{Fencing: FencingNone}
	fenced := &Evidence{Method: "ipmi", By: "agent", At: t0}
	tests := []struct {
		name     string
		in       GateInput
		open     bool
		mode     string
		addTaint bool
		unsafe   bool
		recheck  time.Duration
	}{
		{name: "taint mode waits", in: GateInput{Policy: taint, NodeExists: true, LeaseRenewed: t0.Add(-time.Hour)}, mode: FencingTaint},
		{name: "taint mode: the taint opens", in: GateInput{Policy: taint, NodeExists: true, OutOfService: true}, open: true, mode: FencingTaint},
		{name: "taint mode: node.fenced opens, drover taints", in: GateInput{Policy: taint, NodeExists: true, Fenced: fenced}, open: true, mode: FencingTaint, addTaint: true},
		{name: "watchdog: lease too young", in: GateInput{Policy: watchdog, NodeExists: true, LeaseRenewed: t0.Add(-50 * time.Second)}, mode: FencingWatchdog, recheck: 25 * time.Second},
		{name: "watchdog: past timeout, not past the margin", in: GateInput{Policy: watchdog, NodeExists: true, LeaseRenewed: t0.Add(-70 * time.Second)}, mode: FencingWatchdog, recheck: 5 * time.Second},
		{name: "watchdog: past timeout and margin", in: GateInput{Policy: watchdog, NodeExists: true, LeaseRenewed: t0.Add(-75 * time.Second)}, open: true, mode: FencingWatchdog, addTaint: true},
		{name: "watchdog without a lease waits", in: GateInput{Policy: watchdog, NodeExists: true}, mode: FencingWatchdog},
		{name: "watchdog: node.fenced opens early", in: GateInput{Policy: watchdog, NodeExists: true, LeaseRenewed: t0.Add(-41 * time.Second), Fenced: fenced}, open: true, mode: FencingTaint, addTaint: true},
		{name: "none opens at once, unsafe", in: GateInput{Policy: none, NodeExists: true, LeaseRenewed: t0.Add(-41 * time.Second)}, open: true, mode: FencingNone, addTaint: true, unsafe: true},
		{name: "a deleted node opens in every mode", in: GateInput{Policy: taint}, open: true, mode: GateDeleted},
		{name: "deckhouse: before its 60 s + margin", in: GateInput{Policy: taint, NodeExists: true, Deckhouse: true, LeaseRenewed: t0.Add(-61 * time.Second)}, mode: GateDeckhouse, recheck: 14 * time.Second},
		{name: "deckhouse: after", in: GateInput{Policy: taint, NodeExists: true, Deckhouse: true, LeaseRenewed: t0.Add(-76 * time.Second)}, open: true, mode: GateDeckhouse, addTaint: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.in.Now = t0
			g := Gate(tc.in)
			require.Equal(t, tc.open, g.Open, g.By)
			require.Equal(t, tc.mode, g.Mode)
			require.Equal(t, tc.addTaint, g.AddTaint)
			require.Equal(t, tc.unsafe, g.Unsafe)
			require.Equal(t, tc.recheck, g.Recheck)
			require.NotEmpty(t, g.By)
		})
	}
}

func gib(n int64) int64 { return n << 30 }

func vm(name string, prio int, memGiB int64, policy string) VM {
	return VM{Namespace: "ns", Name: name, Platform: PlatformKubeVirt, RunPolicy: policy, Restarts: Restarts(PlatformKubeVirt, policy),
		Priority: prio, CPU: 1000, Memory: gib(memGiB)}
}

func TestPlanRestarts(t *testing.T) {
	room := func(name string, memGiB int64) NodeRoom {
		return NodeRoom{Name: name, CPU: 64000, Memory: gib(memGiB), Labels: map[string]string{"zone": "a"}}
	}
	tests := []struct {
		name   string
		vms    []VM
		rooms  []NodeRoom
		fit    []string
		noRoom []string
		stay   []string
	}{
		{name: "everything fits", vms: []VM{vm("a", 0, 4, "Always"), vm("b", 0, 4, "RerunOnFailure"), vm("m", 0, 4, "Manual"), vm("h", 0, 4, "Halted")},
			rooms: []NodeRoom{room("n1", 8), room("n2", 8)}, fit: []string{"ns/a", "ns/b"}, stay: []string{"ns/m", "ns/h"}},
		{name: "short: the highest priorities first, the rest reported",
			vms:   []VM{vm("low", 0, 4, "Always"), vm("high", 10, 4, "Always"), vm("mid", 5, 4, "Always")},
			rooms: []NodeRoom{room("n1", 8)}, fit: []string{"ns/high", "ns/mid"}, noRoom: []string{"ns/low"}},
		{name: "a big high-priority VM goes before small low ones",
			vms:   []VM{vm("small1", 0, 2, "Always"), vm("small2", 0, 2, "Always"), vm("big", 1, 6, "Always")},
			rooms: []NodeRoom{room("n1", 8)}, fit: []string{"ns/big", "ns/small1"}, noRoom: []string{"ns/small2"}},
		{name: "a node selector no room matches", vms: []VM{func() VM { v := vm("sel", 0, 1, "Always"); v.NodeSelector = map[string]string{"zone": "b"}; return v }()},
			rooms: []NodeRoom{room("n1", 8)}, noRoom: []string{"ns/sel"}},
		{name: "a NoSchedule taint without toleration", vms: []VM{vm("t", 0, 1, "Always")},
			rooms: []NodeRoom{func() NodeRoom {
				r := room("n1", 8)
				r.Taints = []corev1.Taint{{Key: "x", Effect: corev1.TaintEffectNoSchedule}}
				return r
			}()}, noRoom: []string{"ns/t"}},
		{name: "no room at all", vms: []VM{vm("a", 0, 1, "Always")}, noRoom: []string{"ns/a"}},
	}
	keys := func(vms []VM) []string {
		var out []string
		for _, v := range vms {
			out = append(out, v.Key())
		}
		return out
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := PlanRestarts(tc.vms, tc.rooms)
			require.Equal(t, tc.fit, keys(p.Fit))
			require.Equal(t, tc.noRoom, keys(p.NoRoom))
			require.Equal(t, tc.stay, keys(p.Stay))
			require.Equal(t, len(tc.noRoom) > 0, p.Short())
		})
	}
}

func TestFailoverCapacity(t *testing.T) {
	load := func(name string, allocGiB, freeGiB int64, vms ...VM) NodeLoad {
		return NodeLoad{Room: NodeRoom{Name: name, CPU: 64000, Memory: gib(freeGiB)}, Allocatable: gib(allocGiB), VMs: vms}
	}
	tests := []struct {
		name  string
		nodes []NodeLoad
		want  int
	}{
		{name: "no nodes", want: 0},
		{name: "one node can never fail over", nodes: []NodeLoad{load("a", 64, 32, vm("x", 0, 8, "Always"))}, want: 0},
		{name: "three half-full nodes survive one loss", nodes: []NodeLoad{
			load("a", 64, 32, vm("a1", 0, 32, "Always")), load("b", 64, 32, vm("b1", 0, 32, "Always")), load("c", 64, 32, vm("c1", 0, 32, "Always"))}, want: 1},
		{name: "three quarter-full nodes survive two losses", nodes: []NodeLoad{
			load("a", 64, 48, vm("a1", 0, 16, "Always")), load("b", 64, 48, vm("b1", 0, 16, "Always")), load("c", 64, 48, vm("c1", 0, 16, "Always"))}, want: 2},
		{name: "full nodes survive none", nodes: []NodeLoad{
			load("a", 64, 0, vm("a1", 0, 64, "Always")), load("b", 64, 0, vm("b1", 0, 64, "Always"))}, want: 0},
		{name: "VMs that do not restart need no room", nodes: []NodeLoad{
			load("a", 64, 0, vm("a1", 0, 64, "Manual")), load("b", 64, 0)}, want: 1},
		{name: "the largest fail first", nodes: []NodeLoad{
			load("big", 128, 0, vm("b1", 0, 100, "Always")), load("s1", 32, 30), load("s2", 32, 30)}, want: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			require.Equal(t, tc.want, FailoverCapacity(tc.nodes))
		})
	}
}

func TestPolicies(t *testing.T) {
	var cfg Config
	require.NoError(t, json.Unmarshal([]byte(`{"LeaseTimeout": 0}`), &cfg))
	var ps []Policy
	require.NoError(t, json.Unmarshal([]byte(`[{"nodeSelector":{"rack":"r1"},"fencing":"watchdog","watchdogTimeout":"30s"},{"fencing":"none","nodeSelector":{"lab":"true"}}]`), &ps))
	cfg.Policies = ps
	cfg.Default = Policy{Fencing: FencingTaint}
	require.NoError(t, cfg.Validate())
	require.Equal(t, Policy{NodeSelector: map[string]string{"rack": "r1"}, Fencing: FencingWatchdog, WatchdogTimeout: 30 * time.Second},
		cfg.PolicyFor(map[string]string{"rack": "r1", "lab": "true"}), "the first match wins")
	require.Equal(t, FencingNone, cfg.PolicyFor(map[string]string{"lab": "true"}).Fencing)
	require.Equal(t, FencingTaint, cfg.PolicyFor(nil).Fencing)

	for _, bad := range []string{`[{"fencing":"maybe"}]`, `[{"fencing":"none","colour":"red"}]`, `[{"fencing":"watchdog","watchdogTimeout":"soon"}]`} {
		var ps []Policy
		err := json.Unmarshal([]byte(bad), &ps)
		if err == nil {
			cfg.Policies = ps
			err = cfg.Validate()
		}
		require.Error(t, err, bad)
	}
}
