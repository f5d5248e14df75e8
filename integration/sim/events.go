package sim

import (
	"context"
	"fmt"
	"sync"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var eventsSent sync.Map // uid/reason/message -> struct{}

// eventOnce records a core Event about obj, once per object, reason and
// message, as the real controllers' recorders (with their aggregation) do.
func (s *Simulator) eventOnce(ctx context.Context, obj runtime.Object, typ, reason, msg string) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return
	}
	k := fmt.Sprintf("%s/%s/%s", m.GetUID(), reason, msg)
	if _, loaded := eventsSent.LoadOrStore(k, struct{}{}); loaded {
		return
	}
	s.event(ctx, obj, typ, reason, msg)
}

// event records a core Event about obj.
func (s *Simulator) event(ctx context.Context, obj runtime.Object, typ, reason, msg string) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return
	}
	gvk := obj.GetObjectKind().GroupVersionKind()
	if gvk.Empty() {
		gvk = kindOf(obj)
	}
	now := metav1.NewTime(s.clock.Now())
	ns := m.GetNamespace()
	if ns == "" {
		ns = metav1.NamespaceDefault
	}
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{GenerateName: m.GetName() + ".", Namespace: ns},
		InvolvedObject: corev1.ObjectReference{
			APIVersion: gvk.GroupVersion().String(), Kind: gvk.Kind,
			Namespace: m.GetNamespace(), Name: m.GetName(), UID: m.GetUID(), ResourceVersion: m.GetResourceVersion(),
		},
		Reason: reason, Message: msg, Type: typ,
		Source:         corev1.EventSource{Component: "drover-sim"},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
	}
	if _, err := s.Kube.CoreV1().Events(ns).Create(ctx, ev, metav1.CreateOptions{}); err != nil && ctx.Err() == nil {
		s.log.Debug().Err(err).Str("reason", reason).Msg("record event")
	}
}

func kindOf(obj runtime.Object) schema.GroupVersionKind {
	switch obj.(type) {
	case *corev1.Pod:
		return corev1.SchemeGroupVersion.WithKind("Pod")
	case *corev1.Node:
		return corev1.SchemeGroupVersion.WithKind("Node")
	}
	return schema.GroupVersionKind{}
}
