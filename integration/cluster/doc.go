// Package cluster starts a local Kubernetes control plane for tests and demos: a real etcd and
// kube-apiserver (built by `make controlplane`) run through controller-runtime's envtest, with
// drover's CRDs installed and a kubeconfig file that kubectl and `drover serve --kubeconfig` can
// use. There is no scheduler, kubelet or kube-controller-manager; the simulator in
// integration/sim plays those parts.
package cluster
