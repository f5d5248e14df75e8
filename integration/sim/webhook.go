package sim

// virt-api's admission webhooks, served by the simulator itself over HTTPS with a CA it
// generates in memory and registered with the API server by URL, as KubeVirt's virt-operator
// registers them for the virt-api Service
// (pkg/virt-operator/resource/generate/components/webhooks.go): the pod eviction validator
// (KubeVirt's eviction path, part 1), VirtualMachineInstance create and update validators,
// and the VirtualMachineInstanceMigration create validator and mutator (admission.go). Every
// one has failurePolicy Fail, as in KubeVirt 1.5 and later, and answers only while a virt-api
// pod is Ready on a live node (see virtAPIAvailable): otherwise the API server reports the
// failed webhook call and refuses the request, as on a cluster whose virt-api is gone.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"math/big"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/rs/zerolog"
	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	virtv1 "kubevirt.io/api/core/v1"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"
)

const (
	// ValidatingWebhookConfigName and MutatingWebhookConfigName are the configurations the
	// simulator registers. They are not KubeVirt's own names (virt-api-validator,
	// virt-api-mutator) so that the simulator never replaces the configuration of a real
	// KubeVirt installation.
	ValidatingWebhookConfigName = "drover-sim-virt-api-validator"
	MutatingWebhookConfigName   = "drover-sim-virt-api-mutator"

	// KubeVirt's webhook names: the API server puts them into the message a client sees
	// ("admission webhook %q denied the request: ..."), so they are kept verbatim.
	evictionWebhookName        = "virt-launcher-eviction-interceptor.kubevirt.io"
	vmiCreateWebhookName       = "virtualmachineinstances-create-validator.kubevirt.io"
	vmiUpdateWebhookName       = "virtualmachineinstances-update-validator.kubevirt.io"
	migrationCreateWebhookName = "migration-create-validator.kubevirt.io"
	migrationMutateWebhookName = "migrations-mutator.kubevirt.io"

	// KubeVirt's paths (components/webhooks.go).
	evictionWebhookPath        = "/pod-eviction-validate"
	vmiCreateWebhookPath       = "/virtualmachineinstances-validate-create"
	vmiUpdateWebhookPath       = "/virtualmachineinstances-validate-update"
	migrationCreateWebhookPath = "/migration-validate-create"
	migrationMutateWebhookPath = "/migration-mutate-create"

	// webhookManagedByLabel marks the configurations as the simulator's.
	webhookManagedByLabel = "app.kubernetes.io/managed-by"
	webhookManagedByValue = "drover-sim"
	// defaultWebhookListenAddr is used when the simulator is not told where to listen.
	defaultWebhookListenAddr = "127.0.0.1:0"
)

// EnvWebhookListenAddr names the environment variable that sets, when Options.WebhookListenAddr
// is empty, where the simulator's webhooks listen (host:port; port 0 picks one). Default
// 127.0.0.1 on a random port. The API server must be able to reach it at that host, which the
// serving certificate covers; an unspecified host (0.0.0.0) is advertised as 127.0.0.1.
const EnvWebhookListenAddr = "DROVER_SIM_WEBHOOK_ADDR"

// runWebhooks serves virt-api's webhooks and keeps them registered until ctx ends (see
// virtAPIWebhooks.run for what happens to the registration on shutdown).
func (s *Simulator) runWebhooks(ctx context.Context) error { return s.webhooks.run(ctx) }

// webhookListenAddr is Options.WebhookListenAddr, else $DROVER_SIM_WEBHOOK_ADDR.
func webhookListenAddr(o Options) string {
	if o.WebhookListenAddr != "" {
		return o.WebhookListenAddr
	}
	return os.Getenv(EnvWebhookListenAddr)
}

// waitWebhooksActive waits until the webhooks are registered and the API server calls them
// (it picks new configurations up asynchronously): a dry-run migration of a VMI that does not
// exist is refused by the webhook, or fails calling it while virt-api is down. It reports
// false when ctx ends first.
func (s *Simulator) waitWebhooksActive(ctx context.Context) bool {
	select {
	case <-ctx.Done():
		return false
	case <-s.webhooks.ready:
	}
	probe := &virtv1.VirtualMachineInstanceMigration{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "drover-sim-probe-", Namespace: s.opts.KubeVirtNamespace},
		Spec:       virtv1.VirtualMachineInstanceMigrationSpec{VMIName: "drover-sim-probe"},
	}
	for {
		_, err := s.KubeVirt.VirtualMachineInstanceMigrations(probe.Namespace).Create(ctx, probe, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err != nil && (strings.Contains(err.Error(), "admission webhook") || strings.Contains(err.Error(), "failed calling webhook")) {
			s.log.Debug().Err(err).Msg("virt-api webhooks active")
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// virtAPIWebhooks serves virt-api's admission webhooks. Start with run; it blocks until ctx
// ends.
type virtAPIWebhooks struct {
	kv         *kvPlane
	listenAddr string
	log        zerolog.Logger
	// kubevirtNS is where KubeVirt runs; serviceAccounts are the users its admission trusts
	// (webhooks/serviceaccounts.go).
	kubevirtNS      string
	serviceAccounts map[string]bool
	// available says whether virt-api can answer now and, when not, what the API server meets
	// instead (nil: always).
	available func() (bool, string)

	// ready is closed once the configurations are registered (tests wait on it).
	ready chan struct{}
	// url is the base URL registered with the API server; valid after ready is closed.
	url string
}

func newVirtAPIWebhooks(kv *kvPlane, kubevirtNamespace, listenAddr string, log zerolog.Logger) *virtAPIWebhooks {
	if listenAddr == "" {
		listenAddr = defaultWebhookListenAddr
	}
	return &virtAPIWebhooks{
		kv:              kv,
		listenAddr:      listenAddr,
		log:             log.With().Str("component", "virt-api").Logger(),
		kubevirtNS:      kubevirtNamespace,
		serviceAccounts: kubeVirtServiceAccounts(kubevirtNamespace),
		ready:           make(chan struct{}),
	}
}

// run serves the webhooks and keeps their registration until ctx ends. On a clean shutdown it
// removes the configurations it registered (only if they still point at this process): with
// failurePolicy Fail a configuration left behind would refuse every VMI and migration write
// and every eviction of a virt-launcher pod in the cluster. A crashed simulator leaves them
// behind; the next start overwrites them.
func (w *virtAPIWebhooks) run(ctx context.Context) error {
	ln, err := net.Listen("tcp", w.listenAddr)
	if err != nil {
		return fmt.Errorf("virt-api webhooks: listen on %s: %w", w.listenAddr, err)
	}
	var extraHosts []string
	configured, _, _ := net.SplitHostPort(w.listenAddr)
	if configured != "" {
		extraHosts = append(extraHosts, configured)
	}
	w.url = webhookURL(configured, ln.Addr())
	caPEM, serving, err := generateWebhookCerts(time.Now(), extraHosts...)
	if err != nil {
		return errors.Join(fmt.Errorf("virt-api webhooks: %w", err), ln.Close())
	}

	mux := http.NewServeMux()
	for path, admit := range map[string]admitFunc{
		evictionWebhookPath:        w.kv.admitEviction,
		vmiCreateWebhookPath:       w.admitVMICreate,
		vmiUpdateWebhookPath:       w.admitVMIUpdate,
		migrationCreateWebhookPath: w.admitMigrationCreate,
		migrationMutateWebhookPath: w.mutateMigrationCreate,
	} {
		mux.HandleFunc(path, w.serveAdmission(path, admit))
	}
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{serving}, MinVersion: tls.VersionTLS12},
		// TLS handshake errors (a client that does not trust the CA) are worth a debug line.
		ErrorLog: stdlog.New(webhookDebugWriter{w.log}, "", 0),
	}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.ServeTLS(ln, "", "") }()

	shutdown := func() error {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	}

	// Keep trying to register: an API server that is briefly unavailable must not stop the
	// simulator.
	var reg registeredWebhooks
	for {
		reg, err = w.register(ctx, caPEM)
		if err == nil {
			break
		}
		w.log.Warn().Err(err).Msg("register virt-api webhooks; retrying")
		select {
		case <-ctx.Done():
			return shutdown()
		case err := <-serveErr:
			return fmt.Errorf("virt-api webhooks: serve on %s: %w", w.url, err)
		case <-time.After(time.Second):
		}
	}
	close(w.ready)
	w.log.Info().Str("url", w.url).Str("validating", ValidatingWebhookConfigName).Str("mutating", MutatingWebhookConfigName).
		Msg("virt-api webhooks registered")

	var serveFailed error
	select {
	case <-ctx.Done():
	case err := <-serveErr:
		if !errors.Is(err, http.ErrServerClosed) {
			serveFailed = fmt.Errorf("virt-api webhooks: serve on %s: %w", w.url, err)
		}
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	return errors.Join(serveFailed, w.unregister(dctx, reg), shutdown())
}

// webhookURL is the base URL the API server calls: the configured listen host when it names
// one (a host name or a specific address, which the serving certificate then covers), else the
// listener's address, an unspecified one (0.0.0.0, ::) being advertised as 127.0.0.1.
func webhookURL(configuredHost string, addr net.Addr) string {
	host, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return "https://" + addr.String()
	}
	if ip := net.ParseIP(configuredHost); configuredHost != "" && (ip == nil || !ip.IsUnspecified()) {
		host = configuredHost
	} else if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "https://" + net.JoinHostPort(host, port)
}

// webhookRule is one rule of a KubeVirt webhook.
func webhookRule(group, resource string, ops ...admissionregistrationv1.OperationType) []admissionregistrationv1.RuleWithOperations {
	return []admissionregistrationv1.RuleWithOperations{{
		Operations: ops,
		Rule:       admissionregistrationv1.Rule{APIGroups: []string{group}, APIVersions: []string{"v1"}, Resources: []string{resource}},
	}}
}

// validatingConfig is the part of virt-operator's virt-api-validator configuration the
// simulator serves, pointed at its URL instead of the virt-api Service.
func (w *virtAPIWebhooks) validatingConfig(caPEM []byte) *admissionregistrationv1.ValidatingWebhookConfiguration {
	fail := admissionregistrationv1.Fail
	none := admissionregistrationv1.SideEffectClassNone
	noneOnDryRun := admissionregistrationv1.SideEffectClassNoneOnDryRun
	timeout := int32(10)
	hook := func(name, path string, sideEffects *admissionregistrationv1.SideEffectClass, rules []admissionregistrationv1.RuleWithOperations) admissionregistrationv1.ValidatingWebhook {
		url := w.url + path
		return admissionregistrationv1.ValidatingWebhook{
			Name: name, AdmissionReviewVersions: []string{"v1"}, FailurePolicy: &fail, SideEffects: sideEffects,
			TimeoutSeconds: &timeout, Rules: rules,
			ClientConfig: admissionregistrationv1.WebhookClientConfig{URL: &url, CABundle: caPEM},
		}
	}
	eviction := hook(evictionWebhookName, evictionWebhookPath, &noneOnDryRun,
		webhookRule("", "pods/eviction", admissionregistrationv1.OperationAll))
	// Only evictions of virt-launcher pods reach virt-api: with failurePolicy Fail, a virt-api
	// that is down blocks only those.
	eviction.MatchConditions = []admissionregistrationv1.MatchCondition{{Name: "only-vms", Expression: `object.metadata.name.startsWith("virt-launcher")`}}
	return &admissionregistrationv1.ValidatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: ValidatingWebhookConfigName, Labels: map[string]string{webhookManagedByLabel: webhookManagedByValue}},
		Webhooks: []admissionregistrationv1.ValidatingWebhook{
			eviction,
			hook(vmiCreateWebhookName, vmiCreateWebhookPath, &none, webhookRule(virtv1.SchemeGroupVersion.Group, resVMI, admissionregistrationv1.Create)),
			hook(vmiUpdateWebhookName, vmiUpdateWebhookPath, &none, webhookRule(virtv1.SchemeGroupVersion.Group, resVMI, admissionregistrationv1.Update)),
			hook(migrationCreateWebhookName, migrationCreateWebhookPath, &none, webhookRule(virtv1.SchemeGroupVersion.Group, resVMIM, admissionregistrationv1.Create)),
		},
	}
}

// mutatingConfig is the part of virt-operator's virt-api-mutator configuration the simulator
// serves.
func (w *virtAPIWebhooks) mutatingConfig(caPEM []byte) *admissionregistrationv1.MutatingWebhookConfiguration {
	fail := admissionregistrationv1.Fail
	none := admissionregistrationv1.SideEffectClassNone
	timeout := int32(10)
	url := w.url + migrationMutateWebhookPath
	return &admissionregistrationv1.MutatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: MutatingWebhookConfigName, Labels: map[string]string{webhookManagedByLabel: webhookManagedByValue}},
		Webhooks: []admissionregistrationv1.MutatingWebhook{{
			Name: migrationMutateWebhookName, AdmissionReviewVersions: []string{"v1"}, FailurePolicy: &fail, SideEffects: &none,
			TimeoutSeconds: &timeout, Rules: webhookRule(virtv1.SchemeGroupVersion.Group, resVMIM, admissionregistrationv1.Create),
			ClientConfig: admissionregistrationv1.WebhookClientConfig{URL: &url, CABundle: caPEM},
		}},
	}
}

// registeredWebhooks are the UIDs of the configurations this process registered.
type registeredWebhooks struct{ validating, mutating types.UID }

// register creates or updates both configurations.
func (w *virtAPIWebhooks) register(ctx context.Context, caPEM []byte) (registeredWebhooks, error) {
	var reg registeredWebhooks
	var err error
	admission := w.kv.kube.AdmissionregistrationV1()
	reg.validating, err = applyWebhookConfig(ctx, admission.ValidatingWebhookConfigurations(), w.validatingConfig(caPEM),
		func(cur, want *admissionregistrationv1.ValidatingWebhookConfiguration) {
			cur.Labels, cur.Webhooks = want.Labels, want.Webhooks
		})
	if err != nil {
		return reg, err
	}
	reg.mutating, err = applyWebhookConfig(ctx, admission.MutatingWebhookConfigurations(), w.mutatingConfig(caPEM),
		func(cur, want *admissionregistrationv1.MutatingWebhookConfiguration) {
			cur.Labels, cur.Webhooks = want.Labels, want.Webhooks
		})
	return reg, err
}

// unregister deletes both configurations if they are still the ones this process registered.
func (w *virtAPIWebhooks) unregister(ctx context.Context, reg registeredWebhooks) error {
	admission := w.kv.kube.AdmissionregistrationV1()
	return errors.Join(
		deleteWebhookConfig(ctx, w.log, admission.ValidatingWebhookConfigurations(), ValidatingWebhookConfigName, reg.validating,
			func(c *admissionregistrationv1.ValidatingWebhookConfiguration) bool {
				return len(c.Webhooks) > 0 && c.Webhooks[0].ClientConfig.URL != nil && strings.HasPrefix(*c.Webhooks[0].ClientConfig.URL, w.url+"/")
			}),
		deleteWebhookConfig(ctx, w.log, admission.MutatingWebhookConfigurations(), MutatingWebhookConfigName, reg.mutating,
			func(c *admissionregistrationv1.MutatingWebhookConfiguration) bool {
				return len(c.Webhooks) > 0 && c.Webhooks[0].ClientConfig.URL != nil && strings.HasPrefix(*c.Webhooks[0].ClientConfig.URL, w.url+"/")
			}),
	)
}

// webhookConfigAPI is what applyWebhookConfig and deleteWebhookConfig need of the typed
// clients of validating and mutating webhook configurations.
type webhookConfigAPI[T interface {
	metav1.Object
	runtime.Object
}] interface {
	Get(ctx context.Context, name string, opts metav1.GetOptions) (T, error)
	Create(ctx context.Context, obj T, opts metav1.CreateOptions) (T, error)
	Update(ctx context.Context, obj T, opts metav1.UpdateOptions) (T, error)
	Delete(ctx context.Context, name string, opts metav1.DeleteOptions) error
}

// applyWebhookConfig creates want, or copies it (setFrom) into the existing configuration of
// its name, and returns the UID.
func applyWebhookConfig[T interface {
	metav1.Object
	runtime.Object
}](ctx context.Context, api webhookConfigAPI[T], want T, setFrom func(cur, want T)) (types.UID, error) {
	kind := fmt.Sprintf("%T", want)
	for attempt := 0; ; attempt++ {
		cur, err := api.Get(ctx, want.GetName(), metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			created, err := api.Create(ctx, want, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) && attempt < 5 {
				continue
			}
			if err != nil {
				return "", fmt.Errorf("create %s %s: %w", kind, want.GetName(), err)
			}
			return created.GetUID(), nil
		case err != nil:
			return "", fmt.Errorf("get %s %s: %w", kind, want.GetName(), err)
		}
		upd := cur.DeepCopyObject().(T)
		setFrom(upd, want)
		updated, err := api.Update(ctx, upd, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) && attempt < 5 {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("update %s %s: %w", kind, want.GetName(), err)
		}
		return updated.GetUID(), nil
	}
}

// deleteWebhookConfig deletes the configuration name if it has uid and still points at this
// process (ours).
func deleteWebhookConfig[T interface {
	metav1.Object
	runtime.Object
}](ctx context.Context, log zerolog.Logger, api webhookConfigAPI[T], name string, uid types.UID, ours func(T) bool) error {
	cur, err := api.Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("get webhook configuration %s: %w", name, err)
	}
	if cur.GetUID() != uid || !ours(cur) {
		log.Debug().Str("config", name).Msg("webhook configuration now belongs to another simulator; leaving it")
		return nil
	}
	uid, rv := cur.GetUID(), cur.GetResourceVersion()
	err = api.Delete(ctx, name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid, ResourceVersion: &rv}})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("delete webhook configuration %s: %w", name, err)
	}
	return nil
}

// admitFunc decides one admission request.
type admitFunc func(ctx context.Context, req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse

// serveAdmission decodes an AdmissionReview, admits it and writes the review back. While
// virt-api is not available it fails the call instead, as a Service without a live endpoint
// does: the API server then refuses the request (failurePolicy Fail).
func (w *virtAPIWebhooks) serveAdmission(path string, admit admitFunc) http.HandlerFunc {
	return func(rw http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(rw, "only POST", http.StatusMethodNotAllowed)
			return
		}
		if w.available != nil {
			if ok, why := w.available(); !ok {
				w.log.Debug().Str("path", path).Str("why", why).Msg("virt-api unavailable: failing the webhook call")
				// A Status body, so that the API server's error names the cause ("failed calling
				// webhook ...: failed to call webhook: <why>").
				rw.Header().Set("Content-Type", "application/json")
				rw.WriteHeader(http.StatusServiceUnavailable)
				_ = json.NewEncoder(rw).Encode(metav1.Status{
					TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Status"},
					Status:   metav1.StatusFailure, Message: why, Reason: metav1.StatusReasonServiceUnavailable, Code: http.StatusServiceUnavailable,
				})
				return
			}
		}
		body, err := io.ReadAll(io.LimitReader(r.Body, 4<<20))
		if err != nil {
			http.Error(rw, "read body: "+err.Error(), http.StatusBadRequest)
			return
		}
		var review admissionv1.AdmissionReview
		if err := json.Unmarshal(body, &review); err != nil || review.Request == nil {
			http.Error(rw, "not an admission.k8s.io/v1 AdmissionReview", http.StatusBadRequest)
			return
		}
		resp := admit(r.Context(), review.Request)
		resp.UID = review.Request.UID
		out := admissionv1.AdmissionReview{
			TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
			Response: resp,
		}
		ev := w.log.Debug().Str("path", path).Str("object", review.Request.Namespace+"/"+review.Request.Name).
			Str("user", review.Request.UserInfo.Username).Bool("allowed", resp.Allowed)
		if resp.Result != nil {
			ev = ev.Str("message", resp.Result.Message)
		}
		ev.Msg("admission")
		rw.Header().Set("Content-Type", "application/json")
		if err := json.NewEncoder(rw).Encode(out); err != nil {
			w.log.Warn().Err(err).Msg("write admission review")
		}
	}
}

// admitEviction is KubeVirt's PodEvictionAdmitter.Admit (1.8,
// pkg/virt-api/webhooks/validating-webhook/admitters/pod-eviction-admitter.go):
//   - a pod that cannot be read, is not a virt-launcher, has finished (Succeeded/Failed) or
//     names no domain is allowed;
//   - a VMI that cannot be read denies the eviction (the client retries);
//   - eviction strategy (VMI, else the KubeVirt CR, else None): None, and LiveMigrateIfPossible
//     on a VMI that cannot migrate, are allowed (the pod is deleted; the run strategy decides);
//     LiveMigrate on a VMI that cannot migrate is denied for good;
//     LiveMigrate / LiveMigrateIfPossible on a migratable VMI, and External, mark the VMI
//     (status.evacuationNodeName = its node, a dry-run patch for dry-run evictions) and deny
//     with 429 "Eviction triggered evacuation of VMI", and keep denying ("Evacuation in
//     progress: ...") while the mark stays;
//   - a launcher pod that is not on the VMI's current node (a migration target, or a source
//     pod left behind after a migration that has not completed yet) is denied with 429
//     "Eviction request for target Pod", once the mark has been checked.
func (kv *kvPlane) admitEviction(ctx context.Context, req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse {
	pod, err := kv.kube.CoreV1().Pods(req.Namespace).Get(ctx, req.Name, metav1.GetOptions{})
	if err != nil {
		return allowedResponse()
	}
	if pod.Labels[virtv1.AppLabel] != "virt-launcher" {
		return allowedResponse()
	}
	if pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return allowedResponse()
	}
	vmiName := launcherVMIName(pod)
	if vmiName == "" {
		return allowedResponse()
	}
	vmi := &virtv1.VirtualMachineInstance{}
	if err := kv.c.Get(ctx, ctrlclient.ObjectKey{Namespace: req.Namespace, Name: vmiName}, vmi); err != nil {
		return deniedResponse(fmt.Sprintf("kubevirt failed getting the vmi: %s", err.Error()))
	}
	clusterStrategy, err := kv.clusterEvictionStrategy(ctx)
	if err != nil {
		return deniedResponse(fmt.Sprintf("kubevirt failed reading the cluster configuration: %s", err.Error()))
	}
	strategy := vmiEvictionStrategy(vmi, clusterStrategy)

	markForEviction := false
	switch strategy {
	case virtv1.EvictionStrategyLiveMigrate:
		if !vmi.IsMigratable() {
			return deniedResponse(fmt.Sprintf("VMI %s is configured with an eviction strategy but is not live-migratable", vmi.Name))
		}
		markForEviction = true
	case virtv1.EvictionStrategyLiveMigrateIfPossible:
		markForEviction = vmi.IsMigratable()
	case virtv1.EvictionStrategyExternal:
		markForEviction = true
	}
	if !markForEviction {
		return allowedResponse()
	}
	triggered := fmt.Sprintf("Eviction triggered evacuation of VMI \"%s/%s\"", vmi.Namespace, vmi.Name)
	if vmi.IsMarkedForEviction() {
		return deniedResponse("Evacuation in progress: " + triggered)
	}
	if vmi.Status.NodeName != pod.Spec.NodeName {
		return deniedResponse("Eviction request for target Pod")
	}
	if err := kv.markVMIForEvacuation(ctx, vmi, pod.Spec.NodeName, isDryRunEviction(req)); err != nil {
		return deniedResponse(fmt.Sprintf("kubevirt failed marking the vmi for eviction: %s", err.Error()))
	}
	return deniedResponse(triggered)
}

// markVMIForEvacuation sets status.evacuationNodeName with the JSON patch KubeVirt sends. The
// VMI CRD may or may not have a status subresource; the patch goes where status is writable.
func (kv *kvPlane) markVMIForEvacuation(ctx context.Context, vmi *virtv1.VirtualMachineInstance, node string, dryRun bool) error {
	patch, err := json.Marshal([]map[string]any{{"op": "add", "path": "/status/evacuationNodeName", "value": node}})
	if err != nil {
		return fmt.Errorf("mark vmi %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}
	return kv.patchVMIStatus(ctx, vmi, ctrlclient.RawPatch(types.JSONPatchType, patch), dryRun)
}

// launcherVMIName is the VMI a virt-launcher pod runs: KubeVirt's kubevirt.io/domain
// annotation, else the owner reference to a VirtualMachineInstance.
func launcherVMIName(pod *corev1.Pod) string {
	if name := pod.Annotations[virtv1.DomainAnnotation]; name != "" {
		return name
	}
	for _, ref := range pod.OwnerReferences {
		if ref.Kind == "VirtualMachineInstance" {
			return ref.Name
		}
	}
	return ""
}

// vmiEvictionStrategy is KubeVirt's migrations.VMIEvictionStrategy: the VMI's own strategy,
// else the cluster-wide one, else None.
func vmiEvictionStrategy(vmi *virtv1.VirtualMachineInstance, cluster *virtv1.EvictionStrategy) virtv1.EvictionStrategy {
	if vmi.Spec.EvictionStrategy != nil && *vmi.Spec.EvictionStrategy != "" {
		return *vmi.Spec.EvictionStrategy
	}
	if cluster != nil && *cluster != "" {
		return *cluster
	}
	return virtv1.EvictionStrategyNone
}

// isDryRunEviction reports a dry run set on the request or in the Eviction's delete options.
func isDryRunEviction(req *admissionv1.AdmissionRequest) bool {
	if req.DryRun != nil && *req.DryRun {
		return true
	}
	var ev policyv1.Eviction
	if len(req.Object.Raw) > 0 && json.Unmarshal(req.Object.Raw, &ev) == nil && ev.DeleteOptions != nil {
		return slices.Contains(ev.DeleteOptions.DryRun, metav1.DryRunAll)
	}
	return false
}

func allowedResponse() *admissionv1.AdmissionResponse {
	return &admissionv1.AdmissionResponse{Allowed: true}
}

// deniedResponse is KubeVirt's denied(): the API server turns it into an HTTP 429 for the
// evicting client, which kubectl drain retries.
func deniedResponse(message string) *admissionv1.AdmissionResponse {
	return &admissionv1.AdmissionResponse{
		Allowed: false,
		Result:  &metav1.Status{Message: message, Code: http.StatusTooManyRequests},
	}
}

// generateWebhookCerts makes a throw-away CA and a serving certificate signed by it, valid for
// loopback, this host's name and the extra hosts (IP addresses or names, e.g. the listen
// address's host). It returns the CA in PEM (the caBundle) and the serving pair.
func generateWebhookCerts(now time.Time, extraHosts ...string) ([]byte, tls.Certificate, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("generate CA key: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "drover-sim webhook CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("create CA certificate: %w", err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("parse CA certificate: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("generate serving key: %w", err)
	}
	dnsNames := []string{"localhost"}
	ips := []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	if h, err := os.Hostname(); err == nil && h != "" {
		dnsNames = append(dnsNames, h)
	}
	for _, h := range extraHosts {
		if ip := net.ParseIP(h); ip != nil {
			if !ip.IsUnspecified() {
				ips = append(ips, ip)
			}
		} else if h != "" {
			dnsNames = append(dnsNames, h)
		}
	}
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{CommonName: "drover-sim eviction webhook"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  ips,
		DNSNames:     dnsNames,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return nil, tls.Certificate{}, fmt.Errorf("create serving certificate: %w", err)
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	return caPEM, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return big.NewInt(time.Now().UnixNano())
	}
	return n
}

// webhookDebugWriter turns the HTTP server's log lines into debug messages.
type webhookDebugWriter struct{ log zerolog.Logger }

func (d webhookDebugWriter) Write(p []byte) (int, error) {
	d.log.Debug().Str("source", "http").Msg(strings.TrimSpace(string(p)))
	return len(p), nil
}
