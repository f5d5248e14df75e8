package cluster

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// Impersonator is the user whose requests the audit log records (Options.Audit). It is a member
// of system:masters, so it may impersonate anyone; ImpersonatedConfig hands out its credentials
// with the impersonated user set. Every other user (the admin, the simulator) goes unrecorded, so
// the log holds exactly the requests made as an impersonated user, and stays small.
const Impersonator = "drover-test-impersonator"

// auditPolicy records the impersonator's requests at Metadata level (who, verb, resource,
// response code, the authorizer's decision), once per request (watches also when they start).
const auditPolicy = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  users: ["` + Impersonator + `"]
- level: None
`

// configureAudit makes the API server write the audit log to dir/audit.log.
func configureAudit(dir string, api *envtest.APIServer) (string, error) {
	policy := filepath.Join(dir, "audit-policy.yaml")
	if err := os.WriteFile(policy, []byte(auditPolicy), 0o600); err != nil {
		return "", fmt.Errorf("write audit policy: %w", err)
	}
	log := filepath.Join(dir, "audit.log")
	args := api.Configure()
	args.Set("audit-policy-file", policy)
	args.Set("audit-log-path", log)
	// Write each event before the response: a test reads the log right after its requests.
	args.Set("audit-log-mode", "blocking")
	args.Set("audit-log-format", "json")
	return log, nil
}

// ImpersonatedConfig returns a client configuration that acts as user (for a ServiceAccount
// "system:serviceaccount:NAMESPACE:NAME"; the API server adds the ServiceAccount's groups and
// system:authenticated), authorised by user's RBAC bindings alone. With Options.Audit, its
// requests are in the audit log (AuditEvents).
func (c *Cluster) ImpersonatedConfig(user string) (*rest.Config, error) {
	c.userMu.Lock()
	defer c.userMu.Unlock()
	if c.impersonator == nil {
		au, err := c.env.AddUser(envtest.User{Name: Impersonator, Groups: []string{"system:masters"}}, rest.CopyConfig(c.Config))
		if err != nil {
			return nil, fmt.Errorf("provision the impersonating user: %w", err)
		}
		raw, err := au.KubeConfig()
		if err != nil {
			return nil, fmt.Errorf("kubeconfig of the impersonating user: %w", err)
		}
		c.impersonator, c.impersonatorKubeconfig = au.Config(), raw
	}
	cfg := rest.CopyConfig(c.impersonator)
	cfg.Impersonate = rest.ImpersonationConfig{UserName: user}
	return cfg, nil
}

// ImpersonatedKubeconfig writes a kubeconfig file that acts as user (see ImpersonatedConfig),
// for kubectl and `drover serve --kubeconfig`, and returns its path (in Dir, removed by Stop).
func (c *Cluster) ImpersonatedKubeconfig(user string) (string, error) {
	if _, err := c.ImpersonatedConfig(user); err != nil {
		return "", err
	}
	c.userMu.Lock()
	raw := c.impersonatorKubeconfig
	c.userMu.Unlock()
	kcfg, err := clientcmd.Load(raw)
	if err != nil {
		return "", fmt.Errorf("kubeconfig for %s: %w", user, err)
	}
	for _, ai := range kcfg.AuthInfos {
		ai.Impersonate = user
	}
	path := filepath.Join(c.Dir, "kubeconfig-"+strings.NewReplacer(":", "-", "/", "-").Replace(user))
	if err := clientcmd.WriteToFile(*kcfg, path); err != nil {
		return "", fmt.Errorf("write kubeconfig for %s: %w", user, err)
	}
	return path, nil
}

// AuditEvent is one record of the audit log (the fields the tests read).
type AuditEvent struct {
	Stage      string `json:"stage"`
	Verb       string `json:"verb"`
	RequestURI string `json:"requestURI"`
	User       struct {
		Username string `json:"username"`
	} `json:"user"`
	ImpersonatedUser *struct {
		Username string `json:"username"`
	} `json:"impersonatedUser"`
	ObjectRef *struct {
		Resource    string `json:"resource"`
		Namespace   string `json:"namespace"`
		Name        string `json:"name"`
		APIGroup    string `json:"apiGroup"`
		Subresource string `json:"subresource"`
	} `json:"objectRef"`
	ResponseStatus *struct {
		Code int `json:"code"`
	} `json:"responseStatus"`
	Annotations map[string]string `json:"annotations"`
}

// As is the user the request acted as: the impersonated one, else the authenticated one.
func (e AuditEvent) As() string {
	if e.ImpersonatedUser != nil {
		return e.ImpersonatedUser.Username
	}
	return e.User.Username
}

// Forbidden tells whether RBAC refused the request.
func (e AuditEvent) Forbidden() bool {
	return e.Annotations["authorization.k8s.io/decision"] == "forbid"
}

// ErrNoAudit is returned by AuditEvents when the cluster was started without Options.Audit.
var ErrNoAudit = errors.New("the cluster was started without an audit log (cluster.Options.Audit)")

// AuditEvents reads the audit log: the requests made through ImpersonatedConfig so far. Call it
// before Stop (which removes the log). If the cluster has no audit log, ErrNoAudit is returned.
func (c *Cluster) AuditEvents() ([]AuditEvent, error) {
	if c.auditLog == "" {
		return nil, ErrNoAudit
	}
	b, err := os.ReadFile(c.auditLog)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, nil // nothing recorded yet
		}
		return nil, fmt.Errorf("read audit log: %w", err)
	}
	var out []AuditEvent
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var e AuditEvent
		if err := json.Unmarshal(line, &e); err != nil {
			// The API server may be writing the last line right now.
			continue
		}
		out = append(out, e)
	}
	return out, sc.Err()
}
