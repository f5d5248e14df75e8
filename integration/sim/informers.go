package sim

import (
	"context"
	"fmt"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/tools/cache"
	kvv1 "kubevirt.io/api/core/v1"
)

// Index names.
const (
	byNode    = "node"    // pods by spec.nodeName
	byVMI     = "vmi"     // launcher pods by namespace/VMI name; VMIMs by namespace/spec.vmiName
	byClaim   = "claim"   // pods by namespace/PVC name
	byVANode  = "vanode"  // VolumeAttachments by spec.nodeName
	byVAPV    = "vapv"    // VolumeAttachments by PV name
	byVMINode = "vminode" // VMIs by status.nodeName
)

func (s *Simulator) setupInformers() {
	s.kubeInformers = informers.NewSharedInformerFactory(s.Kube, 0)
	s.leaseInformers = informers.NewSharedInformerFactoryWithOptions(s.Kube, 0, informers.WithNamespace(corev1.NamespaceNodeLease))
	s.dynInformers = dynamicinformer.NewDynamicSharedInformerFactory(s.Dynamic, 0)

	s.nodeInformer = s.kubeInformers.Core().V1().Nodes().Informer()
	s.podInformer = s.kubeInformers.Core().V1().Pods().Informer()
	s.pvcInformer = s.kubeInformers.Core().V1().PersistentVolumeClaims().Informer()
	s.pvInformer = s.kubeInformers.Core().V1().PersistentVolumes().Informer()
	s.vaInformer = s.kubeInformers.Storage().V1().VolumeAttachments().Informer()
	s.leaseInformer = s.leaseInformers.Coordination().V1().Leases().Informer()
	s.dvmInformer = s.dynInformers.ForResource(DeckhouseVMGVR).Informer()
	s.vmopInformer = s.dynInformers.ForResource(DeckhouseVMOPGVR).Informer()

	rc := s.KubeVirt.RESTClient()
	newInf := func(resource string, obj runtime.Object, list func() runtime.Object) cache.SharedIndexInformer {
		lw := &cache.ListWatch{
			ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
				out := list()
				err := rc.Get().Resource(resource).VersionedParams(&o, metav1.ParameterCodec).Do(ctx).Into(out)
				return out, err
			},
			WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
				o.Watch = true
				return rc.Get().Resource(resource).VersionedParams(&o, metav1.ParameterCodec).Watch(ctx)
			},
		}
		return cache.NewSharedIndexInformer(lw, obj, 0, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	}
	s.vmInformer = newInf(resVM, &kvv1.VirtualMachine{}, func() runtime.Object { return &kvv1.VirtualMachineList{} })
	s.vmiInformer = newInf(resVMI, &kvv1.VirtualMachineInstance{}, func() runtime.Object { return &kvv1.VirtualMachineInstanceList{} })
	s.vmimInformer = newInf(resVMIM, &kvv1.VirtualMachineInstanceMigration{}, func() runtime.Object { return &kvv1.VirtualMachineInstanceMigrationList{} })
	s.kvInformer = newInf(resKV, &kvv1.KubeVirt{}, func() runtime.Object { return &kvv1.KubeVirtList{} })

	must := func(err error) {
		if err != nil {
			panic(fmt.Sprintf("sim: add indexers: %v", err))
		}
	}
	must(s.podInformer.AddIndexers(cache.Indexers{
		byNode: func(obj interface{}) ([]string, error) {
			p := obj.(*corev1.Pod)
			if p.Spec.NodeName == "" {
				return nil, nil
			}
			return []string{p.Spec.NodeName}, nil
		},
		byVMI: func(obj interface{}) ([]string, error) {
			p := obj.(*corev1.Pod)
			if p.Labels[kvv1.AppLabel] != launcherLabelValue {
				return nil, nil
			}
			return []string{p.Namespace + "/" + p.Annotations[kvv1.DomainAnnotation]}, nil
		},
		byClaim: func(obj interface{}) ([]string, error) {
			p := obj.(*corev1.Pod)
			var out []string
			for _, v := range p.Spec.Volumes {
				if v.PersistentVolumeClaim != nil {
					out = append(out, p.Namespace+"/"+v.PersistentVolumeClaim.ClaimName)
				}
			}
			return out, nil
		},
	}))
	must(s.vaInformer.AddIndexers(cache.Indexers{
		byVANode: func(obj interface{}) ([]string, error) {
			return []string{obj.(*storagev1.VolumeAttachment).Spec.NodeName}, nil
		},
		byVAPV: func(obj interface{}) ([]string, error) {
			va := obj.(*storagev1.VolumeAttachment)
			if va.Spec.Source.PersistentVolumeName == nil {
				return nil, nil
			}
			return []string{*va.Spec.Source.PersistentVolumeName}, nil
		},
	}))
	must(s.vmimInformer.AddIndexers(cache.Indexers{
		byVMI: func(obj interface{}) ([]string, error) {
			m := obj.(*kvv1.VirtualMachineInstanceMigration)
			return []string{m.Namespace + "/" + m.Spec.VMIName}, nil
		},
	}))
	must(s.vmiInformer.AddIndexers(cache.Indexers{
		byVMINode: func(obj interface{}) ([]string, error) {
			v := obj.(*kvv1.VirtualMachineInstance)
			if v.Status.NodeName == "" {
				return nil, nil
			}
			return []string{v.Status.NodeName}, nil
		},
	}))

	s.addHandlers()
}

// syncedFuncs lists every informer Run waits for.
func (s *Simulator) syncedFuncs() []cache.InformerSynced {
	var out []cache.InformerSynced
	for _, inf := range []cache.SharedIndexInformer{
		s.nodeInformer, s.podInformer, s.pvcInformer, s.pvInformer, s.vaInformer, s.leaseInformer, s.dvmInformer, s.vmopInformer,
		s.vmInformer, s.vmiInformer, s.vmimInformer, s.kvInformer,
	} {
		out = append(out, inf.HasSynced)
	}
	return out
}

func handler(f func(obj interface{})) cache.ResourceEventHandlerFuncs {
	return cache.ResourceEventHandlerFuncs{
		AddFunc:    f,
		UpdateFunc: func(_, obj interface{}) { f(obj) },
		DeleteFunc: func(obj interface{}) {
			if d, ok := obj.(cache.DeletedFinalStateUnknown); ok {
				obj = d.Obj
			}
			f(obj)
		},
	}
}

func keyOf(obj metav1.Object) string {
	if obj.GetNamespace() == "" {
		return obj.GetName()
	}
	return obj.GetNamespace() + "/" + obj.GetName()
}

func (s *Simulator) addHandlers() {
	nodeHandler := handler(func(obj interface{}) {
		n, ok := obj.(*corev1.Node)
		if !ok {
			return
		}
		s.nodeQueue.Add(n.Name)
		s.kubeletQueue.Add(n.Name)
		s.scheduler.nodesChanged(s)
		s.volumeQueue.Add(volumeNodeKey(n.Name))
		s.enqueueMigrationsAll()
		s.controlPlaneQueue.Add(controlPlaneKey)
	})
	nodeUpdate := nodeHandler.UpdateFunc
	nodeHandler.UpdateFunc = func(old, cur interface{}) {
		if o, ok := old.(*corev1.Node); ok {
			if n, ok := cur.(*corev1.Node); ok && heartbeatOnly(o, n) {
				return // virt-handler's heartbeat: nothing any controller here decides on
			}
		}
		nodeUpdate(old, cur)
	}
	_, _ = s.nodeInformer.AddEventHandler(nodeHandler)
	_, _ = s.leaseInformer.AddEventHandler(handler(func(obj interface{}) {}))
	_, _ = s.podInformer.AddEventHandler(handler(func(obj interface{}) {
		p, ok := obj.(*corev1.Pod)
		if !ok {
			return
		}
		if p.Spec.NodeName != "" {
			s.kubeletQueue.Add(p.Spec.NodeName)
			s.volumeQueue.Add(volumeNodeKey(p.Spec.NodeName))
		} else {
			s.schedulerQueue.Add(keyOf(p))
		}
		if p.DeletionTimestamp != nil || isTerminal(p) || !s.podExists(p) {
			// freed capacity
			s.scheduler.nodesChanged(s)
		}
		if p.Namespace == s.opts.KubeVirtNamespace && p.Labels[kvv1.AppLabel] != "" {
			s.controlPlaneQueue.Add(controlPlaneKey)
		}
		if p.Labels[kvv1.AppLabel] == launcherLabelValue {
			if vmi := p.Annotations[kvv1.DomainAnnotation]; vmi != "" {
				s.vmiQueue.Add(p.Namespace + "/" + vmi)
			}
			if uid := p.Labels[kvv1.MigrationJobLabel]; uid != "" {
				s.enqueueMigrationsForVMI(p.Namespace, p.Annotations[kvv1.DomainAnnotation])
			}
		}
	}))
	_, _ = s.pvcInformer.AddEventHandler(handler(func(obj interface{}) {
		if pvc, ok := obj.(*corev1.PersistentVolumeClaim); ok {
			s.volumeQueue.Add(volumeClaimKey(pvc.Namespace, pvc.Name))
			if pvc.Spec.VolumeName != "" { // bound: the pods waiting for it can attach it
				for _, p := range s.podsBy(byClaim, keyOf(pvc)) {
					if p.Spec.NodeName != "" {
						s.volumeQueue.Add(volumeNodeKey(p.Spec.NodeName))
					}
				}
			}
		}
	}))
	_, _ = s.pvInformer.AddEventHandler(handler(func(obj interface{}) {}))
	_, _ = s.vaInformer.AddEventHandler(handler(func(obj interface{}) {
		if va, ok := obj.(*storagev1.VolumeAttachment); ok {
			s.kubeletQueue.Add(va.Spec.NodeName)
			s.volumeQueue.Add(volumeNodeKey(va.Spec.NodeName))
			// a detach may unblock the pods of the volume on other nodes
			if pv := va.Spec.Source.PersistentVolumeName; pv != nil {
				for _, n := range s.nodesUsingPV(*pv) {
					s.kubeletQueue.Add(n)
					s.volumeQueue.Add(volumeNodeKey(n))
				}
			}
		}
	}))
	_, _ = s.vmInformer.AddEventHandler(handler(func(obj interface{}) {
		if vm, ok := obj.(*kvv1.VirtualMachine); ok {
			s.vmQueue.Add(keyOf(vm))
		}
	}))
	_, _ = s.vmiInformer.AddEventHandler(handler(func(obj interface{}) {
		vmi, ok := obj.(*kvv1.VirtualMachineInstance)
		if !ok {
			return
		}
		s.vmiQueue.Add(keyOf(vmi))
		if ref := metav1.GetControllerOf(vmi); ref != nil {
			switch ref.APIVersion {
			case kvv1.SchemeGroupVersion.String():
				s.vmQueue.Add(keyOf(vmi))
			case DeckhouseVMGVR.GroupVersion().String():
				s.dvmQueue.Add(keyOf(vmi))
			}
		}
		s.enqueueMigrationsForVMI(vmi.Namespace, vmi.Name)
	}))
	_, _ = s.vmimInformer.AddEventHandler(handler(func(obj interface{}) {
		if m, ok := obj.(*kvv1.VirtualMachineInstanceMigration); ok {
			s.migrationQueue.Add(keyOf(m))
			if isMigrationFinal(m) || m.DeletionTimestamp != nil {
				s.enqueueMigrationsAll()
			}
		}
	}))
	_, _ = s.kvInformer.AddEventHandler(handler(func(obj interface{}) { s.enqueueMigrationsAll() }))
	_, _ = s.dvmInformer.AddEventHandler(handler(func(obj interface{}) {
		if u, ok := obj.(*unstructured.Unstructured); ok {
			s.dvmQueue.Add(keyOf(u))
		}
	}))
}

// heartbeatOnly reports a node update that changed only virt-handler's
// kubevirt.io/heartbeat annotation (every node, every minute of simulated time).
func heartbeatOnly(old, cur *corev1.Node) bool {
	if old.Annotations[kvv1.VirtHandlerHeartbeat] == cur.Annotations[kvv1.VirtHandlerHeartbeat] {
		return false
	}
	strip := func(n *corev1.Node) *corev1.Node {
		c := n.DeepCopy()
		delete(c.Annotations, kvv1.VirtHandlerHeartbeat)
		c.ResourceVersion, c.ManagedFields = "", nil
		return c
	}
	return equality.Semantic.DeepEqual(strip(old), strip(cur))
}

// podExists reports whether the pod cache still holds p.
func (s *Simulator) podExists(p *corev1.Pod) bool {
	_, ok, _ := s.podInformer.GetIndexer().GetByKey(keyOf(p))
	return ok
}

func (s *Simulator) nodeNames() []string {
	var out []string
	for _, obj := range s.nodeInformer.GetStore().List() {
		out = append(out, obj.(*corev1.Node).Name)
	}
	return out
}

func (s *Simulator) getNode(name string) *corev1.Node {
	obj, ok, _ := s.nodeInformer.GetStore().GetByKey(name)
	if !ok {
		return nil
	}
	return obj.(*corev1.Node)
}

func (s *Simulator) getLease(name string) *coordinationv1.Lease {
	obj, ok, _ := s.leaseInformer.GetStore().GetByKey(corev1.NamespaceNodeLease + "/" + name)
	if !ok {
		return nil
	}
	return obj.(*coordinationv1.Lease)
}

func (s *Simulator) getPod(key string) *corev1.Pod {
	obj, ok, _ := s.podInformer.GetIndexer().GetByKey(key)
	if !ok {
		return nil
	}
	return obj.(*corev1.Pod)
}

func (s *Simulator) podsBy(index, value string) []*corev1.Pod {
	objs, _ := s.podInformer.GetIndexer().ByIndex(index, value)
	out := make([]*corev1.Pod, 0, len(objs))
	for _, o := range objs {
		out = append(out, o.(*corev1.Pod))
	}
	return out
}

func (s *Simulator) getPVC(ns, name string) *corev1.PersistentVolumeClaim {
	obj, ok, _ := s.pvcInformer.GetStore().GetByKey(ns + "/" + name)
	if !ok {
		return nil
	}
	return obj.(*corev1.PersistentVolumeClaim)
}

func (s *Simulator) getPV(name string) *corev1.PersistentVolume {
	obj, ok, _ := s.pvInformer.GetStore().GetByKey(name)
	if !ok {
		return nil
	}
	return obj.(*corev1.PersistentVolume)
}

func (s *Simulator) getVM(key string) *kvv1.VirtualMachine {
	obj, ok, _ := s.vmInformer.GetStore().GetByKey(key)
	if !ok {
		return nil
	}
	return obj.(*kvv1.VirtualMachine)
}

func (s *Simulator) getVMI(key string) *kvv1.VirtualMachineInstance {
	obj, ok, _ := s.vmiInformer.GetStore().GetByKey(key)
	if !ok {
		return nil
	}
	return obj.(*kvv1.VirtualMachineInstance)
}

func (s *Simulator) getVMIM(key string) *kvv1.VirtualMachineInstanceMigration {
	obj, ok, _ := s.vmimInformer.GetStore().GetByKey(key)
	if !ok {
		return nil
	}
	return obj.(*kvv1.VirtualMachineInstanceMigration)
}

func (s *Simulator) getDVM(key string) *unstructured.Unstructured {
	obj, ok, _ := s.dvmInformer.GetStore().GetByKey(key)
	if !ok {
		return nil
	}
	return obj.(*unstructured.Unstructured)
}

func (s *Simulator) migrationsForVMI(ns, vmi string) []*kvv1.VirtualMachineInstanceMigration {
	objs, _ := s.vmimInformer.GetIndexer().ByIndex(byVMI, ns+"/"+vmi)
	out := make([]*kvv1.VirtualMachineInstanceMigration, 0, len(objs))
	for _, o := range objs {
		out = append(out, o.(*kvv1.VirtualMachineInstanceMigration))
	}
	return out
}

func (s *Simulator) enqueueMigrationsForVMI(ns, vmi string) {
	for _, m := range s.migrationsForVMI(ns, vmi) {
		s.migrationQueue.Add(keyOf(m))
	}
}

// enqueueMigrationsAll queues the migrations under way and those being deleted. Pending ones
// are left to their own schedule (see admitMigration).
func (s *Simulator) enqueueMigrationsAll() {
	for _, o := range s.vmimInformer.GetStore().List() {
		m := o.(*kvv1.VirtualMachineInstanceMigration)
		if (!isMigrationFinal(m) && m.Status.Phase != kvv1.MigrationPending) || m.DeletionTimestamp != nil {
			s.migrationQueue.Add(keyOf(m))
		}
	}
}
