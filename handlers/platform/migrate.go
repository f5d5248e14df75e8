package platform

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/schemas"
)

// Deckhouse VirtualMachineOperation types and phases drover uses.
const (
	VMOPEvict   = "Evict"
	VMOPMigrate = "Migrate"
	VMOPStart   = "Start"
	VMOPStop    = "Stop"
	VMOPRestart = "Restart"

	vmopCompleted = "Completed"
	vmopFailed    = "Failed"
)

// Migration is a migration object (KubeVirt's VirtualMachineInstanceMigration
// or Deckhouse's VirtualMachineOperation of type Evict or Migrate) as the
// workflows see it.
type Migration struct {
	Platform  string
	Namespace string
	Name      string
	// VM is the VMI's (and VM's) name.
	VM    string
	Phase string
	// Final: Succeeded or Failed. Succeeded: the VM moved.
	Final     bool
	Succeeded bool
	// Deleting: deleted, its abort still under way.
	Deleting bool
	// Started: past Pending (it holds a migration slot).
	Started bool
	// Reason says why it failed.
	Reason string
	// Operation is the drover operation hash that created it, "" for others'.
	Operation string
	Created   time.Time
}

// Key is namespace/name of the migration object.
func (m Migration) Key() string { return m.Namespace + "/" + m.Name }

// OpHash is the label value naming an operation on what it creates.
func OpHash(op string) string { return schemas.DeterministicID(op)[:16] }

// MigrationName is the name of the attempt-th migration object an operation
// creates for VM vm: derived from the operation, so that a re-run finds it
// and a second replica cannot create a twin.
func MigrationName(op, vm string, attempt int) string {
	return ObjectName(op, vm, strconv.Itoa(attempt))
}

// ObjectName names an object drover creates for op about vm with a suffix.
func ObjectName(op, vm, suffix string) string {
	v := vm
	if len(v) > 200 {
		v = v[:200] + "-" + schemas.DeterministicID(vm)[:8]
	}
	return strings.TrimSuffix(fmt.Sprintf("drover-%s-%s-%s", OpHash(op)[:10], v, suffix), "-")
}

func vmimToMigration(m *kvv1.VirtualMachineInstanceMigration) Migration {
	out := Migration{Platform: KubeVirt, Namespace: m.Namespace, Name: m.Name, VM: m.Spec.VMIName, Phase: string(m.Status.Phase),
		Operation: m.Labels[LabelOperation], Created: m.CreationTimestamp.Time, Deleting: m.DeletionTimestamp != nil}
	switch m.Status.Phase {
	case kvv1.MigrationSucceeded:
		out.Final, out.Succeeded = true, true
	case kvv1.MigrationFailed:
		out.Final = true
		out.Reason = "migration failed"
		if st := m.Status.MigrationState; st != nil && st.FailureReason != "" {
			out.Reason = st.FailureReason
		}
		for _, c := range m.Status.Conditions {
			if c.Type == kvv1.VirtualMachineInstanceMigrationAbortRequested && c.Status == corev1.ConditionTrue {
				out.Reason = "aborted: " + out.Reason
			}
		}
	case kvv1.MigrationPhaseUnset, kvv1.MigrationPending:
	default:
		out.Started = true
	}
	return out
}

func vmopToMigration(u *unstructured.Unstructured) (Migration, bool) {
	typ, _, _ := unstructured.NestedString(u.Object, "spec", "type")
	vm, _, _ := unstructured.NestedString(u.Object, "spec", "virtualMachineName")
	phase, _, _ := unstructured.NestedString(u.Object, "status", "phase")
	out := Migration{Platform: Deckhouse, Namespace: u.GetNamespace(), Name: u.GetName(), VM: vm, Phase: phase,
		Operation: u.GetLabels()[LabelOperation], Created: u.GetCreationTimestamp().Time, Deleting: u.GetDeletionTimestamp() != nil}
	switch phase {
	case vmopCompleted:
		out.Final, out.Succeeded = true, true
	case vmopFailed:
		out.Final = true
		out.Reason = vmopReason(u)
	case "InProgress":
		out.Started = true
	}
	return out, typ == VMOPEvict || typ == VMOPMigrate
}

// vmopReason is the Completed condition's reason and message.
func vmopReason(u *unstructured.Unstructured) string {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, ok := c.(map[string]any)
		if !ok || m["type"] != "Completed" {
			continue
		}
		reason, _ := m["reason"].(string)
		msg, _ := m["message"].(string)
		if msg != "" {
			return reason + ": " + msg
		}
		return reason
	}
	return "operation failed"
}

// MigrationsForVM returns every migration object of the VM ns/name (both
// platforms), oldest first.
func (c *Cluster) MigrationsForVM(ns, name string) []Migration {
	var out []Migration
	objs, _ := c.vmims.GetIndexer().ByIndex(byVMI, ns+"/"+name)
	for _, o := range objs {
		out = append(out, vmimToMigration(o.(*kvv1.VirtualMachineInstanceMigration)))
	}
	if c.vmops != nil {
		objs, _ := c.vmops.GetIndexer().ByIndex(byVM, ns+"/"+name)
		for _, o := range objs {
			if m, ok := vmopToMigration(o.(*unstructured.Unstructured)); ok {
				out = append(out, m)
			}
		}
	}
	for _, x := range c.expect.pending(c.seen) {
		if m, ok := x.(Migration); ok && m.Namespace == ns && m.VM == name {
			out = append(out, m)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if !out[i].Created.Equal(out[j].Created) {
			return out[i].Created.Before(out[j].Created)
		}
		return out[i].Name < out[j].Name
	})
	return out
}

// seen reports whether the caches show the expected object key
// ("kubevirt:ns/name" or "deckhouse:ns/name").
func (c *Cluster) seen(key string) bool {
	kind, k, _ := strings.Cut(key, ":")
	switch kind {
	case KubeVirt:
		_, ok, _ := c.vmims.GetStore().GetByKey(k)
		return ok
	case Deckhouse:
		if c.vmops == nil {
			return true
		}
		_, ok, _ := c.vmops.GetStore().GetByKey(k)
		return ok
	}
	return true
}

// OpenMigrations returns the unfinished migrations of the cluster (whoever
// started them), at most one per VM, with the node each migrates from.
func (c *Cluster) OpenMigrations() map[string]string {
	open := map[string]string{} // VM key -> source node
	add := func(ns, vm string) {
		key := ns + "/" + vm
		if _, ok := open[key]; ok {
			return
		}
		src := ""
		if vmi := c.VMI(ns, vm); vmi != nil {
			src = vmi.Status.NodeName
			if st := vmi.Status.MigrationState; st != nil && !st.Completed && st.SourceNode != "" {
				src = st.SourceNode
			}
		}
		open[key] = src
	}
	for _, o := range c.vmims.GetStore().List() {
		m := o.(*kvv1.VirtualMachineInstanceMigration)
		if !vmimToMigration(m).Final {
			add(m.Namespace, m.Spec.VMIName)
		}
	}
	if c.vmops != nil {
		for _, o := range c.vmops.GetStore().List() {
			if m, ok := vmopToMigration(o.(*unstructured.Unstructured)); ok && !m.Final {
				add(m.Namespace, m.VM)
			}
		}
	}
	for _, x := range c.expect.pending(c.seen) {
		if m, ok := x.(Migration); ok {
			add(m.Namespace, m.VM)
		}
	}
	return open
}

// Slots returns how many more migrations may start now from node without
// going over the cluster's limits (counting every unfinished migration,
// drover's or not), and the counts it saw.
func (c *Cluster) Slots(node string) (free, inCluster, fromNode int) {
	cfg := c.KubeVirtConfig()
	open := c.OpenMigrations()
	for _, src := range open {
		inCluster++
		if src == node {
			fromNode++
		}
	}
	return max(0, min(cfg.Limits.PerCluster-inCluster, cfg.Limits.PerNode-fromNode)), inCluster, fromNode
}

// CanMigrate runs the checks KubeVirt's migration admission (and Deckhouse's
// operation controller) would run, so that drover never creates a migration
// they refuse: the VMI exists, runs, is live-migratable and has no
// unfinished migration. It says why not.
func (c *Cluster) CanMigrate(vmi *kvv1.VirtualMachineInstance) (bool, string) {
	switch {
	case vmi == nil:
		return false, "the VMI does not exist"
	case vmi.DeletionTimestamp != nil:
		return false, "the VMI is being deleted"
	case vmi.Status.Phase != kvv1.Running:
		return false, fmt.Sprintf("the VMI is %s, not Running", orUnknown(string(vmi.Status.Phase)))
	}
	if ok, why := Migratable(vmi); !ok {
		return false, "not live-migratable: " + why
	}
	if st := vmi.Status.MigrationState; st != nil && !st.Completed && st.MigrationUID != "" {
		return false, "in-flight migration detected"
	}
	for _, m := range c.MigrationsForVM(vmi.Namespace, vmi.Name) {
		if !m.Final {
			return false, "in-flight migration detected (" + m.Name + ")"
		}
	}
	return true, ""
}

// Migratable reads KubeVirt's LiveMigratable condition: true when it is True.
func Migratable(vmi *kvv1.VirtualMachineInstance) (bool, string) {
	for _, cond := range vmi.Status.Conditions {
		if cond.Type == kvv1.VirtualMachineInstanceIsMigratable {
			if cond.Status == corev1.ConditionTrue {
				return true, ""
			}
			return false, strings.TrimSpace(cond.Reason + ": " + cond.Message)
		}
	}
	return false, "no LiveMigratable condition"
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// CreateMigration creates migration object name for vmi on its platform: a
// VirtualMachineInstanceMigration (KubeVirt), or a VirtualMachineOperation
// of type Evict, or Migrate when a node selector is given (Deckhouse). An
// object that already exists is not an error (a re-run finds its own).
func (c *Cluster) CreateMigration(ctx context.Context, vmi *kvv1.VirtualMachineInstance, name string, nodeSelector map[string]string, op, token string) error {
	labels := map[string]string{LabelOperation: OpHash(op), LabelManagedBy: ManagedBy}
	ann := map[string]string{AnnotationOperation: op, AnnotationToken: token}
	m := Migration{Platform: c.PlatformOf(vmi), Namespace: vmi.Namespace, Name: name, VM: vmi.Name, Phase: "Pending",
		Operation: OpHash(op), Created: time.Now()}
	var err error
	if m.Platform == Deckhouse {
		typ := VMOPEvict
		spec := map[string]any{"type": typ, "virtualMachineName": vmi.Name}
		if len(nodeSelector) > 0 {
			sel := map[string]any{}
			for k, v := range nodeSelector {
				sel[k] = v
			}
			spec["type"] = VMOPMigrate
			spec["migrate"] = map[string]any{"nodeSelector": sel}
		}
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": DeckhouseVMOPResource.GroupVersion().String(), "kind": "VirtualMachineOperation",
			"metadata": map[string]any{"name": name, "namespace": vmi.Namespace}, "spec": spec}}
		u.SetLabels(labels)
		u.SetAnnotations(ann)
		_, err = c.Dynamic.Resource(DeckhouseVMOPResource).Namespace(vmi.Namespace).Create(ctx, u, metav1.CreateOptions{})
	} else {
		vmim := &kvv1.VirtualMachineInstanceMigration{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: vmi.Namespace, Labels: labels, Annotations: ann},
			Spec:       kvv1.VirtualMachineInstanceMigrationSpec{VMIName: vmi.Name, AddedNodeSelector: nodeSelector},
		}
		_, err = c.KubeVirt.VirtualMachineInstanceMigrations(vmi.Namespace).Create(ctx, vmim, metav1.CreateOptions{})
	}
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	if err != nil {
		if strings.Contains(err.Error(), "admission webhook") {
			c.opts.Metrics.MigrationsRefused.WithLabelValues(m.Platform).Inc()
		}
		return fmt.Errorf("create migration %s/%s of %s: %w", vmi.Namespace, name, vmi.Name, err)
	}
	c.opts.Metrics.MigrationsCreated.WithLabelValues(m.Platform).Inc()
	c.expect.add(m.Platform+":"+m.Key(), m)
	return nil
}

// DeleteMigration deletes a migration object, which cancels it before
// hand-off and aborts it after (the abort can lose the race). Gone already
// is not an error.
func (c *Cluster) DeleteMigration(ctx context.Context, m Migration) error {
	var err error
	if m.Platform == Deckhouse {
		err = c.Dynamic.Resource(DeckhouseVMOPResource).Namespace(m.Namespace).Delete(ctx, m.Name, metav1.DeleteOptions{})
	} else {
		err = c.KubeVirt.VirtualMachineInstanceMigrations(m.Namespace).Delete(ctx, m.Name, metav1.DeleteOptions{})
	}
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("delete migration %s: %w", m.Key(), err)
	}
	return nil
}

// MigrationsOf returns the migration objects operation op created.
func (c *Cluster) MigrationsOf(op string) []Migration {
	h := OpHash(op)
	var out []Migration
	objs, _ := c.vmims.GetIndexer().ByIndex(LabelOperation, h)
	for _, o := range objs {
		out = append(out, vmimToMigration(o.(*kvv1.VirtualMachineInstanceMigration)))
	}
	if c.vmops != nil {
		objs, _ := c.vmops.GetIndexer().ByIndex(LabelOperation, h)
		for _, o := range objs {
			if m, ok := vmopToMigration(o.(*unstructured.Unstructured)); ok {
				out = append(out, m)
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key() < out[j].Key() })
	return out
}

// AbortStatus reads how an abort of the VMI's last migration went:
// "Succeeded" (the VM stayed), "Failed" (it moved anyway), "" (none).
func AbortStatus(vmi *kvv1.VirtualMachineInstance) string {
	if vmi == nil || vmi.Status.MigrationState == nil {
		return ""
	}
	return string(vmi.Status.MigrationState.AbortStatus)
}
