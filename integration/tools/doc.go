// Package tools pins and builds the control-plane binaries (kube-apiserver,
// etcd) that the integration tests start through envtest. It is a separate
// module so that k8s.io/kubernetes never enters drover's own go.mod.
package tools
