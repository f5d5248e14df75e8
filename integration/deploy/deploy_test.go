package deploy_test

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"

	"github.com/drover-io/drover/cmd/drover/app"
	"github.com/drover-io/drover/integration/cluster"
	"github.com/drover-io/drover/integration/deploy"
)

func render(t *testing.T, name string) []*unstructured.Unstructured {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b, err := deploy.Render(ctx, name)
	require.NoError(t, err)
	objs, err := deploy.Objects(b)
	require.NoError(t, err)
	require.NotEmpty(t, objs)
	return objs
}

func find(t *testing.T, objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	t.Fatalf("no %s %s in the rendered manifests", kind, name)
	return nil
}

func convert[T any](t *testing.T, o *unstructured.Unstructured) *T {
	t.Helper()
	out := new(T)
	require.NoError(t, runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, out))
	return out
}

// natsVersion is the nats-server version go.mod pins.
func natsVersion(t *testing.T) string {
	t.Helper()
	dir, err := deploy.Dir("base")
	require.NoError(t, err)
	b, err := os.ReadFile(filepath.Join(dir, "..", "..", "go.mod"))
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^\s*github\.com/nats-io/nats-server/v2 v(\S+)`).FindSubmatch(b)
	require.NotNil(t, m, "go.mod pins no nats-server")
	return string(m[1])
}

// TestRender renders every kustomization and checks what the platform team relies on: a
// hardened Deployment of two replicas with probes, least-privilege RBAC without wildcards, the
// NATS cluster at the pinned version with drover at three stream replicas, Deckhouse selected.
func TestRender(t *testing.T) {
	for _, name := range deploy.Kustomizations {
		t.Run(name, func(t *testing.T) {
			objs := render(t, name)
			for _, o := range objs {
				if o.GetKind() != "Namespace" && o.GetKind() != "ClusterRole" && o.GetKind() != "ClusterRoleBinding" {
					require.NotEmpty(t, o.GetNamespace(), "%s %s has no namespace", o.GetKind(), o.GetName())
				}
			}
			d := convert[appsv1.Deployment](t, find(t, objs, "Deployment", "drover"))
			require.EqualValues(t, 2, *d.Spec.Replicas)
			pod := d.Spec.Template.Spec
			require.Equal(t, "drover", pod.ServiceAccountName)
			require.True(t, *pod.SecurityContext.RunAsNonRoot)
			require.Equal(t, corev1.SeccompProfileTypeRuntimeDefault, pod.SecurityContext.SeccompProfile.Type)
			c := pod.Containers[0]
			require.True(t, strings.HasPrefix(c.Image, "drover:"), c.Image)
			require.True(t, *c.SecurityContext.ReadOnlyRootFilesystem)
			require.False(t, *c.SecurityContext.AllowPrivilegeEscalation)
			require.Equal(t, []corev1.Capability{"ALL"}, c.SecurityContext.Capabilities.Drop)
			require.Equal(t, "/healthz", c.LivenessProbe.HTTPGet.Path)
			require.Equal(t, "/readyz", c.ReadinessProbe.HTTPGet.Path)
			require.False(t, c.Resources.Requests.Cpu().IsZero())
			require.False(t, c.Resources.Requests.Memory().IsZero())
			find(t, objs, "Service", "drover")
			find(t, objs, "PodDisruptionBudget", "drover")
			find(t, objs, "ClusterRoleBinding", "drover")

			env := map[string]string{}
			for _, e := range c.Env {
				env[e.Name] = e.Value
			}
			switch name {
			case "overlays/nats-cluster":
				require.Equal(t, "3", env["DROVER_REPLICAS"])
				ss := convert[appsv1.StatefulSet](t, find(t, objs, "StatefulSet", "nats"))
				require.EqualValues(t, 3, *ss.Spec.Replicas)
				require.Equal(t, "nats:"+natsVersion(t)+"-alpine", ss.Spec.Template.Spec.Containers[0].Image,
					"the NATS image must match the nats-server go.mod pins")
				conf := find(t, objs, "ConfigMap", "nats-config").Object["data"].(map[string]any)["nats.conf"].(string)
				for _, want := range []string{"jetstream", "cluster", "nats-0.nats-headless.drover.svc:6222", "nats-2.nats-headless.drover.svc:6222"} {
					require.Contains(t, conf, want)
				}
				find(t, objs, "Service", "nats")
				find(t, objs, "Service", "nats-headless")
			case "overlays/deckhouse":
				require.Equal(t, "deckhouse", env["DROVER_PLATFORM"])
			}
		})
	}
	t.Run("no wildcards", func(t *testing.T) {
		granted, err := deploy.Granted(context.Background())
		require.NoError(t, err)
		require.NotEmpty(t, granted)
	})
}

// TestConfig loads each rendered drover.yaml, with the Deployment's environment over it, as
// `drover serve` does: an unknown key or a bad value fails here, not in the cluster.
func TestConfig(t *testing.T) {
	want := map[string]func(t *testing.T, o app.Options){
		"base": func(t *testing.T, o app.Options) {
			require.Equal(t, "nats://nats.drover.svc:4222", o.NATSURL)
			require.Equal(t, 1, o.Replicas)
		},
		"overlays/nats-cluster": func(t *testing.T, o app.Options) {
			require.Equal(t, 3, o.Replicas)
			require.Equal(t, "/var/run/secrets/drover/nats/drover.nk", o.Client.NKey, "drover authenticates with its nkey")
		},
		"overlays/deckhouse": func(t *testing.T, o app.Options) { require.Equal(t, "deckhouse", o.Platform) },
	}
	for _, name := range deploy.Kustomizations {
		t.Run(name, func(t *testing.T) {
			objs := render(t, name)
			d := convert[appsv1.Deployment](t, find(t, objs, "Deployment", "drover"))
			c := d.Spec.Template.Spec.Containers[0]
			require.Equal(t, []string{"serve", "--config", "/etc/drover/drover.yaml"}, c.Args)
			var cmName string
			for _, v := range d.Spec.Template.Spec.Volumes {
				if v.ConfigMap != nil {
					cmName = v.ConfigMap.Name
				}
			}
			cm := convert[corev1.ConfigMap](t, find(t, objs, "ConfigMap", cmName))
			file := filepath.Join(t.TempDir(), "drover.yaml")
			require.NoError(t, os.WriteFile(file, []byte(cm.Data["drover.yaml"]), 0o600))
			env := map[string]string{}
			for _, e := range c.Env {
				env[e.Name] = e.Value
			}
			// The ConfigMap is mounted where --config points.
			var cmMount string
			for _, m := range c.VolumeMounts {
				for _, v := range d.Spec.Template.Spec.Volumes {
					if v.Name == m.Name && v.ConfigMap != nil {
						cmMount = m.MountPath
					}
				}
			}
			require.Equal(t, "/etc/drover", cmMount)
			o, err := app.LoadOptions([]string{"--config", file}, func(k string) string { return env[k] })
			require.NoError(t, err)
			require.Equal(t, "0.0.0.0:9090", o.HTTPListen, "the probes and the Service reach the HTTP listener")
			require.Empty(t, o.Kubeconfig, "in the cluster drover uses its ServiceAccount")
			want[name](t, o)
		})
	}
}

// TestDryRunServer applies each rendered kustomization with `kubectl apply --dry-run=server`
// against the test API server: schemas, defaults and admission as a real apply sees them.
func TestDryRunServer(t *testing.T) {
	c := cluster.StartT(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// A dry run creates nothing, so the namespaced objects need the namespace to exist.
	_, err := deploy.Run(ctx, []byte("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: drover\n"),
		"--kubeconfig", c.Kubeconfig, "apply", "-f", "-")
	require.NoError(t, err)
	for _, name := range deploy.Kustomizations {
		t.Run(name, func(t *testing.T) {
			b, err := deploy.Render(ctx, name)
			require.NoError(t, err)
			out, err := deploy.Run(ctx, b, "--kubeconfig", c.Kubeconfig, "apply", "--dry-run=server", "-f", "-")
			require.NoError(t, err)
			require.Contains(t, string(out), "deployment.apps/drover created (server dry run)")
		})
	}
	// Nothing but the namespace was created.
	kube, err := kubernetes.NewForConfig(c.Config)
	require.NoError(t, err)
	_, err = kube.AppsV1().Deployments("drover").Get(ctx, "drover", metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "a dry run created the Deployment: %v", err)
}

// TestRBAC installs the base's RBAC and acts as drover's ServiceAccount through the
// impersonating kubeconfig the workflow tests use: what the ClusterRole grants is allowed, what
// it does not is refused, and the audit check names the refusal.
func TestRBAC(t *testing.T) {
	c := cluster.StartWithOptionsT(t, cluster.Options{Audit: true})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	kubeconfig, err := deploy.InstallRBAC(ctx, c)
	require.NoError(t, err)

	// kubectl with the same kubeconfig drover gets: `auth can-i` asks the real authorizer.
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"patch", "nodes"}, "yes"},
		{[]string{"create", "pods", "--subresource=eviction", "-A"}, "yes"},
		{[]string{"create", "virtualmachineinstancemigrations.kubevirt.io", "-A"}, "yes"},
		{[]string{"watch", "leases.coordination.k8s.io", "-n", "kube-node-lease"}, "yes"},
		{[]string{"list", "leases.coordination.k8s.io", "-n", "default"}, "no"},
		{[]string{"get", "secrets", "-A"}, "no"},
		{[]string{"create", "pods", "-A"}, "no"},
		{[]string{"delete", "nodes"}, "no"},
	} {
		out, _ := deploy.Run(ctx, nil, append([]string{"--kubeconfig", kubeconfig, "auth", "can-i"}, tc.args...)...)
		require.Equal(t, tc.want, strings.TrimSpace(string(out)), "can-i %v", tc.args)
	}

	cfg, err := c.ImpersonatedConfig(deploy.ServiceAccount)
	require.NoError(t, err)
	kube, err := kubernetes.NewForConfig(cfg)
	require.NoError(t, err)
	_, err = kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	require.NoError(t, deploy.CheckAudit(c), "an allowed request is no refusal")

	_, err = kube.CoreV1().Secrets("kube-system").List(ctx, metav1.ListOptions{})
	require.True(t, apierrors.IsForbidden(err), "listing secrets: %v", err)
	err = deploy.CheckAudit(c)
	require.ErrorContains(t, err, "list core/secrets in kube-system")

	events, err := c.AuditEvents()
	require.NoError(t, err)
	var nodes bool
	for _, e := range events {
		require.Equal(t, cluster.Impersonator, e.User.Username, "only the impersonator's requests are recorded")
		if e.As() == deploy.ServiceAccount && e.Verb == "list" && e.ObjectRef != nil && e.ObjectRef.Resource == "nodes" {
			nodes = true
		}
	}
	require.True(t, nodes, "the audit log records the ServiceAccount's list of nodes")
}
