package crds_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	kubevirtv1 "kubevirt.io/api/core/v1"
	"kubevirt.io/client-go/kubevirt"

	"github.com/drover-io/drover/integration/cluster"
	"github.com/drover-io/drover/integration/crds"
)

const ns = "crds-test"

var (
	gvrVMI    = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstances"}
	gvrVM     = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachines"}
	gvrVMIM   = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "virtualmachineinstancemigrations"}
	gvrKV     = schema.GroupVersionResource{Group: "kubevirt.io", Version: "v1", Resource: "kubevirts"}
	gvrD8VM   = schema.GroupVersionResource{Group: "virtualization.deckhouse.io", Version: "v1alpha2", Resource: "virtualmachines"}
	gvrD8VMOP = schema.GroupVersionResource{Group: "virtualization.deckhouse.io", Version: "v1alpha2", Resource: "virtualmachineoperations"}
)

func TestObjects(t *testing.T) {
	objs, err := crds.Objects()
	require.NoError(t, err)
	byName := map[string]*apiextensionsv1.CustomResourceDefinition{}
	for _, o := range objs {
		byName[o.Name] = o
	}

	tests := []struct {
		name       string
		shortNames []string
		version    string
		status     bool
		cluster    bool
	}{
		// KubeVirt registers no status subresource for VMIs (components/crds.go).
		{name: "virtualmachineinstances.kubevirt.io", shortNames: []string{"vmi", "vmis"}, version: "v1", status: false},
		{name: "virtualmachines.kubevirt.io", shortNames: []string{"vm", "vms"}, version: "v1", status: true},
		{name: "virtualmachineinstancemigrations.kubevirt.io", shortNames: []string{"vmim", "vmims"}, version: "v1", status: true},
		{name: "kubevirts.kubevirt.io", shortNames: []string{"kv", "kvs"}, version: "v1", status: true},
		{name: "virtualmachines.virtualization.deckhouse.io", shortNames: []string{"vm"}, version: "v1alpha2", status: true},
		{name: "virtualmachineoperations.virtualization.deckhouse.io", shortNames: []string{"vmop"}, version: "v1alpha2", status: true},
		// medik8s' Node Maintenance Operator: cluster-scoped, status subresource.
		{name: "nodemaintenances.nodemaintenance.medik8s.io", shortNames: []string{"nm"}, version: "v1beta1", status: true, cluster: true},
	}
	require.Len(t, objs, len(tests))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			crd, ok := byName[tt.name]
			require.True(t, ok, "CRD %s missing", tt.name)
			require.Equal(t, tt.shortNames, crd.Spec.Names.ShortNames)
			scope := apiextensionsv1.NamespaceScoped
			if tt.cluster {
				scope = apiextensionsv1.ClusterScoped
			}
			require.Equal(t, scope, crd.Spec.Scope)
			var storage *apiextensionsv1.CustomResourceDefinitionVersion
			for i, v := range crd.Spec.Versions {
				require.Equal(t, tt.status, v.Subresources != nil && v.Subresources.Status != nil, "status subresource of %s", v.Name)
				require.NotNil(t, v.Schema, "schema of %s", v.Name)
				if v.Storage {
					storage = &crd.Spec.Versions[i]
				}
			}
			require.NotNil(t, storage)
			require.Equal(t, tt.version, storage.Name)
		})
	}

	// The same sub-schemas are written out in several files; they must not drift apart.
	schemaOf := func(crd string) apiextensionsv1.JSONSchemaProps {
		return *byName[crd].Spec.Versions[0].Schema.OpenAPIV3Schema
	}
	vmi, vm, vmim := schemaOf("virtualmachineinstances.kubevirt.io"), schemaOf("virtualmachines.kubevirt.io"), schemaOf("virtualmachineinstancemigrations.kubevirt.io")
	require.True(t, reflect.DeepEqual(vmi.Properties["spec"], vm.Properties["spec"].Properties["template"].Properties["spec"]),
		"VirtualMachine spec.template.spec differs from VirtualMachineInstance spec")
	require.True(t, reflect.DeepEqual(vmi.Properties["status"].Properties["migrationState"], vmim.Properties["status"].Properties["migrationState"]),
		"VirtualMachineInstanceMigration status.migrationState differs from VirtualMachineInstance's")
}

// TestAgainstAPIServer installs the CRDs into a real API server and checks that typed KubeVirt
// objects survive a round trip, that invalid objects are rejected, and what kubectl prints.
func TestAgainstAPIServer(t *testing.T) {
	c := cluster.StartWithOptionsT(t, cluster.Options{SkipCRDs: true})
	ctx := context.Background()

	begin := time.Now()
	require.NoError(t, crds.Install(ctx, c.Config))
	t.Logf("CRDs installed and established in %s", time.Since(begin).Round(time.Millisecond))
	require.NoError(t, crds.Install(ctx, c.Config), "second Install is a no-op")

	cs, err := kubernetes.NewForConfig(c.Config)
	require.NoError(t, err)
	for _, name := range []string{ns, "kubevirt"} {
		_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	kv, err := kubevirt.NewForConfig(c.Config)
	require.NoError(t, err)
	dyn, err := dynamic.NewForConfig(c.Config)
	require.NoError(t, err)

	t.Run("round trip VirtualMachineInstance", func(t *testing.T) {
		want := newVMI("rt-vmi")
		created, err := kv.KubevirtV1().VirtualMachineInstances(ns).Create(ctx, want.DeepCopy(), metav1.CreateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		requireSameJSON(t, want.Spec, created.Spec)
		requireSameJSON(t, want.Status, created.Status) // no status subresource: create keeps the status

		// No status subresource, as in KubeVirt: the status is written with the object, and
		// PUT .../status is not found.
		putStatus := kv.KubevirtV1().RESTClient().Put().Namespace(ns).Resource("virtualmachineinstances").
			Name(created.Name).SubResource("status").Param("fieldValidation", "Strict").Body(created.DeepCopy()).Do(ctx).Error()
		require.True(t, apierrors.IsNotFound(putStatus), "PUT status of a VMI: %v", putStatus)
		got, err := kv.KubevirtV1().VirtualMachineInstances(ns).Get(ctx, "rt-vmi", metav1.GetOptions{})
		require.NoError(t, err)
		requireSameJSON(t, want.Spec, got.Spec)
		requireSameJSON(t, want.Status, got.Status)

		got.Status.Phase = kubevirtv1.Succeeded
		got.Status.MigrationState.AbortStatus = kubevirtv1.MigrationAbortFailed
		_, err = kv.KubevirtV1().VirtualMachineInstances(ns).Update(ctx, got.DeepCopy(), metav1.UpdateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		fetched, err := kv.KubevirtV1().VirtualMachineInstances(ns).Get(ctx, "rt-vmi", metav1.GetOptions{})
		require.NoError(t, err)
		requireSameJSON(t, got.Status, fetched.Status)
	})

	t.Run("round trip VirtualMachine", func(t *testing.T) {
		want := newVM("rt-vm")
		created, err := kv.KubevirtV1().VirtualMachines(ns).Create(ctx, want.DeepCopy(), metav1.CreateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		requireSameJSON(t, want.Spec, created.Spec)
		require.Empty(t, created.Status.PrintableStatus, "status subresource: create ignores the status")

		created.Status = want.Status
		_, err = kv.KubevirtV1().VirtualMachines(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		got, err := kv.KubevirtV1().VirtualMachines(ns).Get(ctx, "rt-vm", metav1.GetOptions{})
		require.NoError(t, err)
		requireSameJSON(t, want.Spec, got.Spec)
		requireSameJSON(t, want.Status, got.Status)
	})

	t.Run("round trip VirtualMachineInstanceMigration", func(t *testing.T) {
		want := newVMIM("rt-vmim")
		created, err := kv.KubevirtV1().VirtualMachineInstanceMigrations(ns).Create(ctx, want.DeepCopy(), metav1.CreateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		requireSameJSON(t, want.Spec, created.Spec)

		created.Status = want.Status
		_, err = kv.KubevirtV1().VirtualMachineInstanceMigrations(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		got, err := kv.KubevirtV1().VirtualMachineInstanceMigrations(ns).Get(ctx, "rt-vmim", metav1.GetOptions{})
		require.NoError(t, err)
		requireSameJSON(t, want.Spec, got.Spec)
		requireSameJSON(t, want.Status, got.Status)
	})

	t.Run("round trip KubeVirt", func(t *testing.T) {
		want := newKubeVirt()
		created, err := kv.KubevirtV1().KubeVirts("kubevirt").Create(ctx, want.DeepCopy(), metav1.CreateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		created.Status = want.Status
		_, err = kv.KubevirtV1().KubeVirts("kubevirt").UpdateStatus(ctx, created, metav1.UpdateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		got, err := kv.KubevirtV1().KubeVirts("kubevirt").Get(ctx, "kubevirt", metav1.GetOptions{})
		require.NoError(t, err)
		requireSameJSON(t, want.Spec, got.Spec)
		requireSameJSON(t, want.Status, got.Status)
	})

	t.Run("round trip Deckhouse VirtualMachine", func(t *testing.T) {
		obj := d8VM("rt-d8vm")
		obj.Object["spec"].(map[string]any)["runPolicy"] = "AlwaysOn"
		created, err := dyn.Resource(gvrD8VM).Namespace(ns).Create(ctx, obj.DeepCopy(), metav1.CreateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		wantSpec := obj.Object["spec"].(map[string]any)
		// Defaults of the real CRD.
		wantSpec["bootloader"] = "BIOS"
		wantSpec["disruptions"] = map[string]any{"restartApprovalMode": "Manual"}
		wantSpec["enableParavirtualization"] = true
		wantSpec["liveMigrationPolicy"] = "PreferSafe"
		wantSpec["osType"] = "Generic"
		wantSpec["terminationGracePeriodSeconds"] = int64(60)
		requireSameJSON(t, wantSpec, created.Object["spec"])

		status := map[string]any{
			"phase":     "Migrating",
			"nodeName":  "node-a",
			"ipAddress": "10.66.10.3",
			"conditions": []any{map[string]any{
				"type": "Migratable", "status": "True", "reason": "VirtualMachineMigratable",
				"message": "", "lastTransitionTime": "2026-11-21T16:00:00Z",
			}},
			"migrationState": map[string]any{
				"startTimestamp": "2026-11-21T16:00:00Z",
				"source":         map[string]any{"node": "node-a", "pod": "virt-launcher-rt-d8vm-abcde"},
				"target":         map[string]any{"node": "node-b", "pod": "virt-launcher-rt-d8vm-fghij"},
				"result":         "",
			},
			"stats":              map[string]any{"lastStartTime": "2026-11-21T15:00:00Z", "phasesTransitions": []any{map[string]any{"phase": "Running", "timestamp": "2026-11-21T15:00:00Z"}}},
			"virtualMachinePods": []any{map[string]any{"name": "virt-launcher-rt-d8vm-abcde", "active": true}},
			"observedGeneration": int64(1),
		}
		created.Object["status"] = status
		_, err = dyn.Resource(gvrD8VM).Namespace(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		got, err := dyn.Resource(gvrD8VM).Namespace(ns).Get(ctx, "rt-d8vm", metav1.GetOptions{})
		require.NoError(t, err)
		requireSameJSON(t, status, got.Object["status"])

		noPolicy := d8VM("default-policy")
		created, err = dyn.Resource(gvrD8VM).Namespace(ns).Create(ctx, noPolicy, metav1.CreateOptions{})
		require.NoError(t, err)
		policy, _, _ := unstructured.NestedString(created.Object, "spec", "runPolicy")
		require.Equal(t, "AlwaysOnUnlessStoppedManually", policy, "default runPolicy")
	})

	t.Run("round trip Deckhouse VirtualMachineOperation", func(t *testing.T) {
		obj := vmop("rt-vmop", "Migrate")
		obj.Object["spec"].(map[string]any)["force"] = true
		obj.Object["spec"].(map[string]any)["migrate"] = map[string]any{"nodeSelector": map[string]any{"zone": "b"}}
		created, err := dyn.Resource(gvrD8VMOP).Namespace(ns).Create(ctx, obj.DeepCopy(), metav1.CreateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		requireSameJSON(t, obj.Object["spec"], created.Object["spec"])
		status := map[string]any{
			"phase":    "InProgress",
			"progress": int64(40),
			"conditions": []any{map[string]any{
				"type": "Completed", "status": "False", "reason": "MigrationRunning",
				"message": "migrating to node-b", "lastTransitionTime": "2026-11-21T16:00:00Z", "observedGeneration": int64(1),
			}},
			"observedGeneration": int64(1),
		}
		created.Object["status"] = status
		_, err = dyn.Resource(gvrD8VMOP).Namespace(ns).UpdateStatus(ctx, created, metav1.UpdateOptions{FieldValidation: "Strict"})
		require.NoError(t, err)
		got, err := dyn.Resource(gvrD8VMOP).Namespace(ns).Get(ctx, "rt-vmop", metav1.GetOptions{})
		require.NoError(t, err)
		requireSameJSON(t, status, got.Object["status"])
	})

	t.Run("rejects invalid objects", func(t *testing.T) { testRejects(t, dyn) })
	t.Run("kubectl columns", func(t *testing.T) { testColumns(t, c.Kubeconfig) })
}

// testRejects checks that the API server refuses what the real CRDs (or KubeVirt's webhooks)
// refuse. Each case starts from a valid object; op says how the broken version is sent.
func testRejects(t *testing.T, dyn dynamic.Interface) {
	ctx := context.Background()
	type op int
	const (
		create op = iota
		update
		updateStatus
	)
	tests := []struct {
		name  string
		gvr   schema.GroupVersionResource
		valid *unstructured.Unstructured
		op    op
		set   []any // path elements..., value; nil value deletes the field
		want  string
	}{
		{name: "VM unknown runStrategy", gvr: gvrVM, valid: toUnstructured(t, newVM("bad")), set: []any{"spec", "runStrategy", "Sometimes"}, want: "spec.runStrategy"},
		{name: "VM running and runStrategy", gvr: gvrVM, valid: toUnstructured(t, newVM("bad")), set: []any{"spec", "running", true}, want: "mutually exclusive"},
		{name: "VM without template", gvr: gvrVM, valid: toUnstructured(t, newVM("bad")), set: []any{"spec", "template", nil}, want: "spec.template"},
		{name: "VMI unknown evictionStrategy", gvr: gvrVMI, valid: toUnstructured(t, newVMI("bad")), set: []any{"spec", "evictionStrategy", "Migrate"}, want: "spec.evictionStrategy"},
		{name: "VMI without domain", gvr: gvrVMI, valid: toUnstructured(t, newVMI("bad")), set: []any{"spec", "domain", nil}, want: "spec.domain"},
		{name: "VMI unknown phase", gvr: gvrVMI, valid: toUnstructured(t, newVMI("bad")), op: updateStatus, set: []any{"status", "phase", "Booting"}, want: "status.phase"},
		{name: "VMI unknown migration abortStatus", gvr: gvrVMI, valid: toUnstructured(t, newVMI("bad")), op: updateStatus, set: []any{"status", "migrationState", "abortStatus", "Maybe"}, want: "status.migrationState.abortStatus"},
		{name: "VMI condition status not True/False/Unknown", gvr: gvrVMI, valid: toUnstructured(t, newVMI("bad")), op: updateStatus, set: []any{"status", "conditions", []any{map[string]any{"type": "Ready", "status": "Yes"}}}, want: "status.conditions[0].status"},
		{name: "VMI strict: unknown spec field", gvr: gvrVMI, valid: toUnstructured(t, newVMI("bad")), set: []any{"spec", "evictionStrategyy", "LiveMigrate"}, want: "unknown field"},
		{name: "VMIM without vmiName", gvr: gvrVMIM, valid: toUnstructured(t, newVMIM("bad")), set: []any{"spec", "vmiName", nil}, want: "spec.vmiName"},
		{name: "VMIM unknown priority", gvr: gvrVMIM, valid: toUnstructured(t, newVMIM("bad")), set: []any{"spec", "priority", "urgent"}, want: "spec.priority"},
		{name: "VMIM unknown phase", gvr: gvrVMIM, valid: toUnstructured(t, newVMIM("bad")), op: updateStatus, set: []any{"status", "phase", "Migrating"}, want: "status.phase"},
		{name: "KubeVirt limit not a number", gvr: gvrKV, valid: toUnstructured(t, newKubeVirt()), set: []any{"spec", "configuration", "migrations", "parallelMigrationsPerCluster", "five"}, want: "parallelMigrationsPerCluster"},
		{name: "KubeVirt bad bandwidth", gvr: gvrKV, valid: toUnstructured(t, newKubeVirt()), set: []any{"spec", "configuration", "migrations", "bandwidthPerMigration", "fast"}, want: "bandwidthPerMigration"},
		{name: "Deckhouse VM unknown runPolicy", gvr: gvrD8VM, valid: d8VM("bad"), set: []any{"spec", "runPolicy", "Sometimes"}, want: "spec.runPolicy"},
		{name: "Deckhouse VM unknown liveMigrationPolicy", gvr: gvrD8VM, valid: d8VM("bad"), set: []any{"spec", "liveMigrationPolicy", "Always"}, want: "spec.liveMigrationPolicy"},
		{name: "Deckhouse VM without blockDeviceRefs", gvr: gvrD8VM, valid: d8VM("bad"), set: []any{"spec", "blockDeviceRefs", nil}, want: "spec.blockDeviceRefs"},
		{name: "Deckhouse VM unknown phase", gvr: gvrD8VM, valid: d8VM("bad"), op: updateStatus, set: []any{"status", "phase", "Up"}, want: "status.phase"},
		{name: "VMOP unknown type", gvr: gvrD8VMOP, valid: vmop("bad", "Evict"), set: []any{"spec", "type", "Reboot"}, want: "spec.type"},
		{name: "VMOP without virtualMachineName", gvr: gvrD8VMOP, valid: vmop("bad", "Evict"), set: []any{"spec", "virtualMachineName", nil}, want: "spec.virtualMachineName"},
		{name: "VMOP spec is immutable", gvr: gvrD8VMOP, valid: vmop("bad", "Evict"), op: update, set: []any{"spec", "virtualMachineName", "other"}, want: ".spec is immutable"},
		{name: "VMOP migrate only with type Migrate", gvr: gvrD8VMOP, valid: vmop("bad", "Evict"), set: []any{"spec", "migrate", map[string]any{"nodeSelector": map[string]any{"zone": "b"}}}, want: "spec.migrate"},
		{name: "VMOP Start cannot be forced", gvr: gvrD8VMOP, valid: vmop("bad", "Start"), set: []any{"spec", "force", true}, want: "forcibly"},
		{name: "VMOP unknown phase", gvr: gvrD8VMOP, valid: vmop("bad", "Evict"), op: updateStatus, set: []any{"status", "phase", "Done"}, want: "status.phase"},
		{name: "VMOP progress above 100", gvr: gvrD8VMOP, valid: vmop("bad", "Evict"), op: updateStatus, set: []any{"status", "progress", int64(101)}, want: "status.progress"},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			obj := tt.valid.DeepCopy()
			obj.SetName(fmt.Sprintf("%s-%d", obj.GetName(), i))
			obj.SetNamespace(ns)
			if tt.gvr == gvrKV {
				obj.SetNamespace("kubevirt")
			}
			client := dyn.Resource(tt.gvr).Namespace(obj.GetNamespace())
			strict := metav1.CreateOptions{FieldValidation: "Strict"}
			if tt.op != create {
				created, err := client.Create(ctx, obj, strict)
				require.NoError(t, err, "the valid object is accepted")
				obj = created
				if tt.op == updateStatus {
					// Start from a valid status so only the field under test is wrong.
					obj.Object["status"] = validStatus(tt.gvr)
				}
			}
			setPath(t, obj.Object, tt.set)
			var err error
			switch tt.op {
			case create:
				_, err = client.Create(ctx, obj, strict)
			case update:
				_, err = client.Update(ctx, obj, metav1.UpdateOptions{FieldValidation: "Strict"})
			case updateStatus:
				if tt.gvr == gvrVMI {
					// No status subresource: the status is written with the object.
					_, err = client.Update(ctx, obj, metav1.UpdateOptions{FieldValidation: "Strict"})
					break
				}
				_, err = client.UpdateStatus(ctx, obj, metav1.UpdateOptions{FieldValidation: "Strict"})
			}
			require.Error(t, err)
			require.True(t, apierrors.IsInvalid(err) || apierrors.IsBadRequest(err), "want 422 or 400, got %v", err)
			require.Contains(t, err.Error(), tt.want)
		})
	}
}

func testColumns(t *testing.T, kubeconfig string) {
	kubectl, err := exec.LookPath("kubectl")
	require.NoError(t, err, "kubectl must be on PATH (the machine image has /usr/bin/kubectl)")
	tests := []struct {
		resource string
		want     []string
	}{
		{resource: "virtualmachineinstances.kubevirt.io", want: []string{"NAME", "AGE", "PHASE", "IP", "NODENAME", "READY"}},
		{resource: "virtualmachines.kubevirt.io", want: []string{"NAME", "AGE", "STATUS", "READY"}},
		{resource: "virtualmachineinstancemigrations.kubevirt.io", want: []string{"NAME", "PHASE", "VMI"}},
		{resource: "virtualmachines.virtualization.deckhouse.io", want: []string{"NAME", "PHASE", "UPTIME", "NODE", "IPADDRESS", "AGE"}},
		{resource: "virtualmachineoperations.virtualization.deckhouse.io", want: []string{"NAME", "PHASE", "TYPE", "VIRTUALMACHINE", "AGE"}},
	}
	for _, tt := range tests {
		t.Run(tt.resource, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, kubectl, "--kubeconfig", kubeconfig, "get", tt.resource, "-n", ns).CombinedOutput()
			require.NoError(t, err, "%s", out)
			header, _, _ := strings.Cut(string(out), "\n")
			require.Equal(t, tt.want, strings.Fields(header))
		})
	}
	// The VMI shows where it runs and its IP.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, kubectl, "--kubeconfig", kubeconfig, "get", "vmi", "rt-vmi", "-n", ns, "--no-headers").CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.Equal(t, []string{"10.244.1.17", "node-a", "True"}, strings.Fields(string(out))[3:])
}

func validStatus(gvr schema.GroupVersionResource) map[string]any {
	switch gvr {
	case gvrVMIM:
		return map[string]any{"phase": "Pending"}
	case gvrD8VM:
		return map[string]any{"phase": "Running", "nodeName": "node-a"}
	case gvrD8VMOP:
		return map[string]any{"phase": "InProgress", "progress": int64(10)}
	}
	return map[string]any{}
}

// setPath sets path[:len-1] to the last element; a nil value removes the field.
func setPath(t *testing.T, obj map[string]any, set []any) {
	t.Helper()
	require.GreaterOrEqual(t, len(set), 2)
	fields := make([]string, 0, len(set)-1)
	for _, f := range set[:len(set)-1] {
		fields = append(fields, f.(string))
	}
	value := set[len(set)-1]
	if value == nil {
		unstructured.RemoveNestedField(obj, fields...)
		return
	}
	require.NoError(t, unstructured.SetNestedField(obj, value, fields...))
}

func requireSameJSON(t *testing.T, want, got any) {
	t.Helper()
	w, err := json.Marshal(want)
	require.NoError(t, err)
	g, err := json.Marshal(got)
	require.NoError(t, err)
	require.JSONEq(t, string(w), string(g))
}

func toUnstructured(t *testing.T, obj any) *unstructured.Unstructured {
	t.Helper()
	data, err := json.Marshal(obj)
	require.NoError(t, err)
	u := &unstructured.Unstructured{}
	require.NoError(t, u.UnmarshalJSON(data))
	unstructured.RemoveNestedField(u.Object, "metadata", "creationTimestamp")
	return u
}

func ptr[T any](v T) *T { return &v }

var ts = metav1.NewTime(time.Date(2026, 11, 21, 16, 0, 0, 0, time.UTC))

func vmiSpec() kubevirtv1.VirtualMachineInstanceSpec {
	return kubevirtv1.VirtualMachineInstanceSpec{
		Domain: kubevirtv1.DomainSpec{
			Resources: kubevirtv1.ResourceRequirements{
				Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("2"), corev1.ResourceMemory: resource.MustParse("4Gi")},
				Limits:   corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("2500m")},
			},
			CPU:    &kubevirtv1.CPU{Cores: 2, Sockets: 1, Threads: 1, Model: "host-passthrough"},
			Memory: &kubevirtv1.Memory{Guest: ptr(resource.MustParse("4Gi")), MaxGuest: ptr(resource.MustParse("8Gi"))},
			Devices: kubevirtv1.Devices{
				Disks:      []kubevirtv1.Disk{{Name: "root", DiskDevice: kubevirtv1.DiskDevice{Disk: &kubevirtv1.DiskTarget{Bus: kubevirtv1.DiskBusVirtio}}}},
				Interfaces: []kubevirtv1.Interface{{Name: "default", InterfaceBindingMethod: kubevirtv1.InterfaceBindingMethod{Masquerade: &kubevirtv1.InterfaceMasquerade{}}}},
			},
			Firmware: &kubevirtv1.Firmware{Serial: "4b8b9c4a"},
		},
		NodeSelector: map[string]string{"kubernetes.io/os": "linux"},
		Affinity: &corev1.Affinity{NodeAffinity: &corev1.NodeAffinity{RequiredDuringSchedulingIgnoredDuringExecution: &corev1.NodeSelector{
			NodeSelectorTerms: []corev1.NodeSelectorTerm{{MatchExpressions: []corev1.NodeSelectorRequirement{{Key: "zone", Operator: corev1.NodeSelectorOpIn, Values: []string{"a", "b"}}}}},
		}}},
		Tolerations:                   []corev1.Toleration{{Key: "node.kubernetes.io/unreachable", Operator: corev1.TolerationOpExists, Effect: corev1.TaintEffectNoExecute, TolerationSeconds: ptr(int64(300))}},
		EvictionStrategy:              ptr(kubevirtv1.EvictionStrategyLiveMigrate),
		TerminationGracePeriodSeconds: ptr(int64(180)),
		Volumes: []kubevirtv1.Volume{
			{Name: "root", VolumeSource: kubevirtv1.VolumeSource{PersistentVolumeClaim: &kubevirtv1.PersistentVolumeClaimVolumeSource{
				PersistentVolumeClaimVolumeSource: corev1.PersistentVolumeClaimVolumeSource{ClaimName: "root-pvc", ReadOnly: true}, Hotpluggable: true}}},
			{Name: "data", VolumeSource: kubevirtv1.VolumeSource{DataVolume: &kubevirtv1.DataVolumeSource{Name: "data-dv", Hotpluggable: true}}},
			{Name: "cloudinit", VolumeSource: kubevirtv1.VolumeSource{CloudInitNoCloud: &kubevirtv1.CloudInitNoCloudSource{UserData: "#cloud-config\n"}}},
			{Name: "cd", VolumeSource: kubevirtv1.VolumeSource{ContainerDisk: &kubevirtv1.ContainerDiskSource{Image: "quay.io/containerdisks/fedora:40"}}},
		},
		Networks:          []kubevirtv1.Network{{Name: "default", NetworkSource: kubevirtv1.NetworkSource{Pod: &kubevirtv1.PodNetwork{}}}},
		PriorityClassName: "vm-high",
		Hostname:          "guest",
	}
}

func newVMI(name string) *kubevirtv1.VirtualMachineInstance {
	return &kubevirtv1.VirtualMachineInstance{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstance"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"kubevirt.io/vm": name}},
		Spec:       vmiSpec(),
		Status: kubevirtv1.VirtualMachineInstanceStatus{
			NodeName: "node-a",
			Phase:    kubevirtv1.Running,
			Conditions: []kubevirtv1.VirtualMachineInstanceCondition{
				{Type: kubevirtv1.VirtualMachineInstanceReady, Status: corev1.ConditionTrue, LastTransitionTime: ts},
				{Type: kubevirtv1.VirtualMachineInstanceIsMigratable, Status: corev1.ConditionFalse, Reason: "DisksNotLiveMigratable", Message: "cannot migrate VMI: PVC root-pvc is not shared", LastProbeTime: ts},
			},
			PhaseTransitionTimestamps: []kubevirtv1.VirtualMachineInstancePhaseTransitionTimestamp{{Phase: kubevirtv1.Running, PhaseTransitionTimestamp: ts}},
			Interfaces:                []kubevirtv1.VirtualMachineInstanceNetworkInterface{{IP: "10.244.1.17", IPs: []string{"10.244.1.17"}, MAC: "02:00:00:00:00:01", Name: "default", InfoSource: "domain, guest-agent", QueueCount: 1, LinkState: "up"}},
			GuestOSInfo:               kubevirtv1.VirtualMachineInstanceGuestOSInfo{Name: "Fedora Linux", ID: "fedora"},
			MigrationState: &kubevirtv1.VirtualMachineInstanceMigrationState{
				StartTimestamp: &ts, EndTimestamp: &ts, TargetNodeDomainReadyTimestamp: &ts,
				TargetNodeDomainDetected: true, TargetNodeAddress: "10.0.0.12",
				TargetDirectMigrationNodePorts: map[string]int{"49152": 0},
				TargetNode:                     "node-b", TargetPod: "virt-launcher-" + name + "-fghij",
				SourceNode: "node-a", SourcePod: "virt-launcher-" + name + "-abcde",
				Completed: true, Failed: false, AbortRequested: true, AbortStatus: kubevirtv1.MigrationAbortSucceeded,
				FailureReason: "", MigrationUID: types.UID("0b6c8c43-3a36-4ad4-9b4f-6d2d9c0f3f6e"), Mode: kubevirtv1.MigrationPreCopy,
				MigrationConfiguration: &kubevirtv1.MigrationConfiguration{BandwidthPerMigration: ptr(resource.MustParse("64Mi")), AllowAutoConverge: ptr(false)},
				TargetCPUSet:           []int{2, 3},
				SourceState:            &kubevirtv1.VirtualMachineInstanceMigrationSourceState{VirtualMachineInstanceCommonMigrationState: kubevirtv1.VirtualMachineInstanceCommonMigrationState{Node: "node-a", Pod: "virt-launcher-" + name + "-abcde"}},
				TargetMemoryOverhead:   ptr(resource.MustParse("230Mi")),
			},
			MigrationMethod:               kubevirtv1.LiveMigration,
			MigrationTransport:            kubevirtv1.MigrationTransportUnix,
			QOSClass:                      ptr(corev1.PodQOSBurstable),
			LauncherContainerImageVersion: "quay.io/kubevirt/virt-launcher:v1.8.0",
			EvacuationNodeName:            "node-a",
			ActivePods:                    map[types.UID]string{"6f1f2a4e-1111-2222-3333-444455556666": "node-a"},
			VolumeStatus:                  []kubevirtv1.VolumeStatus{{Name: "root", Target: "vda", Phase: kubevirtv1.VolumeReady, Size: 10737418240}},
			FSFreezeStatus:                "thawed",
			VirtualMachineRevisionName:    "revision-start-vm-1",
			RuntimeUser:                   107,
			VSOCKCID:                      ptr(uint32(3)),
			SelinuxContext:                "none",
			Machine:                       &kubevirtv1.Machine{Type: "q35"},
			CurrentCPUTopology:            &kubevirtv1.CPUTopology{Cores: 2, Sockets: 1, Threads: 1},
		},
	}
}

func newVM(name string) *kubevirtv1.VirtualMachine {
	return &kubevirtv1.VirtualMachine{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachine"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: kubevirtv1.VirtualMachineSpec{
			RunStrategy: ptr(kubevirtv1.RunStrategyRerunOnFailure),
			Template: &kubevirtv1.VirtualMachineInstanceTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"kubevirt.io/vm": name}, Annotations: map[string]string{"a": "b"}},
				Spec:       vmiSpec(),
			},
		},
		Status: kubevirtv1.VirtualMachineStatus{
			Created: true, Ready: true,
			PrintableStatus:     kubevirtv1.VirtualMachineStatusRunning,
			Conditions:          []kubevirtv1.VirtualMachineCondition{{Type: kubevirtv1.VirtualMachineReady, Status: corev1.ConditionTrue, LastTransitionTime: ts}},
			StateChangeRequests: []kubevirtv1.VirtualMachineStateChangeRequest{{Action: kubevirtv1.StartRequest}},
			StartFailure:        &kubevirtv1.VirtualMachineStartFailure{ConsecutiveFailCount: 2, LastFailedVMIUID: "uid-1", RetryAfterTimestamp: &ts},
			ObservedGeneration:  1, DesiredGeneration: 1,
			RunStrategy: kubevirtv1.RunStrategyRerunOnFailure,
		},
	}
}

func newVMIM(name string) *kubevirtv1.VirtualMachineInstanceMigration {
	return &kubevirtv1.VirtualMachineInstanceMigration{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "VirtualMachineInstanceMigration"},
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
		Spec: kubevirtv1.VirtualMachineInstanceMigrationSpec{
			VMIName:           "rt-vmi",
			AddedNodeSelector: map[string]string{"zone": "b"},
			Priority:          ptr(kubevirtv1.PrioritySystemMaintenance),
		},
		Status: kubevirtv1.VirtualMachineInstanceMigrationStatus{
			Phase: kubevirtv1.MigrationRunning,
			Conditions: []kubevirtv1.VirtualMachineInstanceMigrationCondition{
				{Type: kubevirtv1.VirtualMachineInstanceMigrationAbortRequested, Status: corev1.ConditionTrue, LastTransitionTime: ts, Reason: "Deleted", Message: "migration object deleted"},
			},
			PhaseTransitionTimestamps: []kubevirtv1.VirtualMachineInstanceMigrationPhaseTransitionTimestamp{
				{Phase: kubevirtv1.MigrationPending, PhaseTransitionTimestamp: ts},
				{Phase: kubevirtv1.MigrationRunning, PhaseTransitionTimestamp: ts},
			},
			MigrationState: &kubevirtv1.VirtualMachineInstanceMigrationState{
				StartTimestamp: &ts, SourceNode: "node-a", TargetNode: "node-b", TargetPod: "virt-launcher-x-fghij",
				AbortRequested: true, AbortStatus: kubevirtv1.MigrationAbortInProgress, MigrationUID: "uid-2", Mode: kubevirtv1.MigrationPostCopy,
			},
		},
	}
}

func newKubeVirt() *kubevirtv1.KubeVirt {
	return &kubevirtv1.KubeVirt{
		TypeMeta:   metav1.TypeMeta{APIVersion: "kubevirt.io/v1", Kind: "KubeVirt"},
		ObjectMeta: metav1.ObjectMeta{Name: "kubevirt", Namespace: "kubevirt"},
		Spec: kubevirtv1.KubeVirtSpec{
			ImagePullPolicy: corev1.PullIfNotPresent,
			Configuration: kubevirtv1.KubeVirtConfiguration{
				EvictionStrategy:       ptr(kubevirtv1.EvictionStrategyLiveMigrate),
				DeveloperConfiguration: &kubevirtv1.DeveloperConfiguration{FeatureGates: []string{"Snapshot"}},
				MigrationConfiguration: &kubevirtv1.MigrationConfiguration{
					ParallelMigrationsPerCluster:      ptr(uint32(5)),
					ParallelOutboundMigrationsPerNode: ptr(uint32(2)),
					BandwidthPerMigration:             ptr(resource.MustParse("64Mi")),
					CompletionTimeoutPerGiB:           ptr(int64(150)),
					ProgressTimeout:                   ptr(int64(150)),
					AllowAutoConverge:                 ptr(true),
					AllowPostCopy:                     ptr(false),
					NodeDrainTaintKey:                 ptr("kubevirt.io/drain"),
				},
			},
		},
		Status: kubevirtv1.KubeVirtStatus{Phase: kubevirtv1.KubeVirtPhaseDeployed, ObservedKubeVirtVersion: "v1.8.0"},
	}
}

func d8VM(name string) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "virtualization.deckhouse.io/v1alpha2",
		"kind":       "VirtualMachine",
		"metadata":   map[string]any{"name": name, "namespace": ns},
		"spec": map[string]any{
			"virtualMachineClassName": "generic",
			"cpu":                     map[string]any{"cores": int64(2), "coreFraction": "50%"},
			"memory":                  map[string]any{"size": "4Gi"},
			"blockDeviceRefs":         []any{map[string]any{"kind": "VirtualDisk", "name": name + "-root"}},
			"nodeSelector":            map[string]any{"zone": "a"},
			"tolerations":             []any{map[string]any{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}},
			"provisioning":            map[string]any{"type": "UserData", "userData": "#cloud-config\n"},
		},
	}}
}

func vmop(name, typ string) *unstructured.Unstructured {
	return &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "virtualization.deckhouse.io/v1alpha2",
		"kind":       "VirtualMachineOperation",
		"metadata":   map[string]any{"name": name, "namespace": ns},
		"spec":       map[string]any{"type": typ, "virtualMachineName": "vm-1"},
	}}
}
