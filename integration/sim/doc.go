// Package sim plays the parts of a KubeVirt cluster that no test machine has:
// kubelets, kube-scheduler, the parts of kube-controller-manager drover relies
// on (node lifecycle, pod GC, attach/detach), KubeVirt's virt-controller and
// virt-handler, and Deckhouse virtualization's VirtualMachine controller.
//
// It acts only through the Kubernetes API, as the real controllers do, so a
// client such as drover cannot tell it from a real cluster. It also keeps the
// ground truth that the API cannot show (which guest really runs where, which
// RWO volume is really written from where) and checks invariants on it.
package sim
