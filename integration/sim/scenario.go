package sim

// Scenarios: a cluster described in one YAML file (drover-sim --scenario FILE, LoadScenario in Go),
// so that tests, benchmarks and people seed the same thing. Seed builds its generated mix as a
// Scenario too, so both go through SeedScenario.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	kvv1 "kubevirt.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// Scenario is a cluster to seed: its nodes, where KubeVirt's own pods run and its VMs. Its YAML
// form is the format of integration/scenarios/*.yaml (see README.md, "Scenarios").
type Scenario struct {
	Nodes []ScenarioNode `json:"nodes"`
	// KubeVirtPods says where the replicas of virt-api and virt-controller first start; nil lets
	// the scheduler spread them. KubeVirt's pods start with the simulator: Configure puts this
	// into the Options given to New.
	KubeVirtPods *KubeVirtPods `json:"kubevirtPods,omitempty"`
	VMs          []ScenarioVM  `json:"vms,omitempty"`
}

// ScenarioNode is one node of a Scenario.
type ScenarioNode struct {
	Name   string            `json:"name"`
	CPU    resource.Quantity `json:"cpu,omitzero"`    // allocatable CPU, default 16
	Memory resource.Quantity `json:"memory,omitzero"` // allocatable memory, default 64Gi
	// Pods is the allocatable pod count, default 110 (not in the format; Seed uses it).
	Pods   int               `json:"pods,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
	Taints []corev1.Taint    `json:"taints,omitempty"`
	// WatchdogTimeout arms the node's watchdog (LabelWatchdogTimeout); unset: none.
	WatchdogTimeout *metav1.Duration `json:"watchdogTimeout,omitempty"`
}

// ScenarioVM is one VM of a Scenario.
type ScenarioVM struct {
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"` // default "default"
	Platform  string `json:"platform,omitempty"`  // PlatformKubeVirt (default) or PlatformDeckhouse
	CPU       int    `json:"cpu,omitempty"`       // vCPUs, default 1
	// Memory is the guest memory, default 1Gi.
	Memory resource.Quantity `json:"memory,omitzero"`
	// RunStrategy (KubeVirt, default Always) or RunPolicy (Deckhouse, default
	// AlwaysOnUnlessStoppedManually); the other platform's field is an error.
	RunStrategy string `json:"runStrategy,omitempty"`
	RunPolicy   string `json:"runPolicy,omitempty"`
	// EvictionStrategy (KubeVirt only, default LiveMigrate; Deckhouse applies LiveMigrate).
	EvictionStrategy string `json:"evictionStrategy,omitempty"`
	// Disk is the root disk, a claim named <name>-disk; nil: no disk.
	Disk *ScenarioDisk `json:"disk,omitempty"`
	// DirtyRate is how fast the guest dirties memory, bytes per second (AnnotationDirtyRate).
	DirtyRate *resource.Quantity `json:"dirtyRate,omitempty"`
	Labels    map[string]string  `json:"labels,omitempty"`
	// Node is where the VM starts; no selector is left in its spec, so it may move later.
	Node string `json:"node,omitempty"`
}

// ScenarioDisk is a VM's root disk.
type ScenarioDisk struct {
	AccessMode corev1.PersistentVolumeAccessMode `json:"accessMode"`    // ReadWriteOnce or ReadWriteMany
	Size       resource.Quantity                 `json:"size,omitzero"` // default 10Gi
}

// LoadScenario reads and validates the scenario in the YAML file path (ParseScenario).
func LoadScenario(path string) (*Scenario, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load scenario: %w", err)
	}
	sc, err := ParseScenario(data)
	if err != nil {
		return nil, fmt.Errorf("scenario %s: %w", path, err)
	}
	return sc, nil
}

// ParseScenario decodes a scenario from YAML (or JSON) strictly: an unknown or duplicate field,
// a value of the wrong type or a value Validate refuses is an error naming the field.
func ParseScenario(data []byte) (*Scenario, error) {
	js, err := yaml.YAMLToJSONStrict(data)
	if err != nil {
		return nil, fmt.Errorf("not a YAML scenario: %w", err)
	}
	// Decode the lists item by item so that an error names the item.
	var top struct {
		Nodes        []json.RawMessage `json:"nodes"`
		KubeVirtPods json.RawMessage   `json:"kubevirtPods"`
		VMs          []json.RawMessage `json:"vms"`
	}
	if err := decodeStrict(js, &top); err != nil {
		return nil, fmt.Errorf("%w (a scenario has nodes, kubevirtPods and vms)", err)
	}
	sc := &Scenario{}
	for i, raw := range top.Nodes {
		var n ScenarioNode
		if err := decodeStrict(raw, &n); err != nil {
			return nil, fmt.Errorf("nodes[%d].%w", i, err)
		}
		sc.Nodes = append(sc.Nodes, n)
	}
	if len(top.KubeVirtPods) > 0 && string(top.KubeVirtPods) != "null" {
		sc.KubeVirtPods = &KubeVirtPods{}
		if err := decodeStrict(top.KubeVirtPods, sc.KubeVirtPods); err != nil {
			return nil, fmt.Errorf("kubevirtPods.%w", err)
		}
	}
	for i, raw := range top.VMs {
		var vm ScenarioVM
		if err := decodeStrict(raw, &vm); err != nil {
			return nil, fmt.Errorf("vms[%d].%w", i, err)
		}
		sc.VMs = append(sc.VMs, vm)
	}
	if err := sc.Validate(); err != nil {
		return nil, err
	}
	return sc, nil
}

// decodeStrict decodes the JSON object js into out, one field at a time so that an error names
// its field (a quantity's own error does not); unknown fields are errors.
func decodeStrict(js []byte, out any) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(js, &fields); err != nil {
		return errors.New(strings.TrimPrefix(err.Error(), "json: "))
	}
	keys := slices.Sorted(maps.Keys(fields))
	for _, k := range keys {
		one, err := json.Marshal(map[string]json.RawMessage{k: fields[k]})
		if err != nil {
			return fmt.Errorf("%s: %w", k, err)
		}
		dec := json.NewDecoder(bytes.NewReader(one))
		dec.DisallowUnknownFields()
		if err := dec.Decode(out); err != nil {
			msg := strings.TrimPrefix(err.Error(), "json: ")
			if strings.HasPrefix(msg, "unknown field") {
				msg = "unknown field"
			}
			return fmt.Errorf("%s: %s", k, msg)
		}
	}
	return nil
}

// Validate checks the scenario and fills in nothing; every error names the field
// (nodes[1].taints[0].effect, vms[3] (default/db-1).runStrategy, ...).
func (sc *Scenario) Validate() error {
	var errs []error
	nodes := map[string]bool{}
	for i, n := range sc.Nodes {
		at := fmt.Sprintf("nodes[%d]", i)
		if n.Name != "" {
			at += " (" + n.Name + ")"
		}
		bad := blame(&errs, at)
		checkName(bad, n.Name, "node", validation.IsDNS1123Subdomain(n.Name), nodes[n.Name])
		nodes[n.Name] = true
		if !n.CPU.IsZero() && n.CPU.Sign() < 0 {
			bad("cpu", "must be positive, got %s", n.CPU.String())
		}
		if !n.Memory.IsZero() && n.Memory.Sign() < 0 {
			bad("memory", "must be positive, got %s", n.Memory.String())
		}
		if n.Pods < 0 {
			bad("pods", "must be positive, got %d", n.Pods)
		}
		errs = append(errs, validateLabels(at+".labels", n.Labels)...)
		for j, t := range n.Taints {
			tat := fmt.Sprintf("taints[%d]", j)
			if msgs := validation.IsQualifiedName(t.Key); len(msgs) > 0 {
				bad(tat+".key", "%q: %s", t.Key, strings.Join(msgs, "; "))
			}
			switch t.Effect {
			case corev1.TaintEffectNoSchedule, corev1.TaintEffectPreferNoSchedule, corev1.TaintEffectNoExecute:
			default:
				bad(tat+".effect", "%q: want NoSchedule, PreferNoSchedule or NoExecute", t.Effect)
			}
		}
		if n.WatchdogTimeout != nil && n.WatchdogTimeout.Duration <= 0 {
			bad("watchdogTimeout", "must be positive, got %s", n.WatchdogTimeout.Duration)
		}
	}
	if p := sc.KubeVirtPods; p != nil {
		for _, c := range []struct {
			field, component string
			nodes            []string
		}{{"virtAPI", "virt-api", p.VirtAPI}, {"virtController", "virt-controller", p.VirtController}} {
			if replicas := kubevirtReplicaSets[c.component]; len(c.nodes) > replicas {
				errs = append(errs, fmt.Errorf("kubevirtPods.%s: %d nodes for %d replicas", c.field, len(c.nodes), replicas))
			}
			for i, n := range c.nodes {
				if !nodes[n] {
					errs = append(errs, fmt.Errorf("kubevirtPods.%s[%d]: node %q is not in the scenario's nodes", c.field, i, n))
				}
			}
		}
	}
	vms := map[string]bool{}
	platform := ""
	for i, vm := range sc.VMs {
		at := fmt.Sprintf("vms[%d]", i)
		ns := vm.Namespace
		if ns == "" {
			ns = metav1.NamespaceDefault
		}
		if vm.Name != "" {
			at += " (" + ns + "/" + vm.Name + ")"
		}
		bad := blame(&errs, at)
		checkName(bad, vm.Name, "VM", validation.IsDNS1123Label(vm.Name), vms[ns+"/"+vm.Name])
		vms[ns+"/"+vm.Name] = true
		if msgs := validation.IsDNS1123Label(ns); len(msgs) > 0 {
			bad("namespace", "%q: %s", ns, strings.Join(msgs, "; "))
		}
		p := vm.platform()
		switch {
		case p != PlatformKubeVirt && p != PlatformDeckhouse:
			bad("platform", "%q: want %s or %s", vm.Platform, PlatformKubeVirt, PlatformDeckhouse)
		case platform == "":
			platform = p
		case p != platform:
			// A cluster runs KubeVirt or Deckhouse's fork of it, not both.
			bad("platform", "%s, but an earlier VM is %s: a scenario has one platform", p, platform)
		}
		if vm.CPU < 0 {
			bad("cpu", "must be positive, got %d", vm.CPU)
		}
		if !vm.Memory.IsZero() && vm.Memory.Sign() < 0 {
			bad("memory", "must be positive, got %s", vm.Memory.String())
		}
		switch p {
		case PlatformKubeVirt:
			if vm.RunPolicy != "" {
				bad("runPolicy", "is a Deckhouse field; a KubeVirt VM has runStrategy")
			}
			if vm.RunStrategy != "" && !slices.Contains(kubevirtRunStrategies, kvv1.VirtualMachineRunStrategy(vm.RunStrategy)) {
				bad("runStrategy", "%q: want one of %v", vm.RunStrategy, kubevirtRunStrategies)
			}
			if vm.EvictionStrategy != "" && !slices.Contains(kubevirtEvictionStrategies, kvv1.EvictionStrategy(vm.EvictionStrategy)) {
				bad("evictionStrategy", "%q: want one of %v", vm.EvictionStrategy, kubevirtEvictionStrategies)
			}
		case PlatformDeckhouse:
			if vm.RunStrategy != "" {
				bad("runStrategy", "is a KubeVirt field; a Deckhouse VM has runPolicy")
			}
			if vm.RunPolicy != "" && !slices.Contains(deckhouseRunPolicies, vm.RunPolicy) {
				bad("runPolicy", "%q: want one of %v", vm.RunPolicy, deckhouseRunPolicies)
			}
			if vm.EvictionStrategy != "" {
				bad("evictionStrategy", "is not a Deckhouse VirtualMachine field (Deckhouse applies LiveMigrate cluster-wide)")
			}
			if vm.Disk == nil {
				bad("disk", "required: a Deckhouse VirtualMachine has at least one block device")
			}
		}
		if d := vm.Disk; d != nil {
			if d.AccessMode != corev1.ReadWriteOnce && d.AccessMode != corev1.ReadWriteMany {
				bad("disk.accessMode", "%q: want ReadWriteOnce or ReadWriteMany", d.AccessMode)
			}
			if !d.Size.IsZero() && d.Size.Sign() < 0 {
				bad("disk.size", "must be positive, got %s", d.Size.String())
			}
		}
		if vm.DirtyRate != nil && vm.DirtyRate.Sign() < 0 {
			bad("dirtyRate", "must not be negative, got %s", vm.DirtyRate.String())
		}
		errs = append(errs, validateLabels(at+".labels", vm.Labels)...)
		if vm.Node != "" && !nodes[vm.Node] {
			bad("node", "%q is not in the scenario's nodes", vm.Node)
		}
	}
	return errors.Join(errs...)
}

var (
	kubevirtRunStrategies = []kvv1.VirtualMachineRunStrategy{
		kvv1.RunStrategyAlways, kvv1.RunStrategyRerunOnFailure, kvv1.RunStrategyManual, kvv1.RunStrategyHalted, kvv1.RunStrategyOnce,
	}
	kubevirtEvictionStrategies = []kvv1.EvictionStrategy{
		kvv1.EvictionStrategyNone, kvv1.EvictionStrategyLiveMigrate, kvv1.EvictionStrategyLiveMigrateIfPossible, kvv1.EvictionStrategyExternal,
	}
	deckhouseRunPolicies = []string{RunPolicyAlwaysOn, RunPolicyAlwaysOff, RunPolicyManual, RunPolicyAlwaysOnUnlessStoppedManually}
)

// blame returns a func that records an error of the item at (e.g. "vms[3] (default/db-1)")
// naming its field.
func blame(errs *[]error, at string) func(field, format string, args ...any) {
	return func(field, format string, args ...any) {
		*errs = append(*errs, fmt.Errorf("%s.%s: %s", at, field, fmt.Sprintf(format, args...)))
	}
}

// checkName reports a missing, invalid (the validator's messages) or repeated name.
func checkName(bad func(field, format string, args ...any), name, what string, invalid []string, repeated bool) {
	switch {
	case name == "":
		bad("name", "required")
	case len(invalid) > 0:
		bad("name", "%q is not a valid %s name: %s", name, what, strings.Join(invalid, "; "))
	case repeated:
		bad("name", "%q appears twice", name)
	}
}

func validateLabels(at string, labels map[string]string) []error {
	var errs []error
	for k, v := range labels {
		if msgs := validation.IsQualifiedName(k); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("%s: key %q: %s", at, k, strings.Join(msgs, "; ")))
		}
		if msgs := validation.IsValidLabelValue(v); len(msgs) > 0 {
			errs = append(errs, fmt.Errorf("%s[%s]: value %q: %s", at, k, v, strings.Join(msgs, "; ")))
		}
	}
	return errs
}

func (vm ScenarioVM) platform() string {
	if vm.Platform == "" {
		return PlatformKubeVirt
	}
	return vm.Platform
}

func (vm ScenarioVM) namespace() string {
	if vm.Namespace == "" {
		return metav1.NamespaceDefault
	}
	return vm.Namespace
}

// Platform is the scenario's platform: that of its VMs, PlatformKubeVirt when it has none.
func (sc *Scenario) Platform() string {
	if len(sc.VMs) == 0 {
		return PlatformKubeVirt
	}
	return sc.VMs[0].platform()
}

func (n ScenarioNode) options() NodeOptions {
	o := NodeOptions{Pods: n.Pods, Labels: n.Labels, Taints: n.Taints}
	if !n.CPU.IsZero() {
		o.CPU = n.CPU.String()
	}
	if !n.Memory.IsZero() {
		o.Memory = n.Memory.String()
	}
	if n.WatchdogTimeout != nil {
		o.WatchdogTimeout = n.WatchdogTimeout.Duration
	}
	return o
}

func (vm ScenarioVM) options() VMOptions {
	o := VMOptions{
		CPU: vm.CPU, RunStrategy: kvv1.VirtualMachineRunStrategy(vm.RunStrategy), RunPolicy: vm.RunPolicy,
		EvictionStrategy: kvv1.EvictionStrategy(vm.EvictionStrategy), Labels: vm.Labels,
	}
	if !vm.Memory.IsZero() {
		o.Memory = vm.Memory.String()
	}
	if vm.Disk != nil {
		o.Disk = vm.Name + "-disk"
	}
	if vm.DirtyRate != nil {
		o.Annotations = map[string]string{AnnotationDirtyRate: vm.DirtyRate.String()}
	}
	return o
}

// Scenario is the cluster Seed creates for o: nodes node-1..., VMs vm-1... of mixed sizes and
// run strategies (see seedMix), each with a 10Gi root disk, one in four ReadWriteOnce.
func (o SeedOptions) Scenario() *Scenario {
	platform := o.Platform
	if platform == "" {
		platform = PlatformKubeVirt
	}
	sc := &Scenario{}
	for i := 1; i <= o.Nodes; i++ {
		n := ScenarioNode{Name: fmt.Sprintf("node-%d", i), Pods: o.Node.Pods, Labels: o.Node.Labels, Taints: o.Node.Taints}
		if o.Node.CPU != "" {
			n.CPU = resource.MustParse(o.Node.CPU)
		}
		if o.Node.Memory != "" {
			n.Memory = resource.MustParse(o.Node.Memory)
		}
		if o.Node.WatchdogTimeout > 0 {
			n.WatchdogTimeout = &metav1.Duration{Duration: o.Node.WatchdogTimeout}
		}
		sc.Nodes = append(sc.Nodes, n)
	}
	for i := 0; i < o.VMs; i++ {
		mix := seedMix(i)
		vm := ScenarioVM{
			Name: fmt.Sprintf("vm-%d", i+1), Namespace: o.Namespace, Platform: platform, CPU: mix.cpu,
			Memory: resource.MustParse(mix.mem),
			Disk:   &ScenarioDisk{AccessMode: corev1.ReadWriteMany, Size: resource.MustParse("10Gi")},
		}
		if mix.rwo {
			vm.Disk.AccessMode = corev1.ReadWriteOnce
		}
		switch platform {
		case PlatformKubeVirt:
			vm.RunStrategy = string(mix.strategy)
			if mix.rwo {
				vm.EvictionStrategy = string(kvv1.EvictionStrategyLiveMigrateIfPossible)
			}
		case PlatformDeckhouse:
			vm.RunPolicy = mix.policy
		}
		sc.VMs = append(sc.VMs, vm)
	}
	return sc
}

// Configure sets in o what of the scenario the simulator needs from its start: where KubeVirt's
// pods run (Options.KubeVirtPods). Call it on the Options given to New, before SeedScenario.
func (sc *Scenario) Configure(o *Options) {
	if sc.KubeVirtPods != nil {
		o.KubeVirtPods = *sc.KubeVirtPods
	}
}

// SeedScenario creates what sc describes: namespaces, nodes, the Deckhouse configuration of
// KubeVirt when its VMs are Deckhouse's, root disk claims and VMs. A KubeVirt VM with runStrategy
// Manual gets a start request, as `virtctl start` would. A VM with a node starts there (the
// scheduler binds its first virt-launcher pod to that node; nothing is left in its spec).
// Existing objects are left as they are (and an existing VM is not placed). KubeVirt's pods are
// placed by the Options the simulator was built with (see Configure); a scenario whose
// kubevirtPods differ from them is refused.
//
// It returns an error wrapping the first failure, after which part of the scenario may exist.
func (s *Simulator) SeedScenario(ctx context.Context, sc *Scenario) (SeedResult, error) {
	var res SeedResult
	if err := sc.Validate(); err != nil {
		return res, fmt.Errorf("seed: %w", err)
	}
	if p := sc.KubeVirtPods; p != nil {
		if s.opts.NoKubeVirtPods {
			return res, errors.New("seed: the scenario places KubeVirt's pods, but the simulator runs without them (Options.NoKubeVirtPods)")
		}
		if !slices.Equal(p.VirtAPI, s.opts.KubeVirtPods.VirtAPI) || !slices.Equal(p.VirtController, s.opts.KubeVirtPods.VirtController) {
			return res, fmt.Errorf("seed: the scenario places KubeVirt's pods (%+v), the simulator was started with %+v: pass the scenario's to New (Scenario.Configure)",
				*p, s.opts.KubeVirtPods)
		}
	}
	platform := sc.Platform()
	namespaces := map[string]bool{}
	for _, vm := range sc.VMs {
		if ns := vm.namespace(); !namespaces[ns] {
			namespaces[ns] = true
			if err := s.ensureNamespace(ctx, ns); err != nil {
				return res, fmt.Errorf("seed: %w", err)
			}
		}
	}
	if err := parallel(ctx, len(sc.Nodes), func(i int) error {
		_, err := s.CreateNode(ctx, NewNode(sc.Nodes[i].Name, sc.Nodes[i].options()))
		return err
	}); err != nil {
		return res, fmt.Errorf("seed: %w", err)
	}
	for _, n := range sc.Nodes {
		res.Nodes = append(res.Nodes, n.Name)
	}
	if platform == PlatformDeckhouse {
		if err := s.configureDeckhouse(ctx, len(sc.Nodes)); err != nil {
			return res, fmt.Errorf("seed: %w", err)
		}
	}
	if err := parallel(ctx, len(sc.VMs), func(i int) error { return s.createScenarioVM(ctx, sc.VMs[i]) }); err != nil {
		return res, fmt.Errorf("seed: %w", err)
	}
	for _, vm := range sc.VMs {
		res.VMs = append(res.VMs, vm.Name)
	}
	return res, nil
}

// seedWorkers bounds the API calls SeedScenario makes at once.
const seedWorkers = 16

// parallel calls f(0..n-1), seedWorkers at a time, and returns their errors joined; after the
// first error or the end of ctx it starts no more calls.
func parallel(ctx context.Context, n int, f func(i int) error) error {
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
	)
	sem := make(chan struct{}, seedWorkers)
	for i := 0; i < n; i++ {
		mu.Lock()
		failed := len(errs) > 0
		mu.Unlock()
		if failed || ctx.Err() != nil {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			if err := f(i); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(errs) == 0 && ctx.Err() != nil {
		return ctx.Err()
	}
	return errors.Join(errs...)
}

// createScenarioVM creates the disk claim and the VM; an existing VM is left alone.
func (s *Simulator) createScenarioVM(ctx context.Context, vm ScenarioVM) error {
	ns, o := vm.namespace(), vm.options()
	if d := vm.Disk; d != nil {
		size := "10Gi"
		if !d.Size.IsZero() {
			size = d.Size.String()
		}
		_, err := s.Kube.CoreV1().PersistentVolumeClaims(ns).Create(ctx, NewPVC(ns, o.Disk, size, d.AccessMode), metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create pvc %s/%s: %w", ns, o.Disk, err)
		}
	}
	key := ns + "/" + vm.Name
	if vm.Node != "" {
		s.scheduler.placements.placeVMI(key, vm.Node)
	}
	var err error
	switch vm.platform() {
	case PlatformKubeVirt:
		_, err = s.KubeVirt.VirtualMachines(ns).Create(ctx, NewKubeVirtVM(ns, vm.Name, o), metav1.CreateOptions{})
	case PlatformDeckhouse:
		_, err = s.Dynamic.Resource(DeckhouseVMGVR).Namespace(ns).Create(ctx, NewDeckhouseVM(ns, vm.Name, o), metav1.CreateOptions{})
	}
	if apierrors.IsAlreadyExists(err) {
		s.scheduler.placements.placeVMI(key, "") // it runs, or ran, where it is: not moved by a scenario
		return nil
	}
	if err != nil {
		s.scheduler.placements.placeVMI(key, "")
		return fmt.Errorf("create %s vm %s: %w", vm.platform(), key, err)
	}
	if vm.platform() == PlatformKubeVirt && o.RunStrategy == kvv1.RunStrategyManual {
		return s.StartKubeVirtVM(ctx, ns, vm.Name)
	}
	return nil
}
