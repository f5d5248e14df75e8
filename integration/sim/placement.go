package sim

import (
	"sync"

	corev1 "k8s.io/api/core/v1"
	kvv1 "kubevirt.io/api/core/v1"
)

// placements pin the first virt-launcher pod of the VMIs a scenario places (SeedScenario) to
// their nodes, in the scheduler and nowhere in the API. A pin is used once, when its pod is
// bound; what is scheduled later (a restarted VM, a migration target) goes wherever the
// scheduler puts it.
type placements struct {
	mu  sync.Mutex
	vmi map[string]string // namespace/VMI name -> node
}

func newPlacements() *placements {
	return &placements{vmi: map[string]string{}}
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

// pinned returns the node p must be bound to, "" when it is not pinned.
func (pl *placements) pinned(p *corev1.Pod) string {
	if !isLauncher(p) || p.Labels[kvv1.MigrationJobLabel] != "" {
		return ""
	}
	pl.mu.Lock()
	defer pl.mu.Unlock()
	return pl.vmi[p.Namespace+"/"+p.Annotations[kvv1.DomainAnnotation]]
}

// bound uses the pin of p, bound to node.
func (pl *placements) bound(p *corev1.Pod, node string) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	key := p.Namespace + "/" + p.Annotations[kvv1.DomainAnnotation]
	if pl.vmi[key] == node {
		delete(pl.vmi, key)
	}
}
