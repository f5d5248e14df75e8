package sim

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/utils/ptr"
	virtv1 "kubevirt.io/api/core/v1"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/drover-io/drover/integration/cluster"
)

// evTestPlane starts a test cluster and returns the clients of the eviction path, with no
// simulator running: the tests below own every object they create.
func evTestPlane(t *testing.T) *kvPlane {
	t.Helper()
	c := cluster.StartT(t)
	kv, err := newKVPlane(c.Config, zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel), nil, nil)
	require.NoError(t, err)
	return kv
}

// evNamespace creates a namespace with the "default" ServiceAccount pods need.
func evNamespace(t *testing.T, kv *kvPlane, name string) {
	t.Helper()
	ctx := context.Background()
	_, err := kv.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	require.NoError(t, err)
	_, err = kv.kube.CoreV1().ServiceAccounts(name).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		require.NoError(t, err)
	}
}

// evLauncher is one VMI and its virt-launcher pod, written straight to the API.
type evLauncher struct {
	strategy    *virtv1.EvictionStrategy
	migratable  bool
	vmiNode     string // status.nodeName of the VMI
	podNode     string // spec.nodeName of the pod
	podPhase    corev1.PodPhase
	notLauncher bool
}

func (l evLauncher) create(t *testing.T, kv *kvPlane, ns, name string) (*virtv1.VirtualMachineInstance, *corev1.Pod) {
	t.Helper()
	ctx := context.Background()
	vmi := &virtv1.VirtualMachineInstance{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: virtv1.VirtualMachineInstanceSpec{
			EvictionStrategy: l.strategy,
			Domain:           virtv1.DomainSpec{Devices: virtv1.Devices{}},
		},
		Status: virtv1.VirtualMachineInstanceStatus{Phase: virtv1.Running, NodeName: l.vmiNode},
	}
	cond := corev1.ConditionFalse
	if l.migratable {
		cond = corev1.ConditionTrue
	}
	vmi.Status.Conditions = []virtv1.VirtualMachineInstanceCondition{{Type: virtv1.VirtualMachineInstanceIsMigratable, Status: cond}}
	status := vmi.Status
	require.NoError(t, kv.c.Create(ctx, vmi))
	// The CRD may have a status subresource (then Create drops the status) or not.
	vmi.Status = status
	err := kv.c.Status().Update(ctx, vmi)
	if apierrors.IsNotFound(err) {
		err = kv.c.Update(ctx, vmi)
	}
	require.NoError(t, err)
	podNode := l.podNode
	if podNode == "" {
		podNode = l.vmiNode
	}
	labels := map[string]string{virtv1.AppLabel: "virt-launcher", virtv1.CreatedByLabel: string(vmi.UID)}
	if l.notLauncher {
		labels = map[string]string{"app": "web"}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Namespace:   ns,
			Name:        "virt-launcher-" + name + "-abcde",
			Labels:      labels,
			Annotations: map[string]string{virtv1.DomainAnnotation: name},
		},
		Spec: corev1.PodSpec{
			NodeName:   podNode,
			Containers: []corev1.Container{{Name: "compute", Image: "quay.io/kubevirt/virt-launcher:v1.8.0"}},
		},
	}
	pod, err = kv.kube.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	require.NoError(t, err)
	if l.podPhase != "" {
		pod.Status.Phase = l.podPhase
		pod, err = kv.kube.CoreV1().Pods(ns).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
		require.NoError(t, err)
	}
	return vmi, pod
}

func evAdmissionRequest(t *testing.T, pod *corev1.Pod, dryRunInRequest, dryRunInObject bool) *admissionv1.AdmissionRequest {
	t.Helper()
	ev := &policyv1.Eviction{
		TypeMeta:   metav1.TypeMeta{APIVersion: "policy/v1", Kind: "Eviction"},
		ObjectMeta: metav1.ObjectMeta{Namespace: pod.Namespace, Name: pod.Name},
	}
	if dryRunInObject {
		ev.DeleteOptions = &metav1.DeleteOptions{DryRun: []string{metav1.DryRunAll}}
	}
	raw, err := json.Marshal(ev)
	require.NoError(t, err)
	return &admissionv1.AdmissionRequest{
		UID:         "test",
		Namespace:   pod.Namespace,
		Name:        pod.Name,
		Operation:   admissionv1.Create,
		SubResource: "eviction",
		DryRun:      ptr.To(dryRunInRequest),
		Object:      runtime.RawExtension{Raw: raw},
	}
}

// TestAdmitEviction checks the admitter's decisions, KubeVirt 1.8's table, against objects in
// a real API server.
func TestAdmitEviction(t *testing.T) {
	kv := evTestPlane(t)
	const ns = "admit"
	evNamespace(t, kv, ns)
	lm := ptr.To(virtv1.EvictionStrategyLiveMigrate)
	lmip := ptr.To(virtv1.EvictionStrategyLiveMigrateIfPossible)
	ext := ptr.To(virtv1.EvictionStrategyExternal)
	none := ptr.To(virtv1.EvictionStrategyNone)

	tests := []struct {
		name       string
		launcher   evLauncher
		dryRunReq  bool
		dryRunObj  bool
		cluster    *virtv1.EvictionStrategy // KubeVirt CR evictionStrategy
		allowed    bool
		message    string // for denials: %[1]s is namespace/name, %[2]s the name
		wantMarked bool
	}{
		{name: "not a launcher", launcher: evLauncher{strategy: lm, migratable: true, vmiNode: "n1", notLauncher: true}, allowed: true},
		{name: "strategy None", launcher: evLauncher{strategy: none, migratable: true, vmiNode: "n1"}, allowed: true},
		{name: "no strategy, no cluster default", launcher: evLauncher{migratable: true, vmiNode: "n1"}, allowed: true},
		{name: "LiveMigrate migratable", launcher: evLauncher{strategy: lm, migratable: true, vmiNode: "n1"},
			message: `Eviction triggered evacuation of VMI "%[1]s"`, wantMarked: true},
		{name: "LiveMigrate not migratable", launcher: evLauncher{strategy: lm, vmiNode: "n1"},
			message: "VMI %[2]s is configured with an eviction strategy but is not live-migratable"},
		{name: "LiveMigrateIfPossible migratable", launcher: evLauncher{strategy: lmip, migratable: true, vmiNode: "n1"},
			message: `Eviction triggered evacuation of VMI "%[1]s"`, wantMarked: true},
		{name: "LiveMigrateIfPossible not migratable", launcher: evLauncher{strategy: lmip, vmiNode: "n1"}, allowed: true},
		{name: "External not migratable", launcher: evLauncher{strategy: ext, vmiNode: "n1"},
			message: `Eviction triggered evacuation of VMI "%[1]s"`, wantMarked: true},
		{name: "dry run in request", launcher: evLauncher{strategy: lm, migratable: true, vmiNode: "n1"}, dryRunReq: true,
			message: `Eviction triggered evacuation of VMI "%[1]s"`},
		{name: "dry run in eviction", launcher: evLauncher{strategy: lm, migratable: true, vmiNode: "n1"}, dryRunObj: true,
			message: `Eviction triggered evacuation of VMI "%[1]s"`},
		{name: "launcher on another node than the VMI (a migration target)", launcher: evLauncher{strategy: lm, migratable: true, vmiNode: "n1", podNode: "n2"},
			message: "Eviction request for target Pod"},
		{name: "finished launcher", launcher: evLauncher{strategy: lm, migratable: true, vmiNode: "n1", podPhase: corev1.PodSucceeded}, allowed: true},
		{name: "cluster default LiveMigrate", launcher: evLauncher{migratable: true, vmiNode: "n1"}, cluster: lm,
			message: `Eviction triggered evacuation of VMI "%[1]s"`, wantMarked: true},
		{name: "VMI strategy wins over cluster default", launcher: evLauncher{strategy: none, migratable: true, vmiNode: "n1"}, cluster: lm, allowed: true},
	}
	ctx := context.Background()
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			evSetClusterEvictionStrategy(t, kv, tt.cluster)
			name := fmt.Sprintf("vm-%d", i)
			vmi, pod := tt.launcher.create(t, kv, ns, name)
			resp := kv.admitEviction(ctx, evAdmissionRequest(t, pod, tt.dryRunReq, tt.dryRunObj))
			require.Equal(t, tt.allowed, resp.Allowed, "result: %+v", resp.Result)
			if !tt.allowed {
				require.NotNil(t, resp.Result)
				require.Equal(t, int32(http.StatusTooManyRequests), resp.Result.Code)
				want := tt.message
				if strings.Contains(want, "%") {
					want = fmt.Sprintf(want, ns+"/"+name, name)
				}
				require.Equal(t, want, resp.Result.Message)
			}
			got := &virtv1.VirtualMachineInstance{}
			require.NoError(t, kv.c.Get(ctx, ctrlclient.ObjectKeyFromObject(vmi), got))
			if tt.wantMarked {
				require.Equal(t, tt.launcher.vmiNode, got.Status.EvacuationNodeName)
				// A second eviction is denied without marking again.
				again := kv.admitEviction(ctx, evAdmissionRequest(t, pod, false, false))
				require.False(t, again.Allowed)
				require.Equal(t, fmt.Sprintf(`Evacuation in progress: Eviction triggered evacuation of VMI "%s/%s"`, ns, name), again.Result.Message)
			} else {
				require.Empty(t, got.Status.EvacuationNodeName)
			}
		})
	}
}

// evSetClusterEvictionStrategy creates or updates the KubeVirt CR with the given
// spec.configuration.evictionStrategy (nil removes it).
func evSetClusterEvictionStrategy(t *testing.T, kv *kvPlane, s *virtv1.EvictionStrategy) {
	t.Helper()
	ctx := context.Background()
	_, err := kv.kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "kubevirt"}}, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		require.NoError(t, err)
	}
	cr := &virtv1.KubeVirt{}
	err = kv.c.Get(ctx, ctrlclient.ObjectKey{Namespace: "kubevirt", Name: "kubevirt"}, cr)
	if apierrors.IsNotFound(err) {
		cr = &virtv1.KubeVirt{ObjectMeta: metav1.ObjectMeta{Namespace: "kubevirt", Name: "kubevirt"}}
		cr.Spec.Configuration.EvictionStrategy = s
		require.NoError(t, kv.c.Create(ctx, cr))
		return
	}
	require.NoError(t, err)
	cr.Spec.Configuration.EvictionStrategy = s
	require.NoError(t, kv.c.Update(ctx, cr))
}

// TestEvictionWebhookThroughAPIServer serves the webhook and evicts through the Eviction API,
// as kubectl drain does: the API server calls the webhook over TLS with the registered CA.
func TestEvictionWebhookThroughAPIServer(t *testing.T) {
	kv := evTestPlane(t)
	const ns = "wh"
	evNamespace(t, kv, ns)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := newVirtAPIWebhooks(kv, "kubevirt", "", kv.log)
	done := make(chan error, 1)
	go func() { done <- w.run(ctx) }()
	select {
	case <-w.ready:
	case err := <-done:
		t.Fatalf("webhook stopped before it was ready: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("webhook not registered after 30s")
	}

	// The configuration KubeVirt's operator would install, pointed at the simulator.
	cfg, err := kv.kube.AdmissionregistrationV1().ValidatingWebhookConfigurations().Get(ctx, ValidatingWebhookConfigName, metav1.GetOptions{})
	require.NoError(t, err)
	var wh *admissionregistrationv1.ValidatingWebhook
	for i := range cfg.Webhooks {
		if cfg.Webhooks[i].Name == evictionWebhookName {
			wh = &cfg.Webhooks[i]
		}
	}
	require.NotNil(t, wh, "eviction webhook in %+v", cfg.Webhooks)
	require.Equal(t, admissionregistrationv1.Fail, *wh.FailurePolicy, "KubeVirt >= 1.5")
	require.Equal(t, admissionregistrationv1.SideEffectClassNoneOnDryRun, *wh.SideEffects)
	require.Equal(t, []string{"v1"}, wh.AdmissionReviewVersions)
	require.Equal(t, []string{"pods/eviction"}, wh.Rules[0].Resources)
	require.Equal(t, []admissionregistrationv1.OperationType{admissionregistrationv1.OperationAll}, wh.Rules[0].Operations)
	require.Equal(t, `object.metadata.name.startsWith("virt-launcher")`, wh.MatchConditions[0].Expression)
	require.True(t, strings.HasPrefix(*wh.ClientConfig.URL, "https://127.0.0.1:"), *wh.ClientConfig.URL)
	require.True(t, strings.HasSuffix(*wh.ClientConfig.URL, evictionWebhookPath), *wh.ClientConfig.URL)
	require.Contains(t, string(wh.ClientConfig.CABundle), "BEGIN CERTIFICATE")
	for _, hook := range cfg.Webhooks {
		require.Equal(t, admissionregistrationv1.Fail, *hook.FailurePolicy, hook.Name)
	}
	mut, err := kv.kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, MutatingWebhookConfigName, metav1.GetOptions{})
	require.NoError(t, err)
	require.Len(t, mut.Webhooks, 1)
	require.Equal(t, migrationMutateWebhookName, mut.Webhooks[0].Name)

	lm := ptr.To(virtv1.EvictionStrategyLiveMigrate)
	migrating, migratingPod := evLauncher{strategy: lm, migratable: true, vmiNode: "n1"}.create(t, kv, ns, "migrating")
	dry, dryPod := evLauncher{strategy: lm, migratable: true, vmiNode: "n1"}.create(t, kv, ns, "dry")
	_, stuckPod := evLauncher{strategy: lm, vmiNode: "n1"}.create(t, kv, ns, "stuck")
	_, nonePod := evLauncher{strategy: ptr.To(virtv1.EvictionStrategyNone), vmiNode: "n1"}.create(t, kv, ns, "none")

	// The API server picks new webhook configurations up asynchronously: wait until a dry-run
	// eviction (no side effects) meets the webhook.
	evWaitWebhookActive(t, kv, dryPod)

	err = evEvict(ctx, kv, migratingPod, false)
	require.True(t, apierrors.IsTooManyRequests(err), "eviction of a LiveMigrate launcher: %v", err)
	require.Contains(t, err.Error(), fmt.Sprintf(`admission webhook %q denied the request: Eviction triggered evacuation of VMI "%s/migrating"`, evictionWebhookName, ns))
	got := &virtv1.VirtualMachineInstance{}
	require.NoError(t, kv.c.Get(ctx, ctrlclient.ObjectKeyFromObject(migrating), got))
	require.Equal(t, "n1", got.Status.EvacuationNodeName)
	err = evEvict(ctx, kv, migratingPod, false)
	require.True(t, apierrors.IsTooManyRequests(err), "second eviction: %v", err)
	require.Contains(t, err.Error(), "Evacuation in progress")

	err = evEvict(ctx, kv, dryPod, true)
	require.True(t, apierrors.IsTooManyRequests(err), "dry-run eviction: %v", err)
	require.NoError(t, kv.c.Get(ctx, ctrlclient.ObjectKeyFromObject(dry), got))
	require.Empty(t, got.Status.EvacuationNodeName, "a dry-run eviction must not mark the VMI")

	err = evEvict(ctx, kv, stuckPod, false)
	require.True(t, apierrors.IsTooManyRequests(err), "eviction of a LiveMigrate launcher that cannot migrate: %v", err)
	require.Contains(t, err.Error(), "is configured with an eviction strategy but is not live-migratable")

	require.NoError(t, evEvict(ctx, kv, nonePod, false), "eviction of a launcher with eviction strategy None")
	p, err := kv.kube.CoreV1().Pods(ns).Get(ctx, nonePod.Name, metav1.GetOptions{})
	if err == nil {
		require.NotNil(t, p.DeletionTimestamp, "an allowed eviction deletes the pod")
	} else {
		require.True(t, apierrors.IsNotFound(err), "get evicted pod: %v", err)
	}

	// A clean shutdown removes the configuration it registered.
	cancel()
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(20 * time.Second):
		t.Fatal("webhook did not stop within 20s")
	}
	_, err = kv.kube.AdmissionregistrationV1().ValidatingWebhookConfigurations().Get(context.Background(), ValidatingWebhookConfigName, metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "validating configuration after shutdown: %v", err)
	_, err = kv.kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(context.Background(), MutatingWebhookConfigName, metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "mutating configuration after shutdown: %v", err)
}

// evEvict evicts a pod through the Eviction API.
func evEvict(ctx context.Context, kv *kvPlane, pod *corev1.Pod, dryRun bool) error {
	ev := &policyv1.Eviction{ObjectMeta: metav1.ObjectMeta{Namespace: pod.Namespace, Name: pod.Name}}
	if dryRun {
		ev.DeleteOptions = &metav1.DeleteOptions{DryRun: []string{metav1.DryRunAll}}
	}
	return kv.kube.CoreV1().Pods(pod.Namespace).EvictV1(ctx, ev)
}

// evWaitWebhookActive waits until the API server sends evictions of pod to the webhook. pod
// must belong to a migratable LiveMigrate VMI; the probes are dry runs.
func evWaitWebhookActive(t *testing.T, kv *kvPlane, pod *corev1.Pod) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := evEvict(context.Background(), kv, pod, true)
		if apierrors.IsTooManyRequests(err) && strings.Contains(err.Error(), evictionWebhookName) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the API server did not call the eviction webhook within 30s (last answer: %v)", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestWebhookURLAndCertificate: the advertised URL and the serving certificate agree for the
// default and for configured listen addresses.
func TestWebhookURLAndCertificate(t *testing.T) {
	tests := []struct {
		name, listen, wantURLPrefix string
	}{
		{name: "default", listen: "127.0.0.1:0", wantURLPrefix: "https://127.0.0.1:"},
		{name: "all interfaces", listen: "0.0.0.0:0", wantURLPrefix: "https://127.0.0.1:"},
		{name: "host name", listen: "localhost:0", wantURLPrefix: "https://localhost:"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", tt.listen)
			require.NoError(t, err)
			defer ln.Close()
			host, _, err := net.SplitHostPort(tt.listen)
			require.NoError(t, err)
			url := webhookURL(host, ln.Addr())
			require.True(t, strings.HasPrefix(url, tt.wantURLPrefix), url)

			caPEM, serving, err := generateWebhookCerts(time.Now(), host)
			require.NoError(t, err)
			pool := x509.NewCertPool()
			require.True(t, pool.AppendCertsFromPEM(caPEM))
			leaf, err := x509.ParseCertificate(serving.Certificate[0])
			require.NoError(t, err)
			urlHost, _, err := net.SplitHostPort(strings.TrimPrefix(url, "https://"))
			require.NoError(t, err)
			_, err = leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: urlHost, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
			require.NoError(t, err, "the certificate is valid for %s", urlHost)
		})
	}
}
