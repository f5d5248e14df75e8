package sim

// KubeVirt's eviction path, part 1: the validating admission webhook that virt-api serves for
// pods/eviction (pkg/virt-api/webhooks/validating-webhook/admitters/pod-eviction-admitter.go).
// The simulator serves it itself over HTTPS with a CA it generates in memory and registers it
// with the API server by URL, so `kubectl drain` against the test cluster meets the same
// answers it would meet on a KubeVirt cluster.

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
	"k8s.io/apimachinery/pkg/types"
	virtv1 "kubevirt.io/api/core/v1"
	ctrlclient "sigs.k8s.io/controller-runtime/pkg/client"
)

const (
	// EvictionWebhookConfigName is the ValidatingWebhookConfiguration the simulator registers.
	// It is not KubeVirt's own name (virt-api-validator) so that the simulator never replaces
	// the configuration of a real KubeVirt installation.
	EvictionWebhookConfigName = "drover-sim-virt-api-validator"
	// evictionWebhookName is KubeVirt's webhook name; the API server puts it into the message a
	// client sees ("admission webhook %q denied the request: ..."), so it is kept verbatim.
	evictionWebhookName = "virt-launcher-eviction-interceptor.kubevirt.io"
	evictionWebhookPath = "/pod-eviction-validator"
	// webhookManagedByLabel marks the configuration as the simulator's.
	webhookManagedByLabel = "app.kubernetes.io/managed-by"
	webhookManagedByValue = "drover-sim"
	// defaultWebhookListenAddr is used when the simulator is not told where to listen.
	defaultWebhookListenAddr = "127.0.0.1:0"
)

// EnvWebhookListenAddr names the environment variable that sets, when Options.WebhookListenAddr
// is empty, where the simulator's eviction webhook listens (host:port; port 0 picks one). Default 127.0.0.1 on a random port. The API
// server must be able to reach it at that host, which the serving certificate covers; an
// unspecified host (0.0.0.0) is advertised as 127.0.0.1.
const EnvWebhookListenAddr = "DROVER_SIM_WEBHOOK_ADDR"

// runEvictionWebhook serves KubeVirt's pod eviction webhook and keeps it registered until ctx
// ends (see evictionWebhook.run for what happens to the registration on shutdown).
func (s *Simulator) runEvictionWebhook(ctx context.Context) error {
	kv, err := s.kubevirtPlane()
	if err != nil {
		return err
	}
	addr := s.opts.WebhookListenAddr
	if addr == "" {
		addr = os.Getenv(EnvWebhookListenAddr)
	}
	return newEvictionWebhook(kv, addr, s.log).run(ctx)
}

// evictionWebhook serves the pod eviction admitter. Start with run; it blocks until ctx ends.
type evictionWebhook struct {
	kv         *kvPlane
	listenAddr string
	log        zerolog.Logger

	// ready is closed once the configuration is registered (tests wait on it).
	ready chan struct{}
	// url is the URL registered with the API server; valid after ready is closed.
	url string
}

func newEvictionWebhook(kv *kvPlane, listenAddr string, log zerolog.Logger) *evictionWebhook {
	if listenAddr == "" {
		listenAddr = defaultWebhookListenAddr
	}
	return &evictionWebhook{
		kv:         kv,
		listenAddr: listenAddr,
		log:        log.With().Str("component", "eviction-webhook").Logger(),
		ready:      make(chan struct{}),
	}
}

// run serves the webhook and keeps its registration until ctx ends. On a clean shutdown it
// removes the ValidatingWebhookConfiguration it registered (only if it still points at this
// process): KubeVirt's failurePolicy is Ignore, so a configuration left behind would not block
// evictions, but it would name a dead URL that every eviction in the cluster tries first, and it
// would claim a KubeVirt behaviour that is no longer there. A crashed simulator leaves it
// behind; the next start overwrites it.
func (w *evictionWebhook) run(ctx context.Context) error {
	ln, err := net.Listen("tcp", w.listenAddr)
	if err != nil {
		return fmt.Errorf("eviction webhook: listen on %s: %w", w.listenAddr, err)
	}
	var extraHosts []string
	configured, _, _ := net.SplitHostPort(w.listenAddr)
	if configured != "" {
		extraHosts = append(extraHosts, configured)
	}
	w.url = webhookURL(configured, ln.Addr())
	caPEM, serving, err := generateWebhookCerts(time.Now(), extraHosts...)
	if err != nil {
		return errors.Join(fmt.Errorf("eviction webhook: %w", err), ln.Close())
	}

	mux := http.NewServeMux()
	mux.HandleFunc(evictionWebhookPath, w.serveAdmission)
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
	var uid types.UID
	for {
		uid, err = w.register(ctx, caPEM)
		if err == nil {
			break
		}
		w.log.Warn().Err(err).Msg("register eviction webhook; retrying")
		select {
		case <-ctx.Done():
			return shutdown()
		case err := <-serveErr:
			return fmt.Errorf("eviction webhook: serve on %s: %w", w.url, err)
		case <-time.After(time.Second):
		}
	}
	close(w.ready)
	w.log.Info().Str("url", w.url).Str("config", EvictionWebhookConfigName).Msg("eviction webhook registered")

	var serveFailed error
	select {
	case <-ctx.Done():
	case err := <-serveErr:
		if !errors.Is(err, http.ErrServerClosed) {
			serveFailed = fmt.Errorf("eviction webhook: serve on %s: %w", w.url, err)
		}
	}
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	return errors.Join(serveFailed, w.unregister(dctx, uid), shutdown())
}

// webhookURL is the URL the API server calls: the configured listen host when it names one
// (a host name or a specific address, which the serving certificate then covers), else the
// listener's address, an unspecified one (0.0.0.0, ::) being advertised as 127.0.0.1.
func webhookURL(configuredHost string, addr net.Addr) string {
	host, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return "https://" + addr.String() + evictionWebhookPath
	}
	if ip := net.ParseIP(configuredHost); configuredHost != "" && (ip == nil || !ip.IsUnspecified()) {
		host = configuredHost
	} else if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
	}
	return "https://" + net.JoinHostPort(host, port) + evictionWebhookPath
}

// webhookConfig is the configuration KubeVirt's virt-operator installs for this admitter,
// pointed at a URL instead of the virt-api Service.
func (w *evictionWebhook) webhookConfig(caPEM []byte) *admissionregistrationv1.ValidatingWebhookConfiguration {
	// KubeVirt: "configured to be ignored in case kube-api fails to get a response from it".
	failurePolicy := admissionregistrationv1.Ignore
	sideEffects := admissionregistrationv1.SideEffectClassNoneOnDryRun
	matchPolicy := admissionregistrationv1.Equivalent
	timeout := int32(10)
	url := w.url
	return &admissionregistrationv1.ValidatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{
			Name:   EvictionWebhookConfigName,
			Labels: map[string]string{webhookManagedByLabel: webhookManagedByValue},
		},
		Webhooks: []admissionregistrationv1.ValidatingWebhook{{
			Name:                    evictionWebhookName,
			AdmissionReviewVersions: []string{"v1"},
			FailurePolicy:           &failurePolicy,
			SideEffects:             &sideEffects,
			MatchPolicy:             &matchPolicy,
			TimeoutSeconds:          &timeout,
			ClientConfig: admissionregistrationv1.WebhookClientConfig{
				URL:      &url,
				CABundle: caPEM,
			},
			Rules: []admissionregistrationv1.RuleWithOperations{{
				Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
				Rule: admissionregistrationv1.Rule{
					APIGroups:   []string{""},
					APIVersions: []string{"v1"},
					Resources:   []string{"pods/eviction"},
				},
			}},
		}},
	}
}

// register creates or updates the configuration and returns its UID.
func (w *evictionWebhook) register(ctx context.Context, caPEM []byte) (types.UID, error) {
	api := w.kv.kube.AdmissionregistrationV1().ValidatingWebhookConfigurations()
	want := w.webhookConfig(caPEM)
	for attempt := 0; ; attempt++ {
		cur, err := api.Get(ctx, want.Name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			created, err := api.Create(ctx, want, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) && attempt < 5 {
				continue
			}
			if err != nil {
				return "", fmt.Errorf("create validatingwebhookconfiguration %s: %w", want.Name, err)
			}
			return created.UID, nil
		case err != nil:
			return "", fmt.Errorf("get validatingwebhookconfiguration %s: %w", want.Name, err)
		}
		upd := cur.DeepCopy()
		upd.Labels = want.Labels
		upd.Webhooks = want.Webhooks
		updated, err := api.Update(ctx, upd, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) && attempt < 5 {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("update validatingwebhookconfiguration %s: %w", want.Name, err)
		}
		return updated.UID, nil
	}
}

// unregister deletes the configuration if it is still the one this process registered.
func (w *evictionWebhook) unregister(ctx context.Context, uid types.UID) error {
	api := w.kv.kube.AdmissionregistrationV1().ValidatingWebhookConfigurations()
	cur, err := api.Get(ctx, EvictionWebhookConfigName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("get validatingwebhookconfiguration %s: %w", EvictionWebhookConfigName, err)
	}
	if cur.UID != uid || len(cur.Webhooks) == 0 || cur.Webhooks[0].ClientConfig.URL == nil || *cur.Webhooks[0].ClientConfig.URL != w.url {
		w.log.Debug().Msg("webhook configuration now belongs to another simulator; leaving it")
		return nil
	}
	err = api.Delete(ctx, EvictionWebhookConfigName, metav1.DeleteOptions{
		Preconditions: &metav1.Preconditions{UID: &cur.UID, ResourceVersion: &cur.ResourceVersion},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		return fmt.Errorf("delete validatingwebhookconfiguration %s: %w", EvictionWebhookConfigName, err)
	}
	return nil
}

// serveAdmission decodes an AdmissionReview, admits it and writes the review back.
func (w *evictionWebhook) serveAdmission(rw http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(rw, "only POST", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(rw, "read body: "+err.Error(), http.StatusBadRequest)
		return
	}
	var review admissionv1.AdmissionReview
	if err := json.Unmarshal(body, &review); err != nil || review.Request == nil {
		http.Error(rw, "not an admission.k8s.io/v1 AdmissionReview", http.StatusBadRequest)
		return
	}
	resp := w.kv.admitEviction(r.Context(), review.Request)
	resp.UID = review.Request.UID
	out := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Response: resp,
	}
	ev := w.log.Debug().Str("pod", review.Request.Namespace+"/"+review.Request.Name).Bool("allowed", resp.Allowed)
	if resp.Result != nil {
		ev = ev.Str("message", resp.Result.Message)
	}
	ev.Msg("eviction admission")
	rw.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(rw).Encode(out); err != nil {
		w.log.Warn().Err(err).Msg("write admission review")
	}
}

// admitEviction is KubeVirt's PodEvictionAdmitter.Admit (1.8):
//   - a pod that cannot be read, is not a virt-launcher, has finished (Succeeded/Failed) or
//     names no domain is allowed;
//   - a VMI that cannot be read denies the eviction (the client retries);
//   - eviction strategy (VMI, else the KubeVirt CR, else None): None, and LiveMigrateIfPossible
//     on a VMI that cannot migrate, are allowed (the pod is deleted; the run strategy decides);
//     LiveMigrate on a VMI that cannot migrate is denied for good;
//     LiveMigrate / LiveMigrateIfPossible on a migratable VMI, and External, mark the VMI
//     (status.evacuationNodeName = its node, a dry-run patch for dry-run evictions) and deny
//     with 429 "Eviction triggered evacuation of VMI", and keep denying ("Evacuation in
//     progress: ...") while the mark stays.
//
// A launcher pod that is not on the VMI's current node (a migration target still starting, or
// a source pod left behind after a migration) is not the VMI's running domain: it is allowed.
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
	if vmi.Status.NodeName != pod.Spec.NodeName {
		return allowedResponse()
	}
	triggered := fmt.Sprintf("Eviction triggered evacuation of VMI \"%s/%s\"", vmi.Namespace, vmi.Name)
	if vmi.IsMarkedForEviction() {
		return deniedResponse("Evacuation in progress: " + triggered)
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
