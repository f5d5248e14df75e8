// Package deploy proves drover's Kubernetes manifests (deploy/) against the test cluster: each
// kustomization renders with kubectl and passes a server-side dry run, and the workflow tests
// (integration/e2e, integration/recovery) run drover as the base's ServiceAccount, bound to its
// ClusterRole, so a missing permission fails them and a permission no test used is reported.
package deploy
