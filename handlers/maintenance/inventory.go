package maintenance

import (
	"time"

	corev1 "k8s.io/api/core/v1"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/handlers/platform"
)

// TaintKey is the taint drover puts on a node in maintenance, valued with
// the request id: drover.io/maintenance=<request id>:NoSchedule.
const TaintKey = "drover.io/maintenance"

// inventory reads what Make needs from the cluster's caches.
func inventory(c *platform.Cluster, node, mode string, force bool, ownOp string) Input {
	cfg := c.KubeVirtConfig()
	corr, restartCorr, samples := c.Estimator.Corrections()
	opts := c.Options()
	bw := cfg.Bandwidth
	if bw <= 0 {
		bw = opts.Bandwidth
	}
	in := Input{Node: node, Mode: mode, Force: force,
		Limits:                  Limits{PerCluster: cfg.Limits.PerCluster, PerNode: cfg.Limits.PerNode},
		ClusterEvictionStrategy: cfg.EvictionStrategy,
		Model: Model{Bandwidth: bw, Overhead: opts.Overhead, Correction: corr,
			RestartTime: time.Duration(float64(opts.RestartTime) * restartCorr), Samples: samples},
	}
	for _, vmi := range c.VMIsOn(node) {
		in.VMs = append(in.VMs, vmOf(c, vmi, node))
	}
	ownHash := platform.OpHash(ownOp)
	ours := map[string]bool{}
	for _, m := range c.MigrationsOf(ownOp) {
		if m.Operation == ownHash {
			ours[m.Namespace+"/"+m.VM] = true
		}
	}
	for vm, src := range c.OpenMigrations() {
		if ours[vm] {
			continue
		}
		in.InFlightCluster++
		if src == node {
			in.InFlightNode++
		}
	}
	for _, n := range c.Nodes() {
		if n.Name == node {
			continue
		}
		pn := Node{Name: n.Name, Labels: n.Labels, Taints: n.Spec.Taints, Unschedulable: n.Spec.Unschedulable,
			Ready: nodeReady(n), Allocatable: allocatable(n)}
		for _, t := range n.Spec.Taints {
			if t.Key == TaintKey {
				pn.Maintenance = t.Value
			}
		}
		for _, p := range c.PodsOn(n.Name) {
			if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
				continue
			}
			pn.Used = pn.Used.plus(podRequests(p))
		}
		in.Others = append(in.Others, pn)
		if pn.Maintenance != "" {
			for _, vmi := range c.VMIsOn(n.Name) {
				if v := vmOf(c, vmi, n.Name); v.Running {
					in.Displaced = append(in.Displaced, v)
				}
			}
		}
	}
	return in
}

// vmOf describes a VMI on node for the plan.
func vmOf(c *platform.Cluster, vmi *kvv1.VirtualMachineInstance, node string) VM {
	v := VM{Namespace: vmi.Namespace, Name: vmi.Name,
		Running:     vmi.Status.Phase == kvv1.Running && vmi.DeletionTimestamp == nil,
		RunStrategy: c.RunStrategy(vmi, vmi.Namespace, vmi.Name)}
	if m := vmi.Spec.Domain.Memory; m != nil && m.Guest != nil {
		v.GuestMemory = m.Guest.Value()
	} else if q, ok := vmi.Spec.Domain.Resources.Requests[corev1.ResourceMemory]; ok {
		v.GuestMemory = q.Value()
	}
	v.Migratable, v.NotMigratableReason = platform.Migratable(vmi)
	if vmi.Spec.EvictionStrategy != nil {
		v.EvictionStrategy = string(*vmi.Spec.EvictionStrategy)
	}
	v.Strategy = vmi.Labels[LabelStrategy]
	if vm := c.VM(vmi.Namespace, vmi.Name); vm != nil && vm.Labels[LabelStrategy] != "" {
		v.Strategy = vm.Labels[LabelStrategy]
	}
	if dvm := c.DeckhouseVM(vmi.Namespace, vmi.Name); dvm != nil && dvm.GetLabels()[LabelStrategy] != "" {
		v.Strategy = dvm.GetLabels()[LabelStrategy]
	}
	// A migration's target pod already bound to another node holds the VM's
	// room there (before hand-off the VMI does not name it yet).
	for _, p := range c.LauncherPods(vmi) {
		if p.Spec.NodeName != "" && p.Spec.NodeName != node && p.DeletionTimestamp == nil &&
			p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			v.Target = p.Spec.NodeName
		}
	}
	if st := vmi.Status.MigrationState; st != nil && !st.Completed && st.TargetNode != "" && st.TargetNode != node {
		v.Target = st.TargetNode
	} else if st != nil && st.Completed && st.Failed && !st.AbortRequested {
		v.LastMigrationFailed = st.FailureReason
		if v.LastMigrationFailed == "" {
			v.LastMigrationFailed = "failed"
		}
	}
	// Where the VM may go is what its VMI says, as KubeVirt renders it into a
	// launcher pod (plus kubevirt.io/schedulable); the current pod may carry
	// a migration's added selector or a pin to the node it left.
	sel := map[string]string{kvv1.NodeSchedulable: "true"}
	for k, val := range vmi.Spec.NodeSelector {
		sel[k] = val
	}
	v.Placement = Placement{NodeSelector: sel, Affinity: withoutHostPinning(vmi.Spec.Affinity), Tolerations: vmi.Spec.Tolerations}
	if pod := launcher(c, vmi, node); pod != nil {
		v.Requests = podRequests(pod)
	} else {
		v.Requests = Resources{Pods: 1}
		if q, ok := vmi.Spec.Domain.Resources.Requests[corev1.ResourceMemory]; ok {
			v.Requests.MemoryBytes = q.Value()
		}
		if q, ok := vmi.Spec.Domain.Resources.Requests[corev1.ResourceCPU]; ok {
			v.Requests.CPUMilli = q.MilliValue()
		}
	}
	return v
}

// withoutHostPinning drops the requirements on a node's name from a pod's
// required node affinity (a migration target pod must avoid its source, a
// scheduler may pin): the VM's next place is decided anew. Terms left empty
// are dropped, and the affinity with them when none is left.
func withoutHostPinning(a *corev1.Affinity) *corev1.Affinity {
	if a == nil || a.NodeAffinity == nil || a.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution == nil {
		return a
	}
	out := a.DeepCopy()
	req := out.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution
	var terms []corev1.NodeSelectorTerm
	for _, t := range req.NodeSelectorTerms {
		var fields []corev1.NodeSelectorRequirement
		for _, f := range t.MatchFields {
			if f.Key != "metadata.name" {
				fields = append(fields, f)
			}
		}
		t.MatchFields = fields
		if len(t.MatchExpressions) > 0 || len(t.MatchFields) > 0 {
			terms = append(terms, t)
		}
	}
	if len(terms) == 0 {
		out.NodeAffinity.RequiredDuringSchedulingIgnoredDuringExecution = nil
	} else {
		req.NodeSelectorTerms = terms
	}
	return out
}

// launcher returns the VMI's virt-launcher pod on node, nil if none.
func launcher(c *platform.Cluster, vmi *kvv1.VirtualMachineInstance, node string) *corev1.Pod {
	for _, p := range c.PodsOn(node) {
		if p.Labels[kvv1.CreatedByLabel] == string(vmi.UID) && p.DeletionTimestamp == nil &&
			p.Status.Phase != corev1.PodSucceeded && p.Status.Phase != corev1.PodFailed {
			return p
		}
	}
	return nil
}

func podRequests(p *corev1.Pod) Resources {
	r := Resources{Pods: 1}
	for _, ctr := range p.Spec.Containers {
		if q, ok := ctr.Resources.Requests[corev1.ResourceCPU]; ok {
			r.CPUMilli += q.MilliValue()
		}
		if q, ok := ctr.Resources.Requests[corev1.ResourceMemory]; ok {
			r.MemoryBytes += q.Value()
		}
	}
	return r
}

func allocatable(n *corev1.Node) Resources {
	r := Resources{}
	if q, ok := n.Status.Allocatable[corev1.ResourceCPU]; ok {
		r.CPUMilli = q.MilliValue()
	}
	if q, ok := n.Status.Allocatable[corev1.ResourceMemory]; ok {
		r.MemoryBytes = q.Value()
	}
	if q, ok := n.Status.Allocatable[corev1.ResourcePods]; ok {
		r.Pods = q.Value()
	} else {
		r.Pods = 110
	}
	return r
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}
