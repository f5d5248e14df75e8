package sim

import (
	"context"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/util/retry"
	kvv1 "kubevirt.io/api/core/v1"
)

type kvObj[T any] interface {
	*T
	runtime.Object
	metav1.Object
}

// kvMutate reads the current object from the API (as virt-controller, see kubeVirtConfig),
// lets mutate change it and,
// when it reports a change, writes it back (to the status subresource when
// status is set), retrying on conflicts. A missing object is not an error:
// it returns (nil, nil).
//
// The first attempt starts from cached (the informer's copy, may be nil),
// which saves a read when nothing changes; a conflict means it was stale,
// and the next attempts read the API.
func kvMutate[T any, P kvObj[T]](ctx context.Context, s *Simulator, resource, ns, name string, status bool, cached P, mutate func(P) bool) (P, error) {
	rc := s.kv.RESTClient()
	var out P
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur := P(new(T))
		if cached != nil {
			cur = cached.DeepCopyObject().(P)
			cached = nil
		} else if err := rc.Get().Namespace(ns).Resource(resource).Name(name).Do(ctx).Into(cur); err != nil {
			return err
		}
		if !mutate(cur) {
			out = cur
			return nil
		}
		req := rc.Put().Namespace(ns).Resource(resource).Name(name)
		if status {
			req = req.SubResource("status")
		}
		res := P(new(T))
		if err := req.Body(cur).Do(ctx).Into(res); err != nil {
			return err
		}
		out = res
		return nil
	})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	return out, err
}

// mutateVMI changes a VMI's metadata, spec or status with a plain update, as virt-controller
// and virt-handler do: KubeVirt registers no status subresource for VMIs
// (pkg/virt-operator/resource/generate/components/crds.go), so every write passes virt-api's
// VMI update webhook.
func (s *Simulator) mutateVMI(ctx context.Context, ns, name string, f func(*kvv1.VirtualMachineInstance) bool) (*kvv1.VirtualMachineInstance, error) {
	return kvMutate[kvv1.VirtualMachineInstance](ctx, s, resVMI, ns, name, false, s.getVMI(ns+"/"+name), f)
}

func (s *Simulator) mutateVM(ctx context.Context, ns, name string, status bool, f func(*kvv1.VirtualMachine) bool) (*kvv1.VirtualMachine, error) {
	return kvMutate[kvv1.VirtualMachine](ctx, s, resVM, ns, name, status, s.getVM(ns+"/"+name), f)
}

func (s *Simulator) mutateVMIM(ctx context.Context, ns, name string, status bool, f func(*kvv1.VirtualMachineInstanceMigration) bool) (*kvv1.VirtualMachineInstanceMigration, error) {
	return kvMutate[kvv1.VirtualMachineInstanceMigration](ctx, s, resVMIM, ns, name, status, s.getVMIM(ns+"/"+name), f)
}

func hasFinalizer(m metav1.Object, f string) bool {
	for _, x := range m.GetFinalizers() {
		if x == f {
			return true
		}
	}
	return false
}

func addFinalizer(m metav1.Object, f string) bool {
	if hasFinalizer(m, f) {
		return false
	}
	m.SetFinalizers(append(m.GetFinalizers(), f))
	return true
}

func removeFinalizer(m metav1.Object, f string) bool {
	var out []string
	found := false
	for _, x := range m.GetFinalizers() {
		if x == f {
			found = true
			continue
		}
		out = append(out, x)
	}
	if found {
		m.SetFinalizers(out)
	}
	return found
}
