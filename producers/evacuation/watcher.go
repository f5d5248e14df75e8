// Package evacuation makes drover KubeVirt's External eviction handler. A
// VMI with evictionStrategy External whose virt-launcher pod is evicted (by
// `kubectl drain`, a cluster upgrade, the autoscaler) gets
// status.evacuationNodeName from KubeVirt's eviction webhook and nothing
// else; the Watcher publishes a vm.migrate.requested for it, so that
// drover migrates it with the same limits and progress as its own work,
// and the drain completes once the VM has left. It is a producer: it only
// publishes.
package evacuation

import (
	"context"
	"fmt"
	"sort"
	"time"

	"github.com/rs/zerolog"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
	kvv1 "kubevirt.io/api/core/v1"
	kvclient "kubevirt.io/client-go/kubevirt/typed/core/v1"

	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// Source is the CloudEvents source of the watcher's events.
const Source = "drover/evacuation"

// Watcher publishes a migration request for every VMI KubeVirt marked for
// evacuation whose eviction strategy is External.
type Watcher struct {
	KubeVirt  kvclient.KubevirtV1Interface
	Publisher *producers.Publisher
	Log       zerolog.Logger
}

// RequestID names the migration request of one evacuation of a VMI from a
// node: retried publishes, replicas and re-lists ask for the same migration.
func RequestID(vmi *kvv1.VirtualMachineInstance) string {
	return "evacuation-" + string(vmi.UID) + "-" + vmi.Status.EvacuationNodeName
}

// wants reports whether vmi is marked for evacuation with strategy
// External (its own, else the cluster's).
func wants(vmi *kvv1.VirtualMachineInstance, cluster string) bool {
	strategy := cluster
	if vmi.Spec.EvictionStrategy != nil && *vmi.Spec.EvictionStrategy != "" {
		strategy = string(*vmi.Spec.EvictionStrategy)
	}
	return strategy == string(kvv1.EvictionStrategyExternal) && vmi.Status.EvacuationNodeName != "" &&
		vmi.Status.NodeName == vmi.Status.EvacuationNodeName && vmi.Status.Phase == kvv1.Running && vmi.DeletionTimestamp == nil
}

// Start watches VMIs (and the KubeVirt CR for the cluster's default eviction
// strategy) until ctx ends.
func (w *Watcher) Start(ctx context.Context) error {
	lw := func(list func(context.Context, metav1.ListOptions) (runtime.Object, error), wf func(context.Context, metav1.ListOptions) (watch.Interface, error)) *cache.ListWatch {
		return &cache.ListWatch{ListWithContextFunc: list, WatchFuncWithContext: wf}
	}
	vmis := cache.NewSharedIndexInformer(lw(
		func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return w.KubeVirt.VirtualMachineInstances("").List(ctx, o)
		}, w.KubeVirt.VirtualMachineInstances("").Watch), &kvv1.VirtualMachineInstance{}, 0, cache.Indexers{})
	kvs := cache.NewSharedIndexInformer(lw(
		func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return w.KubeVirt.KubeVirts("").List(ctx, o)
		},
		w.KubeVirt.KubeVirts("").Watch), &kvv1.KubeVirt{}, 0, cache.Indexers{})
	q := workqueue.NewTypedRateLimitingQueueWithConfig(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](500*time.Millisecond, time.Minute),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "evacuation"})
	defer q.ShutDown()
	enqueue := func(obj any) {
		if key, err := cache.MetaNamespaceKeyFunc(obj); err == nil {
			q.Add(key)
		}
	}
	if _, err := vmis.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: enqueue, UpdateFunc: func(_, n any) { enqueue(n) }}); err != nil {
		return err
	}
	if _, err := kvs.AddEventHandler(cache.ResourceEventHandlerFuncs{UpdateFunc: func(_, _ any) {
		for _, k := range vmis.GetStore().ListKeys() {
			q.Add(k)
		}
	}}); err != nil {
		return err
	}
	go vmis.RunWithContext(ctx)
	go kvs.RunWithContext(ctx)
	if !cache.WaitForCacheSync(ctx.Done(), vmis.HasSynced, kvs.HasSynced) {
		return nil
	}
	clusterStrategy := func() string {
		objs := kvs.GetStore().List()
		sort.Slice(objs, func(i, j int) bool {
			return objs[i].(*kvv1.KubeVirt).Namespace+"/"+objs[i].(*kvv1.KubeVirt).Name < objs[j].(*kvv1.KubeVirt).Namespace+"/"+objs[j].(*kvv1.KubeVirt).Name
		})
		if len(objs) > 0 {
			if s := objs[0].(*kvv1.KubeVirt).Spec.Configuration.EvictionStrategy; s != nil {
				return string(*s)
			}
		}
		return ""
	}
	go func() { <-ctx.Done(); q.ShutDown() }()
	for {
		key, quit := q.Get()
		if quit {
			return nil
		}
		obj, ok, _ := vmis.GetStore().GetByKey(key)
		var err error
		if ok {
			if vmi := obj.(*kvv1.VirtualMachineInstance); wants(vmi, clusterStrategy()) {
				err = w.publish(ctx, vmi)
			}
		}
		if err != nil && ctx.Err() == nil {
			w.Log.Warn().Err(err).Str("vmi", key).Msg("could not publish the migration of an External evacuation; retrying")
			q.AddRateLimited(key)
		} else {
			q.Forget(key)
		}
		q.Done(key)
	}
}

func (w *Watcher) publish(ctx context.Context, vmi *kvv1.VirtualMachineInstance) error {
	id := RequestID(vmi)
	e, err := schemas.New(Source, schemas.DeterministicID(Source, id), &schemas.VMMigrateRequested{
		Namespace: vmi.Namespace, Name: vmi.Name, RequestID: id})
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	res, err := w.Publisher.Publish(cctx, e)
	if err != nil {
		return fmt.Errorf("publish migration of %s/%s: %w", vmi.Namespace, vmi.Name, err)
	}
	if !res.Duplicate {
		w.Log.Info().Str("vmi", vmi.Namespace+"/"+vmi.Name).Str("node", vmi.Status.EvacuationNodeName).
			Msg("External evacuation: migration requested")
	}
	return nil
}
