package sim

// Switches a test, the demo or a person with kubectl sets through the API.
const (
	// AnnotationFault on a Node injects a fault: FaultDown, FaultPartitioned
	// or FaultReboot; removing it heals the node.
	AnnotationFault = "sim.drover.io/fault"
	// FaultDown powers the node off: heartbeats stop, its guests die, its
	// pods still look Running to the API. Removing the fault boots it.
	FaultDown = "down"
	// FaultPartitioned cuts the node off from the API: heartbeats stop but
	// its guests keep running, until the node's watchdog (LabelWatchdogTimeout)
	// fences it by rebooting. Removing the fault reconnects it.
	FaultPartitioned = "partitioned"
	// FaultReboot reboots the node once: guests die, the node is off for
	// Options.RebootDuration, its kubelet comes back NotReady then Ready and
	// fails the pods it had; the simulator then removes the annotation.
	FaultReboot = "reboot"

	// LabelWatchdogTimeout on a Node (a Go duration, e.g. "60s", in simulated
	// time) arms a watchdog: a node partitioned that long reboots itself,
	// killing its guests.
	LabelWatchdogTimeout = "sim.drover.io/watchdog-timeout"

	// AnnotationNodeState is written by the simulator on each Node: the
	// node's ground truth (a NodeState), for people watching with kubectl.
	AnnotationNodeState = "sim.drover.io/state"

	// AnnotationDirtyRate on a VMI (a quantity of bytes per second, e.g.
	// "2Gi") is how fast the guest dirties memory. A migration converges only
	// when the bandwidth exceeds it; otherwise it fails after progressTimeout.
	AnnotationDirtyRate = "sim.drover.io/dirty-rate"

	// AnnotationPower on a Deckhouse VirtualMachine is the power state a
	// user last asked for: PowerOn or PowerOff (what a Start/Stop
	// VirtualMachineOperation does). See StartDeckhouseVM and StopDeckhouseVM.
	AnnotationPower = "sim.drover.io/power"
	PowerOn         = "on"
	PowerOff        = "off"

	// AnnotationPlatform on the KubeVirt CR set to PlatformDeckhouse makes
	// KubeVirt behave as Deckhouse's fork of it: KubeVirt's evacuation
	// controller creates no migrations, Deckhouse's evacuation controller
	// answers evictions with VirtualMachineOperations. Seeding Deckhouse VMs
	// sets it.
	AnnotationPlatform = "sim.drover.io/platform"

	// LabelManaged marks objects the simulator seeded.
	LabelManaged = "sim.drover.io/managed"
)

// Labels and names of the real systems the simulator reproduces.
const (
	launcherLabelValue  = "virt-launcher"
	deckhouseVMLabel    = "vm.kubevirt.internal.virtualization.deckhouse.io/name"
	launcherContainer   = "compute"
	schedulerName       = "default-scheduler"
	csiDriver           = "sim.csi.drover.io"
	taintUnreachable    = "node.kubernetes.io/unreachable"
	taintNotReady       = "node.kubernetes.io/not-ready"
	taintUnschedulable  = "node.kubernetes.io/unschedulable"
	taintOutOfService   = "node.kubernetes.io/out-of-service"
	labelHostname       = "kubernetes.io/hostname"
	kubevirtCRName      = "kubevirt"
	storageClassDefault = "sim-rwx"
)
