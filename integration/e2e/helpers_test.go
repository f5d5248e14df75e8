package e2e

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/platform"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

func eventually(t *testing.T, e *Env, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	require.NoError(t, e.Poll(context.Background(), timeout, what, cond))
}

// sampler watches the migrations of the cluster while a test runs: the
// most unfinished at once (in the cluster, per source node), every
// migration object drover created per VM, and whether a condition held at
// every sample.
type sampler struct {
	e      *Env
	stop   context.CancelFunc
	done   chan struct{}
	mu     sync.Mutex
	maxAll int
	maxOut map[string]int
	// created: VM -> drover migration objects (by name) seen.
	created map[string]map[string]bool
	// broken records the first sample at which check failed.
	broken string
	check  func(ctx context.Context) string
}

func startSampler(t *testing.T, e *Env, check func(ctx context.Context) string) *sampler {
	ctx, cancel := context.WithCancel(context.Background())
	s := &sampler{e: e, stop: cancel, done: make(chan struct{}), maxOut: map[string]int{}, created: map[string]map[string]bool{}, check: check}
	go func() {
		defer close(s.done)
		for ctx.Err() == nil {
			s.sample(ctx)
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(s.Stop)
	return s
}

func (s *sampler) sample(ctx context.Context) {
	migs, err := s.e.KubeVirt.VirtualMachineInstanceMigrations("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return
	}
	all, out := 0, map[string]int{}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range migs.Items {
		if m.Labels[platform.LabelManagedBy] == platform.ManagedBy {
			key := m.Namespace + "/" + m.Spec.VMIName
			if s.created[key] == nil {
				s.created[key] = map[string]bool{}
			}
			s.created[key][m.Name+" "+m.Labels[platform.LabelOperation]] = true
		}
		if m.Status.Phase == kvv1.MigrationSucceeded || m.Status.Phase == kvv1.MigrationFailed {
			continue
		}
		all++
		if vmi := s.e.VMI(ctx, m.Namespace, m.Spec.VMIName); vmi != nil {
			src := vmi.Status.NodeName
			if st := vmi.Status.MigrationState; st != nil && st.SourceNode != "" && !st.Completed {
				src = st.SourceNode
			}
			out[src]++
		}
	}
	s.maxAll = max(s.maxAll, all)
	for n, c := range out {
		s.maxOut[n] = max(s.maxOut[n], c)
	}
	if s.check != nil && s.broken == "" {
		if why := s.check(ctx); why != "" {
			s.broken = time.Now().Format("15:04:05.000") + ": " + why
		}
	}
}

func (s *sampler) Stop() {
	s.stop()
	<-s.done
}

// requestsInStream counts the messages still in the DROVER stream: a work
// queue, so an acknowledged request is gone.
func requestsInStream(ctx context.Context, e *Env, subjectFilter string) int {
	st, err := e.JS.Stream(ctx, consumers.StreamRequests)
	if err != nil {
		return -1
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(subjectFilter))
	if err != nil {
		return -1
	}
	n := 0
	for subj, c := range info.State.Subjects {
		if strings.HasPrefix(subj, strings.TrimSuffix(subjectFilter, ">")) {
			n += int(c)
		}
	}
	return n
}

func waitOp(t *testing.T, e *Env, key string, timeout time.Duration, states ...consumers.State) consumers.Record {
	t.Helper()
	var rec consumers.Record
	eventually(t, e, timeout, "operation "+key+" in "+strings.Join(stateNames(states), "|"), func() (bool, string) {
		r, ok := e.Op(context.Background(), key)
		if !ok {
			return false, "no record"
		}
		rec = r
		for _, s := range states {
			if r.State == s {
				return true, ""
			}
		}
		return false, string(r.State) + " " + r.Message + " " + r.LastError
	})
	return rec
}

func stateNames(states []consumers.State) []string {
	out := make([]string, len(states))
	for i, s := range states {
		out[i] = string(s)
	}
	return out
}

var (
	metav1GetOptions  = metav1.GetOptions{}
	metav1ListOptions = metav1.ListOptions{}
)

// waitMidEvacuation waits until at least one of the VMs has left node and
// exactly one is migrating from it: the middle of an evacuation.
func waitMidEvacuation(t *testing.T, e *Env, node string, names ...string) {
	t.Helper()
	ctx := context.Background()
	eventually(t, e, 2*time.Minute, "one VM moved, the next migrating", func() (bool, string) {
		moved, migrating := 0, 0
		for _, name := range names {
			v := e.VMI(ctx, "default", name)
			if v == nil {
				continue
			}
			if v.Status.NodeName != node {
				moved++
			} else if st := v.Status.MigrationState; st != nil && !st.Completed {
				migrating++
			}
		}
		return moved >= 1 && migrating == 1, fmt.Sprintf("moved %d migrating %d", moved, migrating)
	})
}
