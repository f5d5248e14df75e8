package sim

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/utils/clock"
	kvclient "kubevirt.io/client-go/kubevirt/typed/core/v1"

	"github.com/drover-io/drover/integration/crds"
)

// Options configure a Simulator. Durations are in simulated (real-world)
// time: the simulator divides them by TimeScale. Zero values take the
// defaults documented on each field.
type Options struct {
	// TimeScale speeds the simulated world up: 10 makes heartbeats, grace
	// periods, reboots and migrations ten times faster than real time.
	// Default 1.
	TimeScale float64
	// Clock drives every timer and every timestamp the simulator writes.
	// Default: the real clock.
	Clock clock.WithTicker
	// Logger receives the simulator's logs. Default: a disabled logger.
	Logger *zerolog.Logger
	// InstallCRDs installs the CRDs the simulator needs when they are
	// missing. Default crds.Install.
	InstallCRDs func(ctx context.Context, cfg *rest.Config) error

	// HeartbeatInterval is how often a kubelet renews its Lease (10s).
	HeartbeatInterval time.Duration
	// NodeMonitorGracePeriod is how long the node lifecycle controller waits
	// without a heartbeat before it marks a node Ready=Unknown (50s, the
	// kube-controller-manager default since Kubernetes 1.32).
	NodeMonitorGracePeriod time.Duration
	// NodeMonitorPeriod is how often the node lifecycle controller looks (5s).
	NodeMonitorPeriod time.Duration
	// RebootDuration is how long a rebooting node is off (30s).
	RebootDuration time.Duration
	// KubeletStartupDuration is how long a booted kubelet reports NotReady
	// before Ready (5s).
	KubeletStartupDuration time.Duration
	// PodStartDuration is how long a bound pod stays ContainerCreating (2s).
	PodStartDuration time.Duration
	// PodStopDuration is how long a kubelet takes to stop a pod being
	// deleted gracefully (2s).
	PodStopDuration time.Duration
	// VirtHandlerHeartbeatInterval is how often virt-handler refreshes the
	// kubevirt.io/heartbeat node annotation (60s).
	VirtHandlerHeartbeatInterval time.Duration
	// VirtHandlerUnresponsiveAfter is how stale that heartbeat may get before
	// virt-controller marks the node kubevirt.io/schedulable=false (5m).
	VirtHandlerUnresponsiveAfter time.Duration
	// MigrationStepDuration is the time between the migration phases
	// Scheduled, PreparingTarget, TargetReady and Running (1s).
	MigrationStepDuration time.Duration
	// MigrationBandwidth is the transfer rate, bytes per second, of a
	// migration when the KubeVirt CR sets no bandwidthPerMigration
	// (KubeVirt's default is unlimited, i.e. the network's speed): 1 GiB/s.
	MigrationBandwidth int64
	// MigrationUnschedulableTimeout fails a migration whose target pod stays
	// unschedulable this long (300s, as KubeVirt).
	MigrationUnschedulableTimeout time.Duration
	// StartBackoffMax caps the back-off between start attempts of a VM whose
	// VMIs keep failing before they ever run (300s, as KubeVirt).
	StartBackoffMax time.Duration
	// KubeVirtNamespace is where the default KubeVirt CR named "kubevirt" is
	// created when none exists ("kubevirt"), and where KubeVirt's own pods
	// run.
	KubeVirtNamespace string
	// NoKubeVirtPods leaves out KubeVirt's own pods (virt-handler on every
	// node, virt-api and virt-controller), which are created by default.
	// KubeVirt's control plane then never fails: its webhooks always answer
	// and its controllers always act.
	NoKubeVirtPods bool
	// KubeVirtPods says on which nodes the replicas of virt-api and
	// virt-controller first start (default: wherever the scheduler puts
	// them). Their replacements, once those pods are deleted, are scheduled.
	KubeVirtPods KubeVirtPods
	// WebhookListenAddr is where the eviction webhook listens (host:port;
	// port 0 picks one). The API server must reach it at that host, which
	// the serving certificate covers. Default: $DROVER_SIM_WEBHOOK_ADDR,
	// else 127.0.0.1 on a random port.
	WebhookListenAddr string
}

func (o *Options) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	if o.TimeScale <= 0 {
		o.TimeScale = 1
	}
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
	if o.Logger == nil {
		l := zerolog.Nop()
		o.Logger = &l
	}
	if o.InstallCRDs == nil {
		o.InstallCRDs = crds.Install
	}
	def(&o.HeartbeatInterval, 10*time.Second)
	def(&o.NodeMonitorGracePeriod, 50*time.Second)
	def(&o.NodeMonitorPeriod, 5*time.Second)
	def(&o.RebootDuration, 30*time.Second)
	def(&o.KubeletStartupDuration, 5*time.Second)
	def(&o.PodStartDuration, 2*time.Second)
	def(&o.PodStopDuration, 2*time.Second)
	def(&o.VirtHandlerHeartbeatInterval, time.Minute)
	def(&o.VirtHandlerUnresponsiveAfter, 5*time.Minute)
	def(&o.MigrationStepDuration, time.Second)
	def(&o.MigrationUnschedulableTimeout, 300*time.Second)
	def(&o.StartBackoffMax, 300*time.Second)
	if o.MigrationBandwidth <= 0 {
		o.MigrationBandwidth = 1 << 30
	}
	if o.KubeVirtNamespace == "" {
		o.KubeVirtNamespace = "kubevirt"
	}
}

// Deckhouse virtualization resources.
var (
	DeckhouseVMGVR   = schema.GroupVersionResource{Group: "virtualization.deckhouse.io", Version: "v1alpha2", Resource: "virtualmachines"}
	DeckhouseVMOPGVR = schema.GroupVersionResource{Group: "virtualization.deckhouse.io", Version: "v1alpha2", Resource: "virtualmachineoperations"}
)

// Simulator is the simulated KubeVirt cluster: build it with New, start it
// with Run.
type Simulator struct {
	opts  Options
	cfg   *rest.Config
	log   zerolog.Logger
	clock clock.WithTicker

	// Kube is the typed client for core objects.
	Kube kubernetes.Interface
	// KubeVirt is the typed client for kubevirt.io/v1 objects. It acts as
	// the user of the configuration New was given: KubeVirt's admission
	// treats it as any user (see kv for the simulator's own writes).
	KubeVirt kvclient.KubevirtV1Interface
	// kv is the client KubeVirt's components use: it acts as
	// virt-controller's service account (see kubeVirtConfig), which
	// KubeVirt's admission lets set what users may not.
	kv    kvclient.KubevirtV1Interface
	kvCfg *rest.Config
	// webhooks are virt-api's admission webhooks.
	webhooks *virtAPIWebhooks
	// Dynamic is the client for Deckhouse objects.
	Dynamic dynamic.Interface

	kubeInformers  informers.SharedInformerFactory
	leaseInformers informers.SharedInformerFactory
	dynInformers   dynamicinformer.DynamicSharedInformerFactory

	nodeInformer  cache.SharedIndexInformer
	podInformer   cache.SharedIndexInformer
	leaseInformer cache.SharedIndexInformer
	pvcInformer   cache.SharedIndexInformer
	pvInformer    cache.SharedIndexInformer
	vaInformer    cache.SharedIndexInformer
	vmInformer    cache.SharedIndexInformer
	vmiInformer   cache.SharedIndexInformer
	vmimInformer  cache.SharedIndexInformer
	kvInformer    cache.SharedIndexInformer
	dvmInformer   cache.SharedIndexInformer
	vmopInformer  cache.SharedIndexInformer

	nodeQueue      workqueue.TypedRateLimitingInterface[string]
	kubeletQueue   workqueue.TypedRateLimitingInterface[string]
	schedulerQueue workqueue.TypedRateLimitingInterface[string]
	volumeQueue    workqueue.TypedRateLimitingInterface[string]
	vmQueue        workqueue.TypedRateLimitingInterface[string]
	vmiQueue       workqueue.TypedRateLimitingInterface[string]
	migrationQueue workqueue.TypedRateLimitingInterface[string]
	dvmQueue       workqueue.TypedRateLimitingInterface[string]
	dhEvacQueue    workqueue.TypedRateLimitingInterface[string]
	vmopQueue      workqueue.TypedRateLimitingInterface[string]

	controlPlaneQueue workqueue.TypedRateLimitingInterface[string]

	nodes     *nodeStates
	kubelet   *kubeletState
	scheduler *schedulerState
	migration *migrationState
	truth     *truth
	workloads *workloads

	saMu    sync.Mutex
	saReady map[string]bool

	cpExpect map[string]time.Time // control-plane pods created, not yet seen (one worker)
	cpPlaced map[string][]bool    // which Options.KubeVirtPods placements are used, by component
	leader   *virtControllerLeader

	runMu   sync.Mutex
	running bool
	ready   chan struct{}
}

// New builds a Simulator for the cluster cfg points at. It does not talk to
// the API server until Run.
func New(cfg *rest.Config, opts Options) (*Simulator, error) {
	opts.setDefaults()
	cfg = rest.CopyConfig(cfg)
	if cfg.QPS == 0 {
		cfg.QPS = 200
		cfg.Burst = 400
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("sim: kubernetes client: %w", err)
	}
	kv, err := kvclient.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("sim: kubevirt client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("sim: dynamic client: %w", err)
	}
	kvCfg := kubeVirtConfig(cfg, opts.KubeVirtNamespace)
	kvAsController, err := kvclient.NewForConfig(kvCfg)
	if err != nil {
		return nil, fmt.Errorf("sim: kubevirt client as virt-controller: %w", err)
	}
	s := &Simulator{
		opts:     opts,
		cfg:      cfg,
		log:      *opts.Logger,
		clock:    opts.Clock,
		Kube:     kube,
		KubeVirt: kv,
		kv:       kvAsController,
		kvCfg:    kvCfg,
		Dynamic:  dyn,
		saReady:  map[string]bool{},
		cpExpect: map[string]time.Time{},
		cpPlaced: map[string][]bool{},
		leader:   &virtControllerLeader{},
		ready:    make(chan struct{}),
	}
	kvp, err := newKVPlane(kvCfg, s.log, s.scaled, s.clock.Now)
	if err != nil {
		return nil, fmt.Errorf("sim: %w", err)
	}
	s.webhooks = newVirtAPIWebhooks(kvp, opts.KubeVirtNamespace, webhookListenAddr(opts), s.log)
	s.webhooks.available = s.virtAPIAvailable
	s.nodes = newNodeStates()
	s.kubelet = newKubeletState()
	s.scheduler = newSchedulerState()
	s.migration = newMigrationState()
	s.truth = newTruth(s.clock)
	s.setupInformers()
	s.scheduler.usage.track(s.podInformer, func() { s.scheduler.nodesChanged(s) })
	s.setupQueues()
	s.setupWorkloads()
	s.setupDeckhouseEvacuation()
	s.setupEvacuation()
	return s, nil
}

// Options returns the options in effect, defaults filled in.
func (s *Simulator) Options() Options { return s.opts }

// Logger returns the simulator's logger, for controllers added in this package.
func (s *Simulator) Logger() zerolog.Logger { return s.log }

// scaled converts a simulated duration into the wall-clock duration the
// simulator waits for it.
func (s *Simulator) scaled(d time.Duration) time.Duration {
	r := time.Duration(float64(d) / s.opts.TimeScale)
	if r < time.Millisecond && d > 0 {
		r = time.Millisecond
	}
	return r
}

func (s *Simulator) now() metav1.Time { return metav1.NewTime(s.clock.Now().Truncate(time.Second)) }

// controllers lists every control loop Run starts. Each blocks until ctx
// ends. Controllers of this package written elsewhere are added here.
func (s *Simulator) controllers() []namedController {
	return []namedController{
		{"node-kubelet", s.runNodes},
		{"node-heartbeat", s.runHeartbeats},
		{"node-lifecycle", s.runNodeLifecycle},
		{"virt-handler-heartbeat", s.runVirtHandlerHeartbeats},
		{"kubelet", s.runKubelet},
		{"scheduler", s.runScheduler},
		{"volumes", s.runVolumes},
		{"vm", s.runVMs},
		{"vmi", s.runVMIs},
		{"migration", s.runMigrations},
		{"deckhouse-vm", s.runDeckhouseVMs},
		{"deckhouse-evacuation", s.runDeckhouseEvacuation},
		{"kubevirt-control-plane", s.runControlPlane},
		{"virt-api-webhooks", s.runWebhooks},
		{"virt-controller-leader", s.runVirtControllerLeader},
		{"evacuation", s.runEvacuation},
		{"vmop", s.runVMOperations},
		{"disruption", s.runDisruption},
		{"replicaset", s.runReplicaSets},
	}
}

type namedController struct {
	name string
	run  func(ctx context.Context) error
}

// Run installs the CRDs when missing, creates the default KubeVirt CR when
// none exists, starts every controller and blocks until ctx ends. It returns
// only after every controller has exited; the error joins their failures
// (ctx's own cancellation is not an error).
func (s *Simulator) Run(ctx context.Context) error {
	s.runMu.Lock()
	if s.running {
		s.runMu.Unlock()
		return errors.New("sim: Run called twice")
	}
	s.running = true
	s.runMu.Unlock()

	if err := s.opts.InstallCRDs(ctx, s.cfg); err != nil {
		return fmt.Errorf("sim: install CRDs: %w", err)
	}
	if err := s.ensureKubeVirtCR(ctx); err != nil {
		return err
	}
	if err := s.ensureNamespace(ctx, corev1.NamespaceNodeLease); err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.kubeInformers.Start(ctx.Done())
	s.leaseInformers.Start(ctx.Done())
	s.dynInformers.Start(ctx.Done())
	var infWG sync.WaitGroup
	defer func() { cancel(); infWG.Wait() }() // hand-built informers have exited when Run returns
	for _, inf := range []cache.SharedIndexInformer{s.vmInformer, s.vmiInformer, s.vmimInformer, s.kvInformer} {
		infWG.Add(1)
		go func() {
			defer infWG.Done()
			inf.Run(ctx.Done())
		}()
	}
	if !cache.WaitForCacheSync(ctx.Done(), s.syncedFuncs()...) {
		s.kubeInformers.Shutdown()
		s.leaseInformers.Shutdown()
		s.dynInformers.Shutdown()
		return ctx.Err()
	}
	s.log.Info().Float64("timeScale", s.opts.TimeScale).Msg("simulator caches synced, starting controllers")

	var wg sync.WaitGroup
	errs := make(chan error, 32)
	for _, c := range s.controllers() {
		wg.Add(1)
		go func(c namedController) {
			defer wg.Done()
			if err := c.run(ctx); err != nil && !errors.Is(err, context.Canceled) {
				s.log.Error().Err(err).Str("controller", c.name).Msg("controller failed")
				errs <- fmt.Errorf("controller %s: %w", c.name, err)
				cancel()
			}
		}(c)
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if s.waitWebhooksActive(ctx) {
			close(s.ready)
		}
	}()
	<-ctx.Done()
	for _, q := range s.queues() {
		q.ShutDown()
	}
	wg.Wait()
	s.kubeInformers.Shutdown()
	s.leaseInformers.Shutdown()
	s.dynInformers.Shutdown()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	return errors.Join(all...)
}

// Ready is closed once Run has synced its caches, started its controllers and the API server
// calls virt-api's webhooks.
func (s *Simulator) Ready() <-chan struct{} { return s.ready }

func (s *Simulator) queues() []workqueue.TypedRateLimitingInterface[string] {
	return []workqueue.TypedRateLimitingInterface[string]{
		s.nodeQueue, s.kubeletQueue, s.schedulerQueue, s.volumeQueue,
		s.vmQueue, s.vmiQueue, s.migrationQueue, s.dvmQueue, s.controlPlaneQueue,
	}
}

func (s *Simulator) newQueue(name string) workqueue.TypedRateLimitingInterface[string] {
	rl := workqueue.NewTypedItemExponentialFailureRateLimiter[string](5*time.Millisecond, 2*time.Second)
	return workqueue.NewTypedRateLimitingQueueWithConfig(rl, workqueue.TypedRateLimitingQueueConfig[string]{
		Name:  name,
		Clock: s.clock,
	})
}

func (s *Simulator) setupQueues() {
	s.nodeQueue = s.newQueue("sim-node")
	s.kubeletQueue = s.newQueue("sim-kubelet")
	s.schedulerQueue = s.newQueue("sim-scheduler")
	s.volumeQueue = s.newQueue("sim-volumes")
	s.vmQueue = s.newQueue("sim-vm")
	s.vmiQueue = s.newQueue("sim-vmi")
	s.migrationQueue = s.newQueue("sim-migration")
	s.dvmQueue = s.newQueue("sim-deckhouse-vm")
	s.dhEvacQueue = s.newQueue("sim-deckhouse-evacuation")
	s.vmopQueue = s.newQueue("sim-vmop")
	s.controlPlaneQueue = s.newQueue("sim-kubevirt-control-plane")
}

// runWorkers processes queue with sync until ctx ends. A sync error requeues
// the key with back-off; sync itself schedules time-based work with AddAfter.
func (s *Simulator) runWorkers(ctx context.Context, name string, q workqueue.TypedRateLimitingInterface[string], workers int, syncFn func(ctx context.Context, key string) error) error {
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				key, quit := q.Get()
				if quit {
					return
				}
				err := syncFn(ctx, key)
				switch {
				case err == nil:
					q.Forget(key)
				case ctx.Err() != nil:
					q.Forget(key)
				default:
					if q.NumRequeues(key) > 3 {
						s.log.Warn().Err(err).Str("controller", name).Str("key", key).Msg("sync failed, retrying")
					} else {
						s.log.Debug().Err(err).Str("controller", name).Str("key", key).Msg("sync failed, retrying")
					}
					q.AddRateLimited(key)
				}
				q.Done(key)
			}
		}()
	}
	<-ctx.Done()
	q.ShutDown()
	wg.Wait()
	return nil
}

// ensureNamespace creates namespace ns when it does not exist.
func (s *Simulator) ensureNamespace(ctx context.Context, ns string) error {
	_, err := s.Kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("sim: create namespace %s: %w", ns, err)
	}
	return nil
}

// ensureServiceAccount creates the "default" ServiceAccount of ns, as
// kube-controller-manager's serviceaccount controller does; the API server's
// ServiceAccount admission rejects pods in a namespace without it.
func (s *Simulator) ensureServiceAccount(ctx context.Context, ns string) error {
	s.saMu.Lock()
	ok := s.saReady[ns]
	s.saMu.Unlock()
	if ok {
		return nil
	}
	_, err := s.Kube.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default", Namespace: ns}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("sim: create service account %s/default: %w", ns, err)
	}
	s.saMu.Lock()
	s.saReady[ns] = true
	s.saMu.Unlock()
	return nil
}

// vmiGVR and friends name the KubeVirt resources for the REST client.
const (
	resVM   = "virtualmachines"
	resVMI  = "virtualmachineinstances"
	resVMIM = "virtualmachineinstancemigrations"
	resKV   = "kubevirts"
)
