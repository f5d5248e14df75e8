package crds

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apiextensionsclient "k8s.io/apiextensions-apiserver/pkg/client/clientset/clientset"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/yaml"
)

//go:embed *.yaml
var files embed.FS

// DefaultTimeout bounds Install when the caller's context has no deadline.
const DefaultTimeout = time.Minute

// Objects returns the CustomResourceDefinitions, freshly decoded (callers may modify them), in a
// stable order (by file name). An error means an embedded file is not a valid CRD manifest.
func Objects() ([]*apiextensionsv1.CustomResourceDefinition, error) {
	names, err := fs.Glob(files, "*.yaml")
	if err != nil {
		return nil, fmt.Errorf("list embedded CRDs: %w", err)
	}
	sort.Strings(names)
	out := make([]*apiextensionsv1.CustomResourceDefinition, 0, len(names))
	for _, name := range names {
		data, err := files.ReadFile(name)
		if err != nil {
			return nil, fmt.Errorf("read embedded CRD %s: %w", name, err)
		}
		crd := &apiextensionsv1.CustomResourceDefinition{}
		if err := yaml.UnmarshalStrict(data, crd); err != nil {
			return nil, fmt.Errorf("decode embedded CRD %s: %w", name, err)
		}
		if crd.Kind != "CustomResourceDefinition" || crd.Name == "" {
			return nil, fmt.Errorf("decode embedded CRD %s: not a named CustomResourceDefinition", name)
		}
		out = append(out, crd)
	}
	return out, nil
}

// Install creates the CRDs, or updates them to the embedded version when they already exist, and
// waits until the API server serves every one of them (conditions NamesAccepted and Established).
// It is idempotent and safe to call while other clients use the CRDs. The wait is bounded by ctx,
// or by DefaultTimeout when ctx has no deadline; a CRD that is not established in time is named
// in the returned error.
func Install(ctx context.Context, cfg *rest.Config) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, DefaultTimeout)
		defer cancel()
	}
	objs, err := Objects()
	if err != nil {
		return err
	}
	client, err := apiextensionsclient.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("install CRDs: client: %w", err)
	}
	crdClient := client.ApiextensionsV1().CustomResourceDefinitions()
	for _, want := range objs {
		if err := apply(ctx, crdClient, want); err != nil {
			return fmt.Errorf("install CRD %s: %w", want.Name, err)
		}
	}
	for _, want := range objs {
		if err := waitEstablished(ctx, crdClient, want.Name); err != nil {
			return fmt.Errorf("install CRD %s: wait until established: %w", want.Name, err)
		}
	}
	return nil
}

type crdInterface interface {
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*apiextensionsv1.CustomResourceDefinition, error)
	Create(ctx context.Context, crd *apiextensionsv1.CustomResourceDefinition, opts metav1.CreateOptions) (*apiextensionsv1.CustomResourceDefinition, error)
	Update(ctx context.Context, crd *apiextensionsv1.CustomResourceDefinition, opts metav1.UpdateOptions) (*apiextensionsv1.CustomResourceDefinition, error)
}

// apply creates want or overwrites the spec and labels of the existing CRD with it.
func apply(ctx context.Context, c crdInterface, want *apiextensionsv1.CustomResourceDefinition) error {
	return retry.OnError(retry.DefaultRetry, func(err error) bool {
		// Conflict: someone updated it between our get and update. AlreadyExists: someone created
		// it between our get and create. Both are settled by another round.
		return apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err)
	}, func() error {
		have, err := c.Get(ctx, want.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			_, err = c.Create(ctx, want.DeepCopy(), metav1.CreateOptions{})
			return err
		}
		if err != nil {
			return err
		}
		upd := have.DeepCopy()
		upd.Spec = *want.Spec.DeepCopy()
		if upd.Labels == nil {
			upd.Labels = map[string]string{}
		}
		for k, v := range want.Labels {
			upd.Labels[k] = v
		}
		_, err = c.Update(ctx, upd, metav1.UpdateOptions{})
		return err
	})
}

// waitEstablished polls until the CRD named name is Established with its names accepted.
func waitEstablished(ctx context.Context, c crdInterface, name string) error {
	var last string
	err := wait.PollUntilContextCancel(ctx, 50*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		crd, err := c.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			if ctx.Err() != nil {
				return false, ctx.Err()
			}
			last = err.Error()
			return false, nil // transient; keep polling until ctx ends
		}
		established, accepted := false, false
		for _, cond := range crd.Status.Conditions {
			switch {
			case cond.Type == apiextensionsv1.Established && cond.Status == apiextensionsv1.ConditionTrue:
				established = true
			case cond.Type == apiextensionsv1.NamesAccepted && cond.Status == apiextensionsv1.ConditionTrue:
				accepted = true
			case cond.Type == apiextensionsv1.NamesAccepted && cond.Status == apiextensionsv1.ConditionFalse:
				return false, fmt.Errorf("names not accepted: %s: %s", cond.Reason, cond.Message)
			}
		}
		last = fmt.Sprintf("established=%t namesAccepted=%t", established, accepted)
		return established && accepted, nil
	})
	if err != nil && last != "" && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)) {
		return fmt.Errorf("%w (last seen: %s)", err, last)
	}
	return err
}
