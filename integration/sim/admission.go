package sim

// KubeVirt's admission of VirtualMachineInstances and VirtualMachineInstanceMigrations, as
// virt-api serves it (KubeVirt 1.8), and the identity KubeVirt's own components write with.
// KubeVirt trusts its service accounts (pkg/virt-api/webhooks/serviceaccounts.go): only they
// may change a VMI's spec or its reserved labels, and only virt-controller may set a
// migration's priority. The simulator's KubeVirt components act as virt-controller's service
// account (kubeVirtConfig); Simulator.KubeVirt and every other client are users.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	virtv1 "kubevirt.io/api/core/v1"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"
)

// KubeVirt's service accounts (pkg/virt-operator/resource/generate/components/serviceaccountnames.go).
const (
	saAPIServer       = "kubevirt-apiserver"
	saController      = "kubevirt-controller"
	saHandler         = "kubevirt-handler"
	saSyncController  = "kubevirt-synchronization-controller"
	featureGateMigPrQ = "MigrationPriorityQueue"
)

func serviceAccountUser(ns, name string) string { return "system:serviceaccount:" + ns + ":" + name }

// kubeVirtServiceAccounts is KubeVirtServiceAccounts: the users KubeVirt's admission trusts.
func kubeVirtServiceAccounts(ns string) map[string]bool {
	out := map[string]bool{}
	for _, sa := range []string{saAPIServer, saController, saHandler, saSyncController} {
		out[serviceAccountUser(ns, sa)] = true
	}
	return out
}

// kubeVirtConfig is cfg acting as virt-controller's service account in namespace ns, so that
// KubeVirt's admission sees the simulator's KubeVirt components as KubeVirt. It impersonates
// the group system:masters as well: the simulator needs no RBAC objects, and works with any
// configuration allowed to impersonate (an admin's).
func kubeVirtConfig(cfg *rest.Config, ns string) *rest.Config {
	c := rest.CopyConfig(cfg)
	c.Impersonate = rest.ImpersonationConfig{
		UserName: serviceAccountUser(ns, saController),
		Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + ns, "system:authenticated", "system:masters"},
	}
	return c
}

// restrictedVMILabels are the labels only KubeVirt may set on a VMI (vmi-create-admitter.go).
var restrictedVMILabels = []string{
	virtv1.CreatedByLabel, virtv1.MigrationJobLabel, virtv1.NodeNameLabel, virtv1.MigrationTargetNodeNameLabel,
	virtv1.NodeSchedulable, virtv1.InstallStrategyLabel,
}

func reservedVMILabels(labels map[string]string) map[string]string {
	out := map[string]string{}
	for _, k := range restrictedVMILabels {
		if v, ok := labels[k]; ok {
			out[k] = v
		}
	}
	return out
}

// refused is KubeVirt's ToAdmissionResponse: a validation failure (422) with its cause.
func refused(field, message string) *admissionv1.AdmissionResponse {
	return &admissionv1.AdmissionResponse{Result: &metav1.Status{
		Message: message, Reason: metav1.StatusReasonInvalid, Code: http.StatusUnprocessableEntity,
		Details: &metav1.StatusDetails{Causes: []metav1.StatusCause{{Type: metav1.CauseTypeFieldValueNotSupported, Message: message, Field: field}}},
	}}
}

// refusedError is KubeVirt's ToAdmissionResponseError (400).
func refusedError(message string) *admissionv1.AdmissionResponse {
	return &admissionv1.AdmissionResponse{Result: &metav1.Status{Message: message, Code: http.StatusBadRequest}}
}

// admitVMICreate is the part of VMICreateAdmitter (vmi-create-admitter.go) drover can meet:
// ValidateVirtualMachineInstanceMetadata's reserved labels. The spec validation is left out.
func (w *virtAPIWebhooks) admitVMICreate(_ context.Context, req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse {
	var vmi virtv1.VirtualMachineInstance
	if err := json.Unmarshal(req.Object.Raw, &vmi); err != nil {
		return refusedError(err.Error())
	}
	if !w.serviceAccounts[req.UserInfo.Username] && len(reservedVMILabels(vmi.Labels)) > 0 {
		return refused("metadata.labels", "creation of the following reserved kubevirt.io/ labels on a VMI object is prohibited")
	}
	return allowedResponse()
}

// admitVMIUpdate is VMIUpdateAdmitter (vmi-update-admitter.go) without hotplug and node
// restriction: only KubeVirt's service accounts may change a VMI's spec or its reserved
// labels. Anyone may change its status (VMIs have no status subresource).
func (w *virtAPIWebhooks) admitVMIUpdate(_ context.Context, req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse {
	var cur, old virtv1.VirtualMachineInstance
	if err := json.Unmarshal(req.Object.Raw, &cur); err != nil {
		return refusedError(err.Error())
	}
	if err := json.Unmarshal(req.OldObject.Raw, &old); err != nil {
		return refusedError(err.Error())
	}
	if w.serviceAccounts[req.UserInfo.Username] {
		return allowedResponse()
	}
	if !equality.Semantic.DeepEqual(cur.Spec, old.Spec) {
		return refused("", "update of VMI object is restricted")
	}
	if !equality.Semantic.DeepEqual(reservedVMILabels(cur.Labels), reservedVMILabels(old.Labels)) {
		return refused("", "modification of the following reserved kubevirt.io/ labels on a VMI object is prohibited")
	}
	return allowedResponse()
}

// mutateMigrationCreate is MigrationCreateMutator (migration-create-mutator.go): the selector
// label and the finalizer are there from the start.
func (w *virtAPIWebhooks) mutateMigrationCreate(_ context.Context, req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse {
	var mig virtv1.VirtualMachineInstanceMigration
	if err := json.Unmarshal(req.Object.Raw, &mig); err != nil {
		return refusedError(err.Error())
	}
	if mig.Labels == nil {
		mig.Labels = map[string]string{}
	}
	mig.Labels[virtv1.MigrationSelectorLabel] = mig.Spec.VMIName
	if !slices.Contains(mig.Finalizers, virtv1.VirtualMachineInstanceMigrationFinalizer) {
		mig.Finalizers = append(mig.Finalizers, virtv1.VirtualMachineInstanceMigrationFinalizer)
	}
	patch, err := json.Marshal([]map[string]any{{"op": "replace", "path": "/metadata", "value": mig.ObjectMeta}})
	if err != nil {
		return refusedError(err.Error())
	}
	pt := admissionv1.PatchTypeJSONPatch
	return &admissionv1.AdmissionResponse{Allowed: true, Patch: patch, PatchType: &pt}
}

// admitMigrationCreate is MigrationCreateAdmitter (migration-create-admitter.go), without
// decentralized migrations: spec.priority only from virt-controller and with the
// MigrationPriorityQueue feature gate; the VMI must exist, not be final, be live-migratable and
// have no unfinished migration.
func (w *virtAPIWebhooks) admitMigrationCreate(ctx context.Context, req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse {
	var mig virtv1.VirtualMachineInstanceMigration
	if err := json.Unmarshal(req.Object.Raw, &mig); err != nil {
		return refusedError(err.Error())
	}
	if mig.Spec.VMIName == "" {
		return refused("spec.vmiName", "vmiName is missing")
	}
	if mig.Spec.Priority != nil {
		cfg, err := w.kv.kubeVirtConfiguration(ctx)
		if err != nil {
			return refusedError(err.Error())
		}
		if !featureGateEnabled(cfg, featureGateMigPrQ) {
			return refused("spec.migrationPriority", "MigrationPriorityQueue feature gate is not enabled in kubevirt resource")
		}
		if req.UserInfo.Username != serviceAccountUser(w.kubevirtNS, saController) {
			return refused("spec.migrationPriority", "Migration priority queue, only virt-controller is allowed to set priority field")
		}
	}
	ns := req.Namespace
	vmi := &virtv1.VirtualMachineInstance{}
	err := w.kv.c.Get(ctx, ctrlclient.ObjectKey{Namespace: ns, Name: mig.Spec.VMIName}, vmi)
	if apierrors.IsNotFound(err) {
		return refusedError(fmt.Sprintf("the VMI \"%s/%s\" does not exist", ns, mig.Spec.VMIName))
	}
	if err != nil {
		return refusedError(err.Error())
	}
	if vmi.IsFinal() {
		return refusedError("Cannot migrate VMI in finalized state.")
	}
	if c := vmiCondition(vmi, virtv1.VirtualMachineInstanceIsMigratable); c != nil && c.Status == corev1.ConditionFalse {
		return refusedError(fmt.Sprintf("Cannot migrate VMI, Reason: %s, Message: %s", c.Reason, c.Message))
	}
	var migs virtv1.VirtualMachineInstanceMigrationList
	if err := w.kv.c.List(ctx, &migs, ctrlclient.InNamespace(ns), ctrlclient.MatchingLabels{virtv1.MigrationSelectorLabel: mig.Spec.VMIName}); err != nil {
		return refusedError(err.Error())
	}
	for _, m := range migs.Items {
		if !m.IsFinal() {
			return refusedError(fmt.Sprintf("in-flight migration detected. Active migration job (%s) is currently already in progress for VMI %s.", m.UID, m.Spec.VMIName))
		}
	}
	return allowedResponse()
}

// featureGateEnabled reports a feature gate of spec.configuration.developerConfiguration.
func featureGateEnabled(cfg virtv1.KubeVirtConfiguration, gate string) bool {
	return cfg.DeveloperConfiguration != nil && slices.Contains(cfg.DeveloperConfiguration.FeatureGates, gate)
}
