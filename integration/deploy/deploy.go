package deploy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	sigsyaml "sigs.k8s.io/yaml"

	"github.com/drover-io/drover/integration/cluster"
)

// Namespace and Name of the ServiceAccount drover runs as (deploy/base).
const (
	Namespace = "drover"
	Name      = "drover"
)

// ServiceAccount is the user name the API server gives drover's ServiceAccount.
const ServiceAccount = "system:serviceaccount:" + Namespace + ":" + Name

// Kustomizations are the folders under deploy/ that kubectl kustomize renders.
var Kustomizations = []string{"base", "overlays/nats-cluster", "overlays/deckhouse"}

// rbacKinds are what InstallRBAC applies from the base: who drover is and what it may do.
var rbacKinds = map[string]bool{"Namespace": true, "ServiceAccount": true, "ClusterRole": true,
	"ClusterRoleBinding": true, "Role": true, "RoleBinding": true}

// Dir returns the path of deploy/<name> in the repository.
func Dir(name string) (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("find the repository: no caller information")
	}
	dir := filepath.Join(filepath.Dir(file), "..", "..", "deploy", filepath.FromSlash(name))
	if _, err := os.Stat(filepath.Join(dir, "kustomization.yaml")); err != nil {
		return "", fmt.Errorf("kustomization %s: %w", name, err)
	}
	return dir, nil
}

// Kubectl is the kubectl binary: $KUBECTL, else kubectl on PATH, else /usr/bin/kubectl. A missing
// kubectl is an error (the machine image has it), never a skip.
func Kubectl() (string, error) {
	if k := os.Getenv("KUBECTL"); k != "" {
		return k, nil
	}
	if p, err := exec.LookPath("kubectl"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/bin/kubectl"); err != nil {
		return "", fmt.Errorf("kubectl not found ($KUBECTL, PATH, /usr/bin/kubectl): %w", err)
	}
	return "/usr/bin/kubectl", nil
}

// Run runs kubectl with args and stdin; the error carries its output.
func Run(ctx context.Context, stdin []byte, args ...string) ([]byte, error) {
	kubectl, err := Kubectl()
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, kubectl, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

var rendered sync.Map // kustomization name -> []byte

// Render runs `kubectl kustomize deploy/<name>` (once per process) and returns the YAML.
func Render(ctx context.Context, name string) ([]byte, error) {
	if b, ok := rendered.Load(name); ok {
		return b.([]byte), nil
	}
	dir, err := Dir(name)
	if err != nil {
		return nil, err
	}
	out, err := Run(ctx, nil, "kustomize", dir)
	if err != nil {
		return nil, fmt.Errorf("render %s: %w", name, err)
	}
	rendered.Store(name, out)
	return out, nil
}

// Objects splits rendered YAML into objects.
func Objects(b []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	var out []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return nil, fmt.Errorf("decode rendered manifests: %w", err)
		}
		if len(m) == 0 {
			continue
		}
		out = append(out, &unstructured.Unstructured{Object: m})
	}
}

// Manifest joins objects into one YAML stream.
func Manifest(objs []*unstructured.Unstructured) ([]byte, error) {
	var b bytes.Buffer
	for _, o := range objs {
		y, err := sigsyaml.Marshal(o.Object)
		if err != nil {
			return nil, fmt.Errorf("marshal %s %s: %w", o.GetKind(), o.GetName(), err)
		}
		b.WriteString("---\n")
		b.Write(y)
	}
	return b.Bytes(), nil
}

// InstallRBAC applies the base's Namespace, ServiceAccount, ClusterRole, Role and bindings to the
// cluster (with kubectl as the admin) and returns a kubeconfig that acts as the ServiceAccount,
// for `drover serve --kubeconfig`. With cluster.Options.Audit, what drover does through it is in
// the cluster's audit log (see CheckAudit).
func InstallRBAC(ctx context.Context, c *cluster.Cluster) (string, error) {
	b, err := Render(ctx, "base")
	if err != nil {
		return "", err
	}
	objs, err := Objects(b)
	if err != nil {
		return "", err
	}
	var pick []*unstructured.Unstructured
	for _, o := range objs {
		if rbacKinds[o.GetKind()] {
			pick = append(pick, o)
		}
	}
	m, err := Manifest(pick)
	if err != nil {
		return "", err
	}
	if _, err := Run(ctx, m, "--kubeconfig", c.Kubeconfig, "apply", "-f", "-"); err != nil {
		return "", fmt.Errorf("install drover's RBAC from deploy/base: %w", err)
	}
	return c.ImpersonatedKubeconfig(ServiceAccount)
}

// Permission is one verb on one resource ("pods/eviction" for a subresource) of an API group.
type Permission struct {
	Group, Resource, Verb string
}

func (p Permission) String() string {
	g := p.Group
	if g == "" {
		g = "core"
	}
	return fmt.Sprintf("%s %s/%s", p.Verb, g, p.Resource)
}

// Granted returns the permissions the base's ClusterRole and Roles grant (expanded rule by rule;
// the base has no wildcards, and a wildcard is reported as an error).
func Granted(ctx context.Context) ([]Permission, error) {
	b, err := Render(ctx, "base")
	if err != nil {
		return nil, err
	}
	objs, err := Objects(b)
	if err != nil {
		return nil, err
	}
	seen := map[Permission]bool{}
	var out []Permission
	for _, o := range objs {
		if o.GetKind() != "ClusterRole" && o.GetKind() != "Role" {
			continue
		}
		j, err := o.MarshalJSON()
		if err != nil {
			return nil, err
		}
		var role rbacv1.ClusterRole // a Role's rules have the same shape
		if err := sigsyaml.Unmarshal(j, &role); err != nil {
			return nil, fmt.Errorf("%s %s: %w", o.GetKind(), o.GetName(), err)
		}
		for _, r := range role.Rules {
			for _, g := range r.APIGroups {
				for _, res := range r.Resources {
					for _, v := range r.Verbs {
						if g == "*" || res == "*" || v == "*" {
							return nil, fmt.Errorf("%s %s has a wildcard rule: %+v", o.GetKind(), o.GetName(), r)
						}
						p := Permission{Group: g, Resource: res, Verb: v}
						if !seen[p] {
							seen[p] = true
							out = append(out, p)
						}
					}
				}
			}
		}
	}
	return out, nil
}

// Usage collects what the ServiceAccount did across the clusters of a test binary.
type Usage struct {
	mu   sync.Mutex
	used map[Permission]int
	runs int
}

// Used is the test binary's Usage (CheckAudit records into it; Report prints it).
var Used = &Usage{}

// CheckAudit reads c's audit log, records the ServiceAccount's requests in Used and returns an
// error naming each request RBAC refused it (a permission deploy/base/rbac.yaml lacks).
func CheckAudit(c *cluster.Cluster) error {
	events, err := c.AuditEvents()
	if err != nil {
		return err
	}
	var refused []string
	seen := map[string]bool{}
	Used.mu.Lock()
	defer Used.mu.Unlock()
	if Used.used == nil {
		Used.used = map[Permission]int{}
	}
	Used.runs++
	for _, e := range events {
		if e.As() != ServiceAccount || e.ObjectRef == nil {
			continue
		}
		res := e.ObjectRef.Resource
		if e.ObjectRef.Subresource != "" {
			res += "/" + e.ObjectRef.Subresource
		}
		p := Permission{Group: e.ObjectRef.APIGroup, Resource: res, Verb: e.Verb}
		if e.Forbidden() {
			where := "cluster-wide"
			if e.ObjectRef.Namespace != "" {
				where = "in " + e.ObjectRef.Namespace
			}
			if s := p.String() + " " + where; !seen[s] {
				seen[s] = true
				refused = append(refused, s)
			}
			continue
		}
		Used.used[p]++
	}
	if len(refused) > 0 {
		sort.Strings(refused)
		return fmt.Errorf("drover (%s) was refused by RBAC: %s; grant it in deploy/base/rbac.yaml",
			ServiceAccount, strings.Join(refused, ", "))
	}
	return nil
}

// Report writes which granted permissions the recorded runs used and which none did (candidates
// to remove from deploy/base/rbac.yaml, or workflows no test covered), and the permissions used
// that the base does not grant (allowed by the cluster's default roles).
func (u *Usage) Report(ctx context.Context, w io.Writer) error {
	granted, err := Granted(ctx)
	if err != nil {
		return err
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.runs == 0 {
		_, err := fmt.Fprintln(w, "RBAC report: no cluster recorded drover's requests")
		return err
	}
	g := map[Permission]bool{}
	var used, unused []string
	for _, p := range granted {
		g[p] = true
		if n := u.used[p]; n > 0 {
			used = append(used, fmt.Sprintf("%s (%d)", p, n))
		} else {
			unused = append(unused, p.String())
		}
	}
	var other []string
	for p, n := range u.used {
		if !g[p] {
			other = append(other, fmt.Sprintf("%s (%d)", p, n))
		}
	}
	sort.Strings(used)
	sort.Strings(unused)
	sort.Strings(other)
	fmt.Fprintf(w, "RBAC report over %d test clusters, drover acting as %s:\n", u.runs, ServiceAccount)
	fmt.Fprintf(w, "  granted by deploy/base and used (requests): %s\n", strings.Join(used, ", "))
	fmt.Fprintf(w, "  granted by deploy/base and used by no test here: %s\n", orNone(unused))
	_, err = fmt.Fprintf(w, "  used but granted by the cluster's default roles: %s\n", orNone(other))
	return err
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

// WriteReport prints Used's report to stdout and, when DROVER_RBAC_REPORT names a folder, into
// <folder>/<name>.txt. TestMain of the workflow packages calls it after the tests.
func WriteReport(name string) {
	var b bytes.Buffer
	if err := Used.Report(context.Background(), &b); err != nil {
		fmt.Fprintf(&b, "RBAC report: %v\n", err)
	}
	os.Stdout.Write(b.Bytes())
	if dir := os.Getenv("DROVER_RBAC_REPORT"); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err == nil {
			_ = os.WriteFile(filepath.Join(dir, name+".txt"), b.Bytes(), 0o644)
		}
	}
}
