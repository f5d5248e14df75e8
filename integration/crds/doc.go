// Package crds holds the CustomResourceDefinitions of the platforms drover drives: KubeVirt
// (kubevirt.io/v1 VirtualMachine, VirtualMachineInstance, VirtualMachineInstanceMigration, KubeVirt)
// and Deckhouse virtualization (virtualization.deckhouse.io/v1alpha2 VirtualMachine,
// VirtualMachineOperation). The test cluster and the simulator install them with Install so that
// the API server validates what drover and the simulator write as the real CRDs would.
package crds
