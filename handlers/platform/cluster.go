// Package platform is what the maintenance and migration workflows know of
// the cluster: shared informers over nodes, pods, VMIs, migrations and the
// KubeVirt CR (and Deckhouse's VirtualMachines and VirtualMachineOperations
// where that API is served), the migration limits, and the few writes they
// make (migrations, stop and start requests, Kubernetes Events), on KubeVirt
// or Deckhouse virtualization, chosen per VM.
package platform

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	kvv1 "kubevirt.io/api/core/v1"
	kvclient "kubevirt.io/client-go/kubevirt/typed/core/v1"
)

// Platforms.
const (
	KubeVirt  = "kubevirt"
	Deckhouse = "deckhouse"
)

// Deckhouse virtualization's resources.
var (
	DeckhouseVMResource   = schema.GroupVersionResource{Group: "virtualization.deckhouse.io", Version: "v1alpha2", Resource: "virtualmachines"}
	DeckhouseVMOPResource = schema.GroupVersionResource{Group: "virtualization.deckhouse.io", Version: "v1alpha2", Resource: "virtualmachineoperations"}
)

// Labels and annotations drover puts on what it creates.
const (
	// LabelOperation holds a hash of the operation key (label values are
	// short); AnnotationOperation the key itself.
	LabelOperation      = "drover.io/operation"
	AnnotationOperation = "drover.io/operation"
	// AnnotationToken is the fencing token of the attempt that created the object.
	AnnotationToken = "drover.io/token"
	// LabelManagedBy marks drover's objects.
	LabelManagedBy = "app.kubernetes.io/managed-by"
	ManagedBy      = "drover"
)

// Options configure a Cluster.
type Options struct {
	// Platform forces KubeVirt or Deckhouse; "" decides per VM (a VMI
	// owned by a Deckhouse VirtualMachine is Deckhouse's).
	Platform string
	// Bandwidth is the migration bandwidth the estimates assume when the
	// KubeVirt CR sets none (bytes per second; default 1 GiB/s).
	Bandwidth int64
	// Overhead is the fixed part of a migration's expected time (default 10s).
	Overhead time.Duration
	// RestartTime is the expected time to restart a VM elsewhere (default 20s).
	RestartTime time.Duration
	Log         zerolog.Logger
	// Metrics, default unregistered ones.
	Metrics *Metrics
}

// Cluster is the workflows' view of the cluster. Build it with New, run it
// with Run; handlers wait for it with Ready.
type Cluster struct {
	opts     Options
	Kube     kubernetes.Interface
	KubeVirt kvclient.KubevirtV1Interface
	Dynamic  dynamic.Interface
	// Estimator learns migration times from what drover observes.
	Estimator *Estimator

	nodes, pods, vmis, vmims, kvs, vms cache.SharedIndexInformer
	dvms, vmops                        cache.SharedIndexInformer
	deckhouse                          bool

	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder

	expect *expectations

	changeMu sync.Mutex
	changed  chan struct{}

	ready    chan struct{}
	readyErr error
}

// Index names.
const (
	byNode = "node"
	byVMI  = "vmi"
	byVM   = "vm"
)

// New builds a Cluster from a REST config. Nothing runs until Run.
func New(cfg *rest.Config, opts Options) (*Cluster, error) {
	if opts.Platform != "" && opts.Platform != KubeVirt && opts.Platform != Deckhouse {
		return nil, fmt.Errorf("platform must be %s or %s, got %q", KubeVirt, Deckhouse, opts.Platform)
	}
	if opts.Bandwidth <= 0 {
		opts.Bandwidth = 1 << 30
	}
	if opts.Overhead <= 0 {
		opts.Overhead = 10 * time.Second
	}
	if opts.RestartTime <= 0 {
		opts.RestartTime = 20 * time.Second
	}
	if opts.Metrics == nil {
		opts.Metrics = NewMetrics(nil)
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	kv, err := kvclient.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubevirt client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}
	c := &Cluster{opts: opts, Kube: kube, KubeVirt: kv, Dynamic: dyn, Estimator: NewEstimator(),
		expect: newExpectations(), ready: make(chan struct{}), changed: make(chan struct{})}
	c.broadcaster = record.NewBroadcaster()
	c.recorder = c.broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "drover"})
	if opts.Metrics.InFlight != nil {
		opts.Metrics.InFlight.cluster.Store(c)
	}
	return c, nil
}

// Platform returns the forced platform, "" when it is decided per VM.
func (c *Cluster) Platform() string { return c.opts.Platform }

// Log is the cluster's logger.
func (c *Cluster) Log() zerolog.Logger { return c.opts.Log }

func typedListWatch[T runtime.Object](list func(context.Context, metav1.ListOptions) (T, error), w func(context.Context, metav1.ListOptions) (watch.Interface, error)) *cache.ListWatch {
	return &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) { return list(ctx, o) },
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return w(ctx, o)
		},
	}
}

// Run starts the informers and the event sink, and blocks until ctx ends.
// Ready is closed once the caches are synced (or Run failed).
func (c *Cluster) Run(ctx context.Context) error {
	err := c.start(ctx)
	c.readyErr = err
	close(c.ready)
	if err != nil {
		return err
	}
	<-ctx.Done()
	c.broadcaster.Shutdown()
	return nil
}

func (c *Cluster) start(ctx context.Context) error {
	c.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: c.Kube.CoreV1().Events("")})
	c.nodes = cache.NewSharedIndexInformer(typedListWatch(c.Kube.CoreV1().Nodes().List, c.Kube.CoreV1().Nodes().Watch), &corev1.Node{}, 0, cache.Indexers{})
	c.pods = cache.NewSharedIndexInformer(typedListWatch(c.Kube.CoreV1().Pods("").List, c.Kube.CoreV1().Pods("").Watch), &corev1.Pod{}, 0,
		cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc, byNode: func(obj any) ([]string, error) {
			if p, ok := obj.(*corev1.Pod); ok && p.Spec.NodeName != "" {
				return []string{p.Spec.NodeName}, nil
			}
			return nil, nil
		}})
	c.vmis = cache.NewSharedIndexInformer(typedListWatch(c.KubeVirt.VirtualMachineInstances("").List, c.KubeVirt.VirtualMachineInstances("").Watch),
		&kvv1.VirtualMachineInstance{}, 0, cache.Indexers{byNode: func(obj any) ([]string, error) {
			if v, ok := obj.(*kvv1.VirtualMachineInstance); ok && v.Status.NodeName != "" {
				return []string{v.Status.NodeName}, nil
			}
			return nil, nil
		}})
	c.vmims = cache.NewSharedIndexInformer(typedListWatch(c.KubeVirt.VirtualMachineInstanceMigrations("").List, c.KubeVirt.VirtualMachineInstanceMigrations("").Watch),
		&kvv1.VirtualMachineInstanceMigration{}, 0, cache.Indexers{byVMI: func(obj any) ([]string, error) {
			if m, ok := obj.(*kvv1.VirtualMachineInstanceMigration); ok {
				return []string{m.Namespace + "/" + m.Spec.VMIName}, nil
			}
			return nil, nil
		}, LabelOperation: func(obj any) ([]string, error) {
			if m, ok := obj.(metav1.Object); ok && m.GetLabels()[LabelOperation] != "" {
				return []string{m.GetLabels()[LabelOperation]}, nil
			}
			return nil, nil
		}})
	c.kvs = cache.NewSharedIndexInformer(typedListWatch(c.KubeVirt.KubeVirts("").List, c.KubeVirt.KubeVirts("").Watch), &kvv1.KubeVirt{}, 0, cache.Indexers{})
	c.vms = cache.NewSharedIndexInformer(typedListWatch(c.KubeVirt.VirtualMachines("").List, c.KubeVirt.VirtualMachines("").Watch), &kvv1.VirtualMachine{}, 0, cache.Indexers{})
	infs := []cache.SharedIndexInformer{c.nodes, c.pods, c.vmis, c.vmims, c.kvs, c.vms}

	if c.opts.Platform != KubeVirt {
		served, err := c.deckhouseServed()
		if err != nil {
			return err
		}
		c.deckhouse = served
	}
	if c.deckhouse {
		f := dynamicinformer.NewDynamicSharedInformerFactory(c.Dynamic, 0)
		c.dvms = f.ForResource(DeckhouseVMResource).Informer()
		c.vmops = f.ForResource(DeckhouseVMOPResource).Informer()
		if err := c.vmops.AddIndexers(cache.Indexers{byVM: func(obj any) ([]string, error) {
			u, ok := obj.(*unstructured.Unstructured)
			if !ok {
				return nil, nil
			}
			vm, _, _ := unstructured.NestedString(u.Object, "spec", "virtualMachineName")
			return []string{u.GetNamespace() + "/" + vm}, nil
		}, LabelOperation: func(obj any) ([]string, error) {
			if m, ok := obj.(metav1.Object); ok && m.GetLabels()[LabelOperation] != "" {
				return []string{m.GetLabels()[LabelOperation]}, nil
			}
			return nil, nil
		}}); err != nil {
			return err
		}
		infs = append(infs, c.dvms, c.vmops)
	}
	poke := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.poke() },
		UpdateFunc: func(any, any) { c.poke() },
		DeleteFunc: func(any) { c.poke() },
	}
	// A migration the cache has shown is no longer expected: its later
	// deletion must not bring the expectation back.
	seen := func(platform string) cache.ResourceEventHandlerFuncs {
		observe := func(obj any) {
			if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
				c.expect.observed(platform + ":" + key)
			}
		}
		return cache.ResourceEventHandlerFuncs{AddFunc: observe, UpdateFunc: func(_, n any) { observe(n) }}
	}
	if _, err := c.vmims.AddEventHandler(seen(KubeVirt)); err != nil {
		return err
	}
	if c.vmops != nil {
		if _, err := c.vmops.AddEventHandler(seen(Deckhouse)); err != nil {
			return err
		}
	}
	if err := c.pods.AddIndexers(cache.Indexers{byVMI: func(obj any) ([]string, error) {
		if p, ok := obj.(*corev1.Pod); ok && p.Labels[kvv1.CreatedByLabel] != "" {
			return []string{p.Labels[kvv1.CreatedByLabel]}, nil
		}
		return nil, nil
	}}); err != nil {
		return err
	}
	var synced []cache.InformerSynced
	for _, inf := range infs {
		if _, err := inf.AddEventHandler(poke); err != nil {
			return err
		}
		go inf.RunWithContext(ctx)
		synced = append(synced, inf.HasSynced)
	}
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if !cache.WaitForCacheSync(sctx.Done(), synced...) {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return errors.New("cluster caches did not sync within 2m")
	}
	return nil
}

// deckhouseServed asks API discovery whether Deckhouse virtualization's
// operations are served.
func (c *Cluster) deckhouseServed() (bool, error) {
	res, err := c.Kube.Discovery().ServerResourcesForGroupVersion(DeckhouseVMOPResource.GroupVersion().String())
	if err != nil {
		if strings.Contains(err.Error(), "not found") || strings.Contains(err.Error(), "could not find") {
			return false, nil
		}
		return false, fmt.Errorf("discover %s: %w", DeckhouseVMOPResource.GroupVersion(), err)
	}
	for _, r := range res.APIResources {
		if r.Name == DeckhouseVMOPResource.Resource {
			return true, nil
		}
	}
	return false, nil
}

// poke wakes everyone waiting in Changed.
func (c *Cluster) poke() {
	c.changeMu.Lock()
	close(c.changed)
	c.changed = make(chan struct{})
	c.changeMu.Unlock()
}

// Changed returns a channel that is closed at the next change the caches
// see (a node, pod, VMI, migration or operation was added, changed or
// deleted): workflows wait on it instead of polling the API.
func (c *Cluster) Changed() <-chan struct{} {
	c.changeMu.Lock()
	defer c.changeMu.Unlock()
	return c.changed
}

// Ready waits until the caches are synced.
func (c *Cluster) Ready(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-c.ready:
		return c.readyErr
	}
}

// Node returns a node from the cache, nil if there is none.
func (c *Cluster) Node(name string) *corev1.Node {
	obj, ok, _ := c.nodes.GetStore().GetByKey(name)
	if !ok {
		return nil
	}
	return obj.(*corev1.Node)
}

// Nodes returns every node, sorted by name.
func (c *Cluster) Nodes() []*corev1.Node {
	var out []*corev1.Node
	for _, o := range c.nodes.GetStore().List() {
		out = append(out, o.(*corev1.Node))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// PodsOn returns the pods bound to node.
func (c *Cluster) PodsOn(node string) []*corev1.Pod {
	objs, _ := c.pods.GetIndexer().ByIndex(byNode, node)
	out := make([]*corev1.Pod, 0, len(objs))
	for _, o := range objs {
		out = append(out, o.(*corev1.Pod))
	}
	return out
}

// Pod returns a pod from the cache.
func (c *Cluster) Pod(ns, name string) *corev1.Pod {
	obj, ok, _ := c.pods.GetStore().GetByKey(ns + "/" + name)
	if !ok {
		return nil
	}
	return obj.(*corev1.Pod)
}

// LauncherPods returns the virt-launcher pods of a VMI (by its UID), on any
// node: its own and a migration's target.
func (c *Cluster) LauncherPods(vmi *kvv1.VirtualMachineInstance) []*corev1.Pod {
	objs, _ := c.pods.GetIndexer().ByIndex(byVMI, string(vmi.UID))
	out := make([]*corev1.Pod, 0, len(objs))
	for _, o := range objs {
		out = append(out, o.(*corev1.Pod))
	}
	return out
}

// VMIsOn returns the VMIs whose status.nodeName is node, sorted.
func (c *Cluster) VMIsOn(node string) []*kvv1.VirtualMachineInstance {
	objs, _ := c.vmis.GetIndexer().ByIndex(byNode, node)
	out := make([]*kvv1.VirtualMachineInstance, 0, len(objs))
	for _, o := range objs {
		out = append(out, o.(*kvv1.VirtualMachineInstance))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Namespace+"/"+out[i].Name < out[j].Namespace+"/"+out[j].Name })
	return out
}

// VMI returns the VMI ns/name from the cache, nil if there is none.
func (c *Cluster) VMI(ns, name string) *kvv1.VirtualMachineInstance {
	obj, ok, _ := c.vmis.GetStore().GetByKey(ns + "/" + name)
	if !ok {
		return nil
	}
	return obj.(*kvv1.VirtualMachineInstance)
}

// VM returns KubeVirt's VirtualMachine ns/name from the cache, nil if none.
func (c *Cluster) VM(ns, name string) *kvv1.VirtualMachine {
	obj, ok, _ := c.vms.GetStore().GetByKey(ns + "/" + name)
	if !ok {
		return nil
	}
	return obj.(*kvv1.VirtualMachine)
}

// DeckhouseVM returns Deckhouse's VirtualMachine ns/name, nil if none.
func (c *Cluster) DeckhouseVM(ns, name string) *unstructured.Unstructured {
	if c.dvms == nil {
		return nil
	}
	obj, ok, _ := c.dvms.GetStore().GetByKey(ns + "/" + name)
	if !ok {
		return nil
	}
	return obj.(*unstructured.Unstructured)
}

// PlatformOf says whose VM a VMI is: Deckhouse when it is owned by a
// Deckhouse VirtualMachine (or the platform is forced to it), else KubeVirt.
func (c *Cluster) PlatformOf(vmi *kvv1.VirtualMachineInstance) string {
	if c.opts.Platform != "" {
		return c.opts.Platform
	}
	if c.deckhouse && vmi != nil {
		for _, ref := range vmi.OwnerReferences {
			if ref.Kind == "VirtualMachine" && strings.HasPrefix(ref.APIVersion, DeckhouseVMResource.Group+"/") {
				return Deckhouse
			}
		}
	}
	return KubeVirt
}

// Config is what the KubeVirt CR says about migrations and evictions.
type Config struct {
	Limits struct {
		PerCluster int
		PerNode    int
	}
	// Bandwidth is bandwidthPerMigration in bytes per second, 0 when unset.
	Bandwidth int64
	// EvictionStrategy is the cluster-wide default, "" when unset.
	EvictionStrategy string
}

// KubeVirtConfig reads the KubeVirt CR (the first by namespace/name, as
// KubeVirt does), with KubeVirt's defaults where it says nothing. On a
// Deckhouse cluster without a readable CR it returns Deckhouse's settings.
func (c *Cluster) KubeVirtConfig() Config {
	var cfg Config
	cfg.Limits.PerCluster, cfg.Limits.PerNode = 5, 2
	objs := c.kvs.GetStore().List()
	if len(objs) == 0 && c.deckhouse {
		cfg.Limits.PerCluster, cfg.Limits.PerNode = max(2, len(c.nodes.GetStore().ListKeys())), 1
		cfg.EvictionStrategy = string(kvv1.EvictionStrategyLiveMigrate)
		return cfg
	}
	sort.Slice(objs, func(i, j int) bool {
		a, b := objs[i].(*kvv1.KubeVirt), objs[j].(*kvv1.KubeVirt)
		return a.Namespace+"/"+a.Name < b.Namespace+"/"+b.Name
	})
	if len(objs) == 0 {
		return cfg
	}
	kv := objs[0].(*kvv1.KubeVirt)
	if s := kv.Spec.Configuration.EvictionStrategy; s != nil {
		cfg.EvictionStrategy = string(*s)
	}
	m := kv.Spec.Configuration.MigrationConfiguration
	if m == nil {
		return cfg
	}
	if m.ParallelMigrationsPerCluster != nil {
		cfg.Limits.PerCluster = int(*m.ParallelMigrationsPerCluster)
	}
	if m.ParallelOutboundMigrationsPerNode != nil {
		cfg.Limits.PerNode = int(*m.ParallelOutboundMigrationsPerNode)
	}
	if m.BandwidthPerMigration != nil && !m.BandwidthPerMigration.IsZero() {
		cfg.Bandwidth = m.BandwidthPerMigration.Value()
	}
	return cfg
}

// RecordVM records a Kubernetes Event on a VM (KubeVirt's or Deckhouse's,
// as the VMI's platform says).
func (c *Cluster) RecordVM(vmi *kvv1.VirtualMachineInstance, ns, name, eventType, reason, msg string) {
	ref := &corev1.ObjectReference{Kind: "VirtualMachine", APIVersion: kvv1.SchemeGroupVersion.String(), Namespace: ns, Name: name}
	if c.PlatformOf(vmi) == Deckhouse {
		ref.APIVersion = DeckhouseVMResource.GroupVersion().String()
		if dvm := c.DeckhouseVM(ns, name); dvm != nil {
			ref.UID = dvm.GetUID()
		}
	} else if vm := c.VM(ns, name); vm != nil {
		ref.UID = vm.UID
	}
	c.recorder.Event(ref, eventType, reason, msg)
}

// RecordNode records a Kubernetes Event on a node.
func (c *Cluster) RecordNode(node, eventType, reason, msg string) {
	ref := &corev1.ObjectReference{Kind: "Node", APIVersion: "v1", Name: node, UID: "", Namespace: ""}
	if n := c.Node(node); n != nil {
		ref.UID = n.UID
	}
	c.recorder.Event(ref, eventType, reason, msg)
}

// expectations remembers objects this process created that the caches do
// not show yet, so that a decision made right after a create (a limit
// count) does not miss them.
type expectations struct {
	mu      sync.Mutex
	created map[string]expected
}

type expected struct {
	at  time.Time
	obj any
}

func newExpectations() *expectations { return &expectations{created: map[string]expected{}} }

func (e *expectations) add(key string, obj any) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.created[key] = expected{time.Now(), obj}
}

// observed forgets an expected object the cache has shown.
func (e *expectations) observed(key string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.created, key)
}

// pending returns the expected objects the cache does not show yet;
// seen says whether it does. Entries older than a minute are dropped.
func (e *expectations) pending(seen func(key string) bool) []any {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []any
	for k, x := range e.created {
		if seen(k) || time.Since(x.at) > time.Minute {
			delete(e.created, k)
			continue
		}
		out = append(out, x.obj)
	}
	return out
}

// Options returns the options in effect, defaults filled in.
func (c *Cluster) Options() Options { return c.opts }

// freshTimeout bounds how long Fresh waits for the node cache to catch up.
const freshTimeout = 10 * time.Second

// Fresh waits until the node cache holds at least what a live read of the
// API server returns now: every node in it at the same or a later version,
// none that the API server no longer has. A workflow calls it before it
// decides from the caches what a person may just have changed (an uncordon
// right before a maintenance request), so it never rejects or plans from a
// stale view. An error means the cache did not catch up in time (a retry
// helps) or the API server could not be read.
func (c *Cluster) Fresh(ctx context.Context) error {
	live, err := c.Kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("read the nodes from the API server to check the cache (a retry helps): %w", err)
	}
	want := make(map[string]string, len(live.Items))
	for i := range live.Items {
		want[live.Items[i].Name] = live.Items[i].ResourceVersion
	}
	ctx, cancel := context.WithTimeout(ctx, freshTimeout)
	defer cancel()
	for {
		changed := c.Changed()
		lag := c.nodeCacheLag(want, live.ResourceVersion)
		if lag == "" {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return fmt.Errorf("the node cache still lags the API server after %s (%s; a retry helps): %w", freshTimeout, lag, ctx.Err())
		}
	}
}

// nodeCacheLag says which node the cache has older than want (name to the
// resourceVersion a live list at version listed returned), or holds though
// the list did not and it is not newer than the list; "" when none.
func (c *Cluster) nodeCacheLag(want map[string]string, listed string) string {
	for name, rv := range want {
		n := c.Node(name)
		if n == nil {
			return "node " + name + " not yet seen"
		}
		if n.ResourceVersion != rv && !newerVersion(n.ResourceVersion, rv) {
			return "node " + name + " at version " + n.ResourceVersion + ", the API server has " + rv
		}
	}
	for _, n := range c.Nodes() {
		if _, ok := want[n.Name]; !ok && !newerVersion(n.ResourceVersion, listed) {
			return "node " + n.Name + " deleted but still cached"
		}
	}
	return ""
}

// newerVersion says whether resourceVersion a is later than b. Versions are
// opaque to clients, but kube-apiserver's are etcd revisions: when both parse
// as integers they are compared, otherwise only equality is trusted.
func newerVersion(a, b string) bool {
	x, errA := strconv.ParseUint(a, 10, 64)
	y, errB := strconv.ParseUint(b, 10, 64)
	return errA == nil && errB == nil && x > y
}
