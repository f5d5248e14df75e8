package sim

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
)

// Platforms Seed can create VMs for.
const (
	PlatformKubeVirt  = "kubevirt"
	PlatformDeckhouse = "deckhouse"
)

// NodeOptions describe a simulated node.
type NodeOptions struct {
	CPU    string // allocatable CPU, default "16"
	Memory string // allocatable memory, default "64Gi"
	Pods   int    // allocatable pods, default 110
	Labels map[string]string
	Taints []corev1.Taint
	// WatchdogTimeout arms the node's watchdog (LabelWatchdogTimeout); 0: none.
	WatchdogTimeout time.Duration
}

// NewNode builds a Node as a kubelet registers it: capacity and
// allocatable, the usual labels, kubevirt.io/schedulable=true, an address.
func NewNode(name string, o NodeOptions) *corev1.Node {
	if o.CPU == "" {
		o.CPU = "16"
	}
	if o.Memory == "" {
		o.Memory = "64Gi"
	}
	if o.Pods == 0 {
		o.Pods = 110
	}
	labels := map[string]string{
		labelHostname: name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
		kvv1.NodeSchedulable: "true", LabelManaged: "true",
	}
	for k, v := range o.Labels {
		labels[k] = v
	}
	if o.WatchdogTimeout > 0 {
		labels[LabelWatchdogTimeout] = o.WatchdogTimeout.String()
	}
	res := corev1.ResourceList{
		corev1.ResourceCPU:    resource.MustParse(o.CPU),
		corev1.ResourceMemory: resource.MustParse(o.Memory),
		corev1.ResourcePods:   *resource.NewQuantity(int64(o.Pods), resource.DecimalSI),
	}
	h := 0
	for _, c := range name {
		h = (h*31 + int(c)) % 200
	}
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec:       corev1.NodeSpec{Taints: o.Taints},
		Status: corev1.NodeStatus{
			Capacity: res, Allocatable: res,
			Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: fmt.Sprintf("192.168.%d.%d", 1+h/100, 10+h%100)}, {Type: corev1.NodeHostName, Address: name}},
			NodeInfo:  corev1.NodeSystemInfo{KubeletVersion: "v1.34.4", OperatingSystem: "linux", Architecture: "amd64", ContainerRuntimeVersion: "containerd://2.1.0"},
		},
	}
}

// CreateNode registers node, as its kubelet would on first start.
func (s *Simulator) CreateNode(ctx context.Context, node *corev1.Node) (*corev1.Node, error) {
	status := node.Status
	created, err := s.Kube.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return s.Kube.CoreV1().Nodes().Get(ctx, node.Name, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("create node %s: %w", node.Name, err)
	}
	if len(created.Status.Allocatable) == 0 {
		created.Status = status
		if created, err = s.Kube.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
			return nil, fmt.Errorf("create node %s: post status: %w", node.Name, err)
		}
	}
	return created, nil
}

// VMOptions describe a simulated VM for NewKubeVirtVM and NewDeckhouseVM.
type VMOptions struct {
	CPU    int    // vCPUs, default 1
	Memory string // guest memory, default "1Gi"
	// RunStrategy (KubeVirt, default Always) or RunPolicy (Deckhouse,
	// default AlwaysOnUnlessStoppedManually).
	RunStrategy kvv1.VirtualMachineRunStrategy
	RunPolicy   string
	// Disk names a PersistentVolumeClaim used as the root disk; "" for none.
	Disk string
	// BridgeOnPodNetwork binds the pod network with bridge (not live-migratable).
	BridgeOnPodNetwork bool
	// EvictionStrategy, default LiveMigrate.
	EvictionStrategy kvv1.EvictionStrategy
	NodeSelector     map[string]string
	Tolerations      []corev1.Toleration
	Labels           map[string]string
	// Annotations go where the VMI inherits them from (the KubeVirt VM's
	// template, the Deckhouse VM's metadata), e.g. AnnotationDirtyRate.
	Annotations map[string]string
}

// NewKubeVirtVM builds a kubevirt.io/v1 VirtualMachine.
func NewKubeVirtVM(ns, name string, o VMOptions) *kvv1.VirtualMachine {
	if o.CPU == 0 {
		o.CPU = 1
	}
	if o.Memory == "" {
		o.Memory = "1Gi"
	}
	if o.RunStrategy == "" {
		o.RunStrategy = kvv1.RunStrategyAlways
	}
	if o.EvictionStrategy == "" {
		o.EvictionStrategy = kvv1.EvictionStrategyLiveMigrate
	}
	mem := resource.MustParse(o.Memory)
	iface := kvv1.Interface{Name: "default", InterfaceBindingMethod: kvv1.InterfaceBindingMethod{Masquerade: &kvv1.InterfaceMasquerade{}}}
	if o.BridgeOnPodNetwork {
		iface.InterfaceBindingMethod = kvv1.InterfaceBindingMethod{Bridge: &kvv1.InterfaceBridge{}}
	}
	labels := map[string]string{"kubevirt.io/vm": name}
	for k, v := range o.Labels {
		labels[k] = v
	}
	spec := kvv1.VirtualMachineInstanceSpec{
		Domain: kvv1.DomainSpec{
			CPU:       &kvv1.CPU{Cores: uint32(o.CPU), Sockets: 1, Threads: 1},
			Memory:    &kvv1.Memory{Guest: &mem},
			Resources: kvv1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceMemory: mem}},
			Devices:   kvv1.Devices{Interfaces: []kvv1.Interface{iface}},
		},
		Networks:                      []kvv1.Network{{Name: "default", NetworkSource: kvv1.NetworkSource{Pod: &kvv1.PodNetwork{}}}},
		EvictionStrategy:              ptr.To(o.EvictionStrategy),
		NodeSelector:                  o.NodeSelector,
		Tolerations:                   o.Tolerations,
		TerminationGracePeriodSeconds: ptr.To(int64(30)),
	}
	if o.Disk != "" {
		spec.Volumes = []kvv1.Volume{{Name: "rootdisk", VolumeSource: kvv1.VolumeSource{PersistentVolumeClaim: &kvv1.PersistentVolumeClaimVolumeSource{
			PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: o.Disk},
		}}}}
		spec.Domain.Devices.Disks = []kvv1.Disk{{Name: "rootdisk", DiskDevice: kvv1.DiskDevice{Disk: &kvv1.DiskTarget{Bus: kvv1.DiskBusVirtio}}}}
	}
	vmLabels := map[string]string{LabelManaged: "true"}
	for k, v := range o.Labels {
		vmLabels[k] = v
	}
	return &kvv1.VirtualMachine{
		TypeMeta:   metav1.TypeMeta{APIVersion: kvv1.SchemeGroupVersion.String(), Kind: "VirtualMachine"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: vmLabels},
		Spec: kvv1.VirtualMachineSpec{
			RunStrategy: ptr.To(o.RunStrategy),
			Template:    &kvv1.VirtualMachineInstanceTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels, Annotations: o.Annotations}, Spec: spec},
		},
	}
}

// NewDeckhouseVM builds a virtualization.deckhouse.io/v1alpha2 VirtualMachine.
func NewDeckhouseVM(ns, name string, o VMOptions) *unstructured.Unstructured {
	if o.CPU == 0 {
		o.CPU = 1
	}
	if o.Memory == "" {
		o.Memory = "1Gi"
	}
	if o.RunPolicy == "" {
		o.RunPolicy = RunPolicyAlwaysOnUnlessStoppedManually
	}
	spec := map[string]any{
		"virtualMachineClassName": "generic",
		"runPolicy":               o.RunPolicy,
		"cpu":                     map[string]any{"cores": int64(o.CPU), "coreFraction": "100%"},
		"memory":                  map[string]any{"size": o.Memory},
		"blockDeviceRefs":         []any{},
		"liveMigrationPolicy":     "PreferSafe",
	}
	if o.Disk != "" {
		spec["blockDeviceRefs"] = []any{map[string]any{"kind": "VirtualDisk", "name": o.Disk}}
	}
	if len(o.NodeSelector) > 0 {
		ns := map[string]any{}
		for k, v := range o.NodeSelector {
			ns[k] = v
		}
		spec["nodeSelector"] = ns
	}
	if len(o.Tolerations) > 0 {
		raw, _ := json.Marshal(o.Tolerations)
		var tol []any
		_ = json.Unmarshal(raw, &tol)
		spec["tolerations"] = tol
	}
	labels := map[string]any{LabelManaged: "true"}
	for k, v := range o.Labels {
		labels[k] = v
	}
	meta := map[string]any{"name": name, "namespace": ns, "labels": labels}
	if len(o.Annotations) > 0 {
		ann := map[string]any{}
		for k, v := range o.Annotations {
			ann[k] = v
		}
		meta["annotations"] = ann
	}
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": deckhouseAPIVersion, "kind": "VirtualMachine", "metadata": meta, "spec": spec,
	}}
}

// NewPVC builds a claim of size with one access mode.
func NewPVC(ns, name, size string, mode corev1.PersistentVolumeAccessMode) *corev1.PersistentVolumeClaim {
	return &corev1.PersistentVolumeClaim{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{LabelManaged: "true"}},
		Spec: corev1.PersistentVolumeClaimSpec{
			AccessModes: []corev1.PersistentVolumeAccessMode{mode},
			Resources:   corev1.VolumeResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceStorage: resource.MustParse(size)}},
			VolumeMode:  ptr.To(corev1.PersistentVolumeBlock),
		},
	}
}

// CreateKubeVirtVM creates vm; a Manual VM also gets a start request, as
// `virtctl start` would.
func (s *Simulator) CreateKubeVirtVM(ctx context.Context, vm *kvv1.VirtualMachine) (*kvv1.VirtualMachine, error) {
	created, err := s.KubeVirt.VirtualMachines(vm.Namespace).Create(ctx, vm, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("create vm %s/%s: %w", vm.Namespace, vm.Name, err)
	}
	return created, nil
}

// StartKubeVirtVM asks for VM ns/name to start, as `virtctl start` does
// through virt-api: a Start state change request in its status.
func (s *Simulator) StartKubeVirtVM(ctx context.Context, ns, name string) error {
	return s.stateChange(ctx, ns, name, kvv1.VirtualMachineStateChangeRequest{Action: kvv1.StartRequest})
}

// StopKubeVirtVM asks for VM ns/name to stop, as `virtctl stop` does.
func (s *Simulator) StopKubeVirtVM(ctx context.Context, ns, name string) error {
	vmi, err := s.KubeVirt.VirtualMachineInstances(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("stop vm %s/%s: %w", ns, name, err)
	}
	return s.stateChange(ctx, ns, name, kvv1.VirtualMachineStateChangeRequest{Action: kvv1.StopRequest, UID: ptr.To(vmi.UID)})
}

func (s *Simulator) stateChange(ctx context.Context, ns, name string, req kvv1.VirtualMachineStateChangeRequest) error {
	vm, err := s.mutateVM(ctx, ns, name, true, func(v *kvv1.VirtualMachine) bool {
		v.Status.StateChangeRequests = append(v.Status.StateChangeRequests, req)
		return true
	})
	if err != nil {
		return fmt.Errorf("vm %s/%s: %s request: %w", ns, name, req.Action, err)
	}
	if vm == nil {
		return fmt.Errorf("vm %s/%s: %w", ns, name, apierrors.NewNotFound(kvv1.Resource("virtualmachines"), name))
	}
	return nil
}

// SeedOptions say what Seed creates.
type SeedOptions struct {
	Nodes     int
	VMs       int
	Platform  string // PlatformKubeVirt (default) or PlatformDeckhouse
	Namespace string // default "default"
	Node      NodeOptions
}

// SeedResult names what Seed created.
type SeedResult struct {
	Nodes []string
	VMs   []string
}

type seedVM struct {
	cpu      int
	mem      string
	strategy kvv1.VirtualMachineRunStrategy
	policy   string
	rwo      bool
}

// seedMix cycles sizes, run strategies and disks: one VM in four has an
// RWO disk (not live-migratable).
func seedMix(i int) seedVM {
	sizes := []struct {
		cpu int
		mem string
	}{{1, "1Gi"}, {2, "2Gi"}, {2, "4Gi"}, {4, "8Gi"}, {1, "2Gi"}, {2, "1Gi"}}
	strategies := []kvv1.VirtualMachineRunStrategy{kvv1.RunStrategyAlways, kvv1.RunStrategyRerunOnFailure, kvv1.RunStrategyAlways, kvv1.RunStrategyManual, kvv1.RunStrategyAlways, kvv1.RunStrategyHalted}
	policies := []string{RunPolicyAlwaysOnUnlessStoppedManually, RunPolicyAlwaysOn, RunPolicyAlwaysOnUnlessStoppedManually, RunPolicyManual, RunPolicyAlwaysOn, RunPolicyAlwaysOff}
	sz := sizes[i%len(sizes)]
	return seedVM{cpu: sz.cpu, mem: sz.mem, strategy: strategies[i%len(strategies)], policy: policies[i%len(policies)], rwo: i%4 == 3}
}

// Seed creates opts.Nodes nodes (node-1...) and opts.VMs VMs (vm-1...) of
// mixed sizes and run strategies, each with a 10Gi root disk claim: the
// scenario opts.Scenario() describes, seeded by SeedScenario. Existing
// objects are left as they are.
func (s *Simulator) Seed(ctx context.Context, opts SeedOptions) (SeedResult, error) {
	if opts.Platform != "" && opts.Platform != PlatformKubeVirt && opts.Platform != PlatformDeckhouse {
		return SeedResult{}, fmt.Errorf("seed: unknown platform %q", opts.Platform)
	}
	return s.SeedScenario(ctx, opts.Scenario())
}

// configureDeckhouse makes KubeVirt Deckhouse's fork (AnnotationPlatform)
// and sets the configuration Deckhouse virtualization applies cluster-wide
// (templates/kubevirt/kubevirt.yaml, with the defaults of
// images/hooks/pkg/hooks/migration-config/hook.go): evictionStrategy
// LiveMigrate, bandwidthPerMigration 640Mi, completionTimeoutPerGiB 800,
// one outbound migration per node, max(2, nodes) migrations in the cluster.
func (s *Simulator) configureDeckhouse(ctx context.Context, nodes int) error {
	if err := s.ensureKubeVirtCR(ctx); err != nil {
		return err
	}
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}},"spec":{"configuration":{"evictionStrategy":"LiveMigrate","migrations":{`+
		`"bandwidthPerMigration":"640Mi","completionTimeoutPerGiB":800,"parallelOutboundMigrationsPerNode":1,"parallelMigrationsPerCluster":%d}}}}`,
		AnnotationPlatform, PlatformDeckhouse, max(2, nodes))
	list, err := s.KubeVirt.KubeVirts(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("list KubeVirt CRs: %w", err)
	}
	for _, kv := range list.Items {
		if _, err := s.KubeVirt.KubeVirts(kv.Namespace).Patch(ctx, kv.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			return fmt.Errorf("configure KubeVirt CR %s/%s as Deckhouse does: %w", kv.Namespace, kv.Name, err)
		}
	}
	return nil
}

// SetFault sets (or, with fault "", removes) the AnnotationFault of node.
func (s *Simulator) SetFault(ctx context.Context, node, fault string) error {
	v := "null"
	if fault != "" {
		v = fmt.Sprintf("%q", fault)
	}
	patch := []byte(fmt.Sprintf(`{"metadata":{"annotations":{%q:%s}}}`, AnnotationFault, v))
	if _, err := s.Kube.CoreV1().Nodes().Patch(ctx, node, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("set fault %q on node %s: %w", fault, node, err)
	}
	return nil
}
