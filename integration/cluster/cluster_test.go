package cluster_test

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/drover-io/drover/integration/cluster"
	"github.com/drover-io/drover/integration/crds"
)

// TestStartStop starts a cluster, uses it through kubectl, and checks that Stop leaves no
// kube-apiserver or etcd process behind.
func TestStartStop(t *testing.T) {
	c := cluster.StartT(t)

	apiserverPID, etcdPID := c.PIDs()
	require.NotZero(t, apiserverPID, "kube-apiserver pid")
	require.NotZero(t, etcdPID, "etcd pid")
	require.True(t, alive(apiserverPID), "kube-apiserver runs")
	require.True(t, alive(etcdPID), "etcd runs")

	objs, err := crds.Objects()
	require.NoError(t, err)
	out := kubectl(t, c.Kubeconfig, "get", "crd", "-o", "name")
	for _, o := range objs {
		require.Contains(t, out, "customresourcedefinition.apiextensions.k8s.io/"+o.Name)
	}
	out = kubectl(t, c.Kubeconfig, "get", "namespaces", "-o", "name")
	for _, ns := range cluster.SystemNamespaces {
		require.Contains(t, out, "namespace/"+ns)
	}

	require.NoError(t, c.Stop())
	require.NoError(t, c.Stop(), "second Stop")
	require.False(t, alive(apiserverPID), "kube-apiserver (pid %d) still runs after Stop", apiserverPID)
	require.False(t, alive(etcdPID), "etcd (pid %d) still runs after Stop", etcdPID)
	_, err = os.Stat(c.Kubeconfig)
	require.True(t, errors.Is(err, os.ErrNotExist), "kubeconfig removed by Stop: %v", err)
}

func TestStartMissingBinaries(t *testing.T) {
	tests := []struct {
		name    string
		present []string
		missing []string
	}{
		{name: "empty folder", missing: []string{"kube-apiserver", "etcd"}},
		{name: "no kube-apiserver", present: []string{"etcd"}, missing: []string{"kube-apiserver"}},
		{name: "no etcd", present: []string{"kube-apiserver"}, missing: []string{"etcd"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			for _, name := range tt.present {
				require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte("#!/bin/sh\nexit 1\n"), 0o755))
			}
			_, err := cluster.Start(context.Background(), cluster.Options{BinDir: dir})
			require.Error(t, err)
			require.Contains(t, err.Error(), "make controlplane")
			for _, name := range tt.missing {
				require.Contains(t, err.Error(), filepath.Join(dir, name))
			}
			for _, name := range tt.present {
				require.NotContains(t, err.Error(), filepath.Join(dir, name)+",")
			}
		})
	}
}

// TestAPIServer checks the API server features the simulator and drover rely on.
func TestAPIServer(t *testing.T) {
	c := cluster.StartWithOptionsT(t, cluster.Options{SkipCRDs: true})
	cs, err := kubernetes.NewForConfig(c.Config)
	require.NoError(t, err)
	ctx := context.Background()

	t.Run("calls a validating webhook on 127.0.0.1", func(t *testing.T) {
		srv := httptest.NewTLSServer(http.HandlerFunc(denyLabelled))
		t.Cleanup(srv.Close)
		caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
		fail := admissionregistrationv1.Fail
		none := admissionregistrationv1.SideEffectClassNone
		url := srv.URL + "/validate"
		_, err := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations().Create(ctx,
			&admissionregistrationv1.ValidatingWebhookConfiguration{
				ObjectMeta: metav1.ObjectMeta{Name: "deny-labelled"},
				Webhooks: []admissionregistrationv1.ValidatingWebhook{{
					Name:                    "deny.test.drover.io",
					ClientConfig:            admissionregistrationv1.WebhookClientConfig{URL: &url, CABundle: caPEM},
					Rules:                   []admissionregistrationv1.RuleWithOperations{{Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create}, Rule: admissionregistrationv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"configmaps"}}}},
					FailurePolicy:           &fail,
					SideEffects:             &none,
					AdmissionReviewVersions: []string{"v1"},
					ObjectSelector:          &metav1.LabelSelector{MatchLabels: map[string]string{"deny": "true"}},
				}},
			}, metav1.CreateOptions{})
		require.NoError(t, err)

		// The API server picks up webhook configurations asynchronously: poll until it denies.
		var lastErr error
		require.Eventually(t, func() bool {
			cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{GenerateName: "denied-", Labels: map[string]string{"deny": "true"}}}
			_, lastErr = cs.CoreV1().ConfigMaps("default").Create(ctx, cm, metav1.CreateOptions{})
			return lastErr != nil && strings.Contains(lastErr.Error(), "denied by test webhook")
		}, 20*time.Second, 50*time.Millisecond, "webhook never denied; last error: %v", lastErr)

		_, err = cs.CoreV1().ConfigMaps("default").Create(ctx,
			&corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "allowed"}}, metav1.CreateOptions{})
		require.NoError(t, err, "objects the webhook does not select are admitted")
	})

	t.Run("serves pods/eviction", func(t *testing.T) {
		pod := newPod("evict-me", "node-a", map[string]string{"app": "free"})
		_, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{})
		require.NoError(t, err)
		err = cs.PolicyV1().Evictions("default").Evict(ctx, &policyv1.Eviction{
			ObjectMeta: metav1.ObjectMeta{Name: "evict-me", Namespace: "default"},
		})
		require.NoError(t, err)
		// A pod bound to a node is deleted gracefully: with no kubelet it stays Terminating
		// until someone (the simulator) force-deletes it.
		got, err := cs.CoreV1().Pods("default").Get(ctx, "evict-me", metav1.GetOptions{})
		require.NoError(t, err)
		require.NotNil(t, got.DeletionTimestamp)
	})

	t.Run("PodDisruptionBudget needs a status before evictions pass", func(t *testing.T) {
		pod := newPod("guarded", "node-a", map[string]string{"app": "guarded"})
		created, err := cs.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{})
		require.NoError(t, err)
		// Pending pods are evicted regardless of budgets; make it Running and Ready as a kubelet would.
		created.Status.Phase = corev1.PodRunning
		created.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
		_, err = cs.CoreV1().Pods("default").UpdateStatus(ctx, created, metav1.UpdateOptions{})
		require.NoError(t, err)

		two := intstr.FromInt32(2)
		pdb, err := cs.PolicyV1().PodDisruptionBudgets("default").Create(ctx, &policyv1.PodDisruptionBudget{
			ObjectMeta: metav1.ObjectMeta{Name: "guarded"},
			Spec: policyv1.PodDisruptionBudgetSpec{
				MaxUnavailable: &two,
				Selector:       &metav1.LabelSelector{MatchLabels: map[string]string{"app": "guarded"}},
			},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
		// client-go's typed Evict retries a 429 that carries Retry-After (10 times, 10 s apart);
		// the raw request without retries shows the answer at once.
		evict := func() error {
			body, err := json.Marshal(&policyv1.Eviction{
				TypeMeta:   metav1.TypeMeta{APIVersion: "policy/v1", Kind: "Eviction"},
				ObjectMeta: metav1.ObjectMeta{Name: "guarded", Namespace: "default"},
			})
			require.NoError(t, err)
			return cs.CoreV1().RESTClient().Post().Namespace("default").Resource("pods").Name("guarded").
				SubResource("eviction").MaxRetries(0).Body(body).Do(ctx).Error()
		}
		// There is no disruption controller: until someone (the simulator) writes the budget's
		// status, the API server answers 429 as it does while a budget is being processed.
		err = evict()
		require.True(t, apierrors.IsTooManyRequests(err), "want 429, got %v", err)

		pdb.Status = policyv1.PodDisruptionBudgetStatus{
			ObservedGeneration: pdb.Generation, DisruptionsAllowed: 0,
			CurrentHealthy: 1, DesiredHealthy: 1, ExpectedPods: 1,
		}
		pdb, err = cs.PolicyV1().PodDisruptionBudgets("default").UpdateStatus(ctx, pdb, metav1.UpdateOptions{})
		require.NoError(t, err)
		err = evict()
		require.True(t, apierrors.IsTooManyRequests(err), "no disruption allowed: want 429, got %v", err)

		pdb.Status.DisruptionsAllowed = 1
		_, err = cs.PolicyV1().PodDisruptionBudgets("default").UpdateStatus(ctx, pdb, metav1.UpdateOptions{})
		require.NoError(t, err)
		require.NoError(t, evict(), "one disruption allowed")
	})
}

func newPod(name, node string, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:   node,
			Containers: []corev1.Container{{Name: "compute", Image: "virt-launcher"}},
		},
	}
}

// denyLabelled is a validating webhook that denies everything sent to it.
func denyLabelled(w http.ResponseWriter, r *http.Request) {
	var review admissionv1.AdmissionReview
	if err := json.NewDecoder(r.Body).Decode(&review); err != nil || review.Request == nil {
		http.Error(w, "bad admission review", http.StatusBadRequest)
		return
	}
	review.Response = &admissionv1.AdmissionResponse{
		UID:     review.Request.UID,
		Allowed: false,
		Result:  &metav1.Status{Code: http.StatusForbidden, Message: "denied by test webhook"},
	}
	review.Request = nil
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(review)
}

func kubectl(t *testing.T, kubeconfig string, args ...string) string {
	t.Helper()
	path, err := exec.LookPath("kubectl")
	require.NoError(t, err, "kubectl must be on PATH (it is on the machine image at /usr/bin/kubectl)")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, append([]string{"--kubeconfig", kubeconfig}, args...)...).CombinedOutput()
	require.NoError(t, err, "kubectl %s: %s", strings.Join(args, " "), out)
	return string(out)
}

// alive reports whether a process with that pid exists (and is not a zombie).
func alive(pid int) bool {
	if err := syscall.Kill(pid, 0); err != nil {
		return false
	}
	stat, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name: "pid (comm) S ...".
	s := string(stat)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}
