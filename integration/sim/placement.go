package sim

import (
	"slices"
	"sync"

	corev1 "k8s.io/api/core/v1"
	kvv1 "kubevirt.io/api/core/v1"
)

// placements pin the pods a scenario places (SeedScenario) to their nodes, in the scheduler
// and nowhere in the API: the first virt-launcher pod of a VMI, and the replicas of KubeVirt's
// virt-api and virt-controller that are not scheduled yet. A pin is used once, when its pod is
// bound; what is scheduled later (a restarted VM, a migration target, a recreated replica) goes
// wherever the scheduler puts it.
type placements struct {
	mu        sync.Mutex
	vmi       map[string]string   // namespace/VMI name -> node
	component map[string][]string // namespace/component -> nodes, one per replica to place
}

func newPlacements() *placements {
	return &placements{vmi: map[string]string{}, component: map[string][]string{}}
}

// placeVMI pins the first virt-launcher pod of VMI key (namespace/name) to node; "" unpins it.
func (pl *placements) placeVMI(key, node string) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if node == "" {
		delete(pl.vmi, key)
		return
	}
	pl.vmi[key] = node
}

// placeComponent pins the replicas of component (virt-api, virt-controller) in ns that are not
// bound yet to nodes; bound lists the nodes of the replicas already bound, whose pins are used.
func (pl *placements) placeComponent(ns, component string, nodes, bound []string) {
	nodes = slices.Clone(nodes)
	for _, b := range bound {
		if len(nodes) == 0 {
			break
		}
		i := slices.Index(nodes, b)
		if i < 0 {
			i = 0
		}
		nodes = slices.Delete(nodes, i, i+1)
	}
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if len(nodes) == 0 {
		delete(pl.component, ns+"/"+component)
		return
	}
	pl.component[ns+"/"+component] = nodes
}

// pinned returns the nodes p may be bound to, nil when it is not pinned.
func (pl *placements) pinned(p *corev1.Pod) []string {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if isLauncher(p) {
		if p.Labels[kvv1.MigrationJobLabel] != "" {
			return nil
		}
		if n, ok := pl.vmi[p.Namespace+"/"+p.Annotations[kvv1.DomainAnnotation]]; ok {
			return []string{n}
		}
		return nil
	}
	if c := p.Labels[kvv1.AppLabel]; c != "" {
		return slices.Clone(pl.component[p.Namespace+"/"+c])
	}
	return nil
}

// bound uses the pin of p, bound to node.
func (pl *placements) bound(p *corev1.Pod, node string) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if isLauncher(p) {
		key := p.Namespace + "/" + p.Annotations[kvv1.DomainAnnotation]
		if pl.vmi[key] == node && p.Labels[kvv1.MigrationJobLabel] == "" {
			delete(pl.vmi, key)
		}
		return
	}
	key := p.Namespace + "/" + p.Labels[kvv1.AppLabel]
	nodes := pl.component[key]
	if i := slices.Index(nodes, node); i >= 0 {
		nodes = slices.Delete(slices.Clone(nodes), i, i+1)
		if len(nodes) == 0 {
			delete(pl.component, key)
		} else {
			pl.component[key] = nodes
		}
	}
}

// placeKubeVirtPods pins the replicas of virt-api and virt-controller that are not bound yet.
func (s *Simulator) placeKubeVirtPods(p *ScenarioKubeVirtPods) {
	ns := s.opts.KubeVirtNamespace
	for component, nodes := range map[string][]string{"virt-api": p.VirtAPI, "virt-controller": p.VirtController} {
		var bound []string
		for _, pod := range s.podsOf(ns, component) {
			if pod.Spec.NodeName != "" && pod.DeletionTimestamp == nil && !isTerminal(pod) {
				bound = append(bound, pod.Spec.NodeName)
			}
		}
		if len(bound) > 0 {
			s.log.Warn().Str("component", component).Strs("bound", bound).Strs("want", nodes).
				Msg("seed: replicas already scheduled keep their nodes; the scenario places the others")
		}
		s.scheduler.placements.placeComponent(ns, component, nodes, bound)
	}
}
