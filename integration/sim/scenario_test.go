package sim

import (
	"fmt"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kvv1 "kubevirt.io/api/core/v1"
)

// scenarioDir holds the scenarios shipped for tests, benchmarks and people.
var scenarioDir = filepath.Join("..", "scenarios")

// TestShippedScenarios: every shipped scenario loads and is what its name promises.
func TestShippedScenarios(t *testing.T) {
	perNode := func(sc *Scenario) map[string]int {
		out := map[string]int{}
		for _, vm := range sc.VMs {
			out[vm.Node]++
		}
		return out
	}
	tests := []struct {
		file       string
		nodes, vms int
		check      func(t *testing.T, sc *Scenario)
	}{
		{file: "busy-node.yaml", nodes: 3, vms: 20, check: func(t *testing.T, sc *Scenario) {
			require.Equal(t, map[string]int{"node-1": 20}, perNode(sc))
			require.Equal(t, []string{"node-2", "node-3"}, sc.KubeVirtPods.VirtAPI)
		}},
		{file: "rack.yaml", nodes: 10, vms: 30, check: func(t *testing.T, sc *Scenario) {
			for _, n := range sc.Nodes {
				require.Equal(t, "a", n.Labels["rack"], n.Name)
				require.Equal(t, time.Minute, n.WatchdogTimeout.Duration, n.Name)
			}
		}},
		{file: "scale-100x1000.yaml", nodes: 100, vms: 1000, check: func(t *testing.T, sc *Scenario) {
			for node, n := range perNode(sc) {
				require.Equal(t, 10, n, node)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			sc, err := LoadScenario(filepath.Join(scenarioDir, tc.file))
			require.NoError(t, err)
			require.Len(t, sc.Nodes, tc.nodes)
			require.Len(t, sc.VMs, tc.vms)
			tc.check(t, sc)
		})
	}
}

// TestParseScenarioErrorsNameTheField: strict parsing refuses unknown fields, wrong types and
// bad values with an error that says where.
func TestParseScenarioErrorsNameTheField(t *testing.T) {
	const nodes = "nodes:\n- {name: node-1}\n- {name: node-2}\n"
	tests := []struct {
		name, yaml string
		want       []string // substrings of the error
	}{
		{name: "unknown top-level field", yaml: nodes + "vm: []\n", want: []string{"vm: unknown field"}},
		{name: "unknown node field", yaml: "nodes:\n- {name: node-1, cpus: 4}\n", want: []string{"nodes[0].cpus: unknown field"}},
		{name: "unknown vm field", yaml: nodes + "vms:\n- {name: a, nodeName: node-1}\n", want: []string{"vms[0].nodeName: unknown field"}},
		{name: "unknown kubevirtPods field", yaml: nodes + "kubevirtPods: {virtHandler: [node-1]}\n", want: []string{"kubevirtPods.virtHandler: unknown field"}},
		{name: "duplicate key", yaml: "nodes:\n- {name: node-1, name: node-2}\n", want: []string{"not a YAML scenario", "name"}},
		{name: "wrong type", yaml: nodes + "vms:\n- {name: a, cpu: two}\n", want: []string{"vms[0].cpu: cannot unmarshal string"}},
		{name: "bad quantity", yaml: "nodes:\n- {name: node-1, memory: lots}\n", want: []string{"nodes[0].memory: quantities must match"}},
		{name: "node without name", yaml: "nodes:\n- {cpu: \"4\"}\n", want: []string{"nodes[0].name: required"}},
		{name: "node twice", yaml: "nodes:\n- {name: node-1}\n- {name: node-1}\n", want: []string{"nodes[1] (node-1).name", "appears twice"}},
		{name: "bad taint effect", yaml: "nodes:\n- {name: node-1, taints: [{key: a, effect: Never}]}\n", want: []string{"nodes[0] (node-1).taints[0].effect", `"Never"`}},
		{name: "negative watchdog", yaml: "nodes:\n- {name: node-1, watchdogTimeout: -5s}\n", want: []string{"nodes[0] (node-1).watchdogTimeout"}},
		{name: "bad label", yaml: "nodes:\n- {name: node-1, labels: {\"a b\": x}}\n", want: []string{"nodes[0] (node-1).labels", `"a b"`}},
		{name: "placement on unknown node", yaml: nodes + "kubevirtPods: {virtAPI: [node-9]}\n", want: []string{"kubevirtPods.virtAPI[0]", `"node-9"`}},
		{name: "too many replicas", yaml: nodes + "kubevirtPods: {virtController: [node-1, node-1, node-2]}\n", want: []string{"kubevirtPods.virtController", "3 nodes for 2 replicas"}},
		{name: "bad run strategy", yaml: nodes + "vms:\n- {name: db-1, runStrategy: Alwayz}\n", want: []string{"vms[0] (default/db-1).runStrategy", `"Alwayz"`}},
		{name: "run policy on kubevirt", yaml: nodes + "vms:\n- {name: db-1, runPolicy: AlwaysOn}\n", want: []string{"vms[0] (default/db-1).runPolicy", "Deckhouse field"}},
		{name: "run strategy on deckhouse", yaml: nodes + "vms:\n- {name: db-1, platform: deckhouse, runStrategy: Always}\n", want: []string{"vms[0] (default/db-1).runStrategy", "KubeVirt field"}},
		{name: "bad run policy", yaml: nodes + "vms:\n- {name: db-1, platform: deckhouse, runPolicy: Sometimes}\n", want: []string{"vms[0] (default/db-1).runPolicy", `"Sometimes"`}},
		{name: "eviction strategy on deckhouse", yaml: nodes + "vms:\n- {name: db-1, platform: deckhouse, evictionStrategy: None}\n", want: []string{"vms[0] (default/db-1).evictionStrategy"}},
		{name: "deckhouse vm without disk", yaml: nodes + "vms:\n- {name: db-1, platform: deckhouse}\n", want: []string{"vms[0] (default/db-1).disk: required"}},
		{name: "bad eviction strategy", yaml: nodes + "vms:\n- {name: db-1, evictionStrategy: Migrate}\n", want: []string{"vms[0] (default/db-1).evictionStrategy", `"Migrate"`}},
		{name: "bad platform", yaml: nodes + "vms:\n- {name: db-1, platform: vmware}\n", want: []string{"vms[0] (default/db-1).platform", `"vmware"`}},
		{name: "two platforms", yaml: nodes + "vms:\n- {name: a}\n- {name: b, platform: deckhouse}\n", want: []string{"vms[1] (default/b).platform", "one platform"}},
		{name: "bad access mode", yaml: nodes + "vms:\n- {name: a, disk: {accessMode: ReadOnlyMany}}\n", want: []string{"vms[0] (default/a).disk.accessMode", `"ReadOnlyMany"`}},
		{name: "negative dirty rate", yaml: nodes + "vms:\n- {name: a, dirtyRate: -1}\n", want: []string{"vms[0] (default/a).dirtyRate"}},
		{name: "unknown node", yaml: nodes + "vms:\n- {name: a, node: node-3}\n", want: []string{"vms[0] (default/a).node", `"node-3"`}},
		{name: "vm twice", yaml: nodes + "vms:\n- {name: a}\n- {name: a, namespace: default}\n", want: []string{"vms[1] (default/a).name", "appears twice"}},
		{name: "bad vm name", yaml: nodes + "vms:\n- {name: DB_1}\n", want: []string{"vms[0] (default/DB_1).name"}},
		{name: "several errors at once", yaml: nodes + "vms:\n- {name: a, runStrategy: x}\n- {name: b, node: nowhere}\n",
			want: []string{"vms[0] (default/a).runStrategy", "vms[1] (default/b).node"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseScenario([]byte(tc.yaml))
			require.Error(t, err)
			for _, w := range tc.want {
				require.ErrorContains(t, err, w)
			}
		})
	}

	t.Run("the issue's example", func(t *testing.T) {
		sc, err := ParseScenario([]byte(`
nodes:
- {name: node-1, cpu: "16", memory: 64Gi, labels: {rack: a}, taints: [], watchdogTimeout: 60s}
- {name: node-2}
kubevirtPods: {virtAPI: [node-1, node-1], virtController: [node-1, node-1]}   # default: spread by the scheduler
vms:
- name: db-1
  namespace: default
  platform: kubevirt            # or deckhouse (then runPolicy instead of runStrategy)
  cpu: 2
  memory: 4Gi
  runStrategy: Always
  evictionStrategy: LiveMigrate
  disk: {accessMode: ReadWriteMany, size: 10Gi}   # omitted: no disk
  dirtyRate: 0                   # bytes per second, as the annotation
  labels: {tier: db}
  node: node-1                   # where it starts; no selector is left in its spec
`))
		require.NoError(t, err)
		require.Equal(t, "64Gi", sc.Nodes[0].Memory.String())
		require.Equal(t, time.Minute, sc.Nodes[0].WatchdogTimeout.Duration)
		vm := sc.VMs[0]
		require.Equal(t, ScenarioVM{
			Name: "db-1", Namespace: "default", Platform: PlatformKubeVirt, CPU: 2, Memory: resource.MustParse("4Gi"),
			RunStrategy: "Always", EvictionStrategy: "LiveMigrate",
			Disk:      &ScenarioDisk{AccessMode: corev1.ReadWriteMany, Size: resource.MustParse("10Gi")},
			DirtyRate: vm.DirtyRate, Labels: map[string]string{"tier": "db"}, Node: "node-1",
		}, vm)
		require.Zero(t, vm.DirtyRate.Value())
	})
}

// TestSeedOptionsScenario: Seed's generated mix is a valid scenario of the promised shape.
func TestSeedOptionsScenario(t *testing.T) {
	for _, platform := range []string{PlatformKubeVirt, PlatformDeckhouse} {
		sc := SeedOptions{Nodes: 3, VMs: 8, Platform: platform, Node: NodeOptions{CPU: "8", WatchdogTimeout: time.Minute}}.Scenario()
		require.NoError(t, sc.Validate(), platform)
		require.Equal(t, platform, sc.Platform())
		require.Len(t, sc.Nodes, 3)
		require.Equal(t, "8", sc.Nodes[2].CPU.String())
		require.Len(t, sc.VMs, 8)
		require.Equal(t, corev1.ReadWriteOnce, sc.VMs[3].Disk.AccessMode, "one in four is RWO")
		require.Equal(t, corev1.ReadWriteMany, sc.VMs[4].Disk.AccessMode)
	}
}

// TestSeedScenarioPlacesVMsWithoutSelectors: the busy-node scenario starts its 20 VMs on node-1
// and KubeVirt's pods on node-2 and node-3, with no selector left anywhere: the first VM moves
// off node-1 with an ordinary migration. Labels, dirty rates and Manual VMs are as described.
func TestSeedScenarioPlacesVMsWithoutSelectors(t *testing.T) {
	sc, err := LoadScenario(filepath.Join(scenarioDir, "busy-node.yaml"))
	require.NoError(t, err)
	var opts Options
	sc.Configure(&opts)
	s := startSim(t, opts)
	res, err := s.SeedScenario(ctxT(t), sc)
	require.NoError(t, err)
	require.Len(t, res.VMs, 20)
	require.Equal(t, []string{"node-1", "node-2", "node-3"}, res.Nodes)

	for _, vm := range sc.VMs {
		vmi := vmiRunning(t, s, vm.Name, 60*time.Second)
		require.Equal(t, "node-1", vmi.Status.NodeName, vm.Name)
		require.Equal(t, map[string]string{}, nonKubeVirtSelector(vmi.Spec.NodeSelector), vm.Name)
		require.Nil(t, vmi.Spec.Affinity, vm.Name)
		kv := s.getVM(testNS + "/" + vm.Name)
		require.Empty(t, kv.Spec.Template.Spec.NodeSelector, vm.Name)
		for _, p := range vmiPods(s, vm.Name) {
			require.Equal(t, map[string]string{}, nonKubeVirtSelector(p.Spec.NodeSelector), p.Name)
			require.Nil(t, p.Spec.Affinity, p.Name)
			require.Equal(t, vm.Labels["tier"], p.Labels["tier"], p.Name)
		}
		if vm.DirtyRate != nil {
			require.Equal(t, vm.DirtyRate.String(), vmi.Annotations[AnnotationDirtyRate], vm.Name)
		}
	}
	eventually(t, 30*time.Second, "virt-api and virt-controller on node-2 and node-3", func() (bool, string) {
		where := map[string][]string{}
		for _, comp := range []string{"virt-api", "virt-controller"} {
			for _, p := range s.podsOf(s.opts.KubeVirtNamespace, comp) {
				if p.Status.Phase == corev1.PodRunning {
					where[comp] = append(where[comp], p.Spec.NodeName)
				}
			}
		}
		ok := fmt.Sprint(sortedCopy(where["virt-api"])) == "[node-2 node-3]" && fmt.Sprint(sortedCopy(where["virt-controller"])) == "[node-2 node-3]"
		return ok, fmt.Sprint(where)
	})

	mig := &kvv1.VirtualMachineInstanceMigration{
		ObjectMeta: metav1.ObjectMeta{Name: "move-web-1", Namespace: testNS},
		Spec:       kvv1.VirtualMachineInstanceMigrationSpec{VMIName: "web-1"},
	}
	_, err = s.KubeVirt.VirtualMachineInstanceMigrations(testNS).Create(ctxT(t), mig, metav1.CreateOptions{})
	require.NoError(t, err)
	eventually(t, 60*time.Second, "web-1 migrated off node-1", func() (bool, string) {
		vmi := s.getVMI(testNS + "/web-1")
		return vmi != nil && vmi.Status.NodeName != "node-1" && vmi.Status.NodeName != "", vmi.Status.NodeName
	})
	require.Empty(t, s.Violations())

	other := *sc
	other.KubeVirtPods = &KubeVirtPods{VirtAPI: []string{"node-1"}}
	_, err = s.SeedScenario(ctxT(t), &other)
	require.ErrorContains(t, err, "Scenario.Configure", "a scenario placing KubeVirt's pods elsewhere than the simulator started them")
}

// TestSeedScenarioDeckhouse: a Deckhouse scenario configures KubeVirt as Deckhouse does and
// starts its VMs where it says, labels and dirty rate passed on to the VMI.
func TestSeedScenarioDeckhouse(t *testing.T) {
	s := startSim(t, Options{})
	sc, err := ParseScenario([]byte(`
nodes: [{name: node-1}, {name: node-2}]
vms:
- {name: dh-1, platform: deckhouse, cpu: 1, memory: 1Gi, runPolicy: AlwaysOn, dirtyRate: 64Mi, labels: {tier: db}, node: node-2, disk: {accessMode: ReadWriteMany}}
- {name: dh-2, platform: deckhouse, node: node-2, disk: {accessMode: ReadWriteOnce}}
`))
	require.NoError(t, err)
	_, err = s.SeedScenario(ctxT(t), sc)
	require.NoError(t, err)
	for _, name := range []string{"dh-1", "dh-2"} {
		vmi := vmiRunning(t, s, name, 60*time.Second)
		require.Equal(t, "node-2", vmi.Status.NodeName, name)
		require.Empty(t, vmi.Spec.NodeSelector, name)
		dvm, err := s.Dynamic.Resource(DeckhouseVMGVR).Namespace(testNS).Get(ctxT(t), name, metav1.GetOptions{})
		require.NoError(t, err)
		_, has, _ := unstructured.NestedMap(dvm.Object, "spec", "nodeSelector")
		require.False(t, has, name)
	}
	vmi := s.getVMI(testNS + "/dh-1")
	require.Equal(t, "64Mi", vmi.Annotations[AnnotationDirtyRate])
	require.Equal(t, "db", vmi.Labels["tier"])
	cfg := s.MigrationConfig()
	require.Equal(t, 2, cfg.ParallelMigrationsPerCluster)
	require.Equal(t, 1, cfg.ParallelOutboundMigrationsPerNode)
}

// nonKubeVirtSelector drops the kubevirt.io/schedulable=true every launcher pod carries.
func nonKubeVirtSelector(sel map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range sel {
		if k != kvv1.NodeSchedulable {
			out[k] = v
		}
	}
	return out
}

func sortedCopy(in []string) []string {
	out := slices.Clone(in)
	slices.Sort(out)
	return out
}
