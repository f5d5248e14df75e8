package sim

import (
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/drover-io/drover/integration/cluster"
)

// TestSteadyClusterIsNotPolled: once a seeded cluster is steady, the simulator's controllers
// read their informers; none of them lists objects from the API server pass after pass (the
// evacuation and vmop controllers used to list every VMI, migration, node, pod and operation
// each second and on every watch event).
func TestSteadyClusterIsNotPolled(t *testing.T) {
	t.Parallel()
	c := cluster.StartT(t)
	var mu sync.Mutex
	var lists []string
	cfg := rest.CopyConfig(c.Config)
	cfg.Wrap(func(rt http.RoundTripper) http.RoundTripper {
		return roundTripperFunc(func(req *http.Request) (*http.Response, error) {
			if req.Method == http.MethodGet && req.URL.Query().Get("watch") != "true" && isCollectionPath(req.URL.Path) {
				mu.Lock()
				lists = append(lists, req.URL.Path)
				mu.Unlock()
			}
			return rt.RoundTrip(req)
		})
	})
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	s := runSim(t, &cluster.Cluster{Config: cfg}, Options{TimeScale: 10, Logger: &log})
	res, err := s.Seed(ctxT(t), SeedOptions{Nodes: 3, VMs: 5})
	require.NoError(t, err)
	for _, name := range res.VMs {
		vmiRunning(t, s, name, 60*time.Second)
	}
	time.Sleep(2 * time.Second) // the start-up's last writes settle; not what is measured
	mu.Lock()
	lists = nil
	mu.Unlock()
	window := 3 * time.Second // 30 s of simulated time: heartbeats, resyncs, monitors
	time.Sleep(window)
	mu.Lock()
	defer mu.Unlock()
	require.Empty(t, lists, "LIST requests in %s of a steady cluster", window)
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// isCollectionPath reports a request path that names a collection (a LIST), not one object:
// /api/v1/[namespaces/NS/]RESOURCE or /apis/GROUP/VERSION/[namespaces/NS/]RESOURCE.
func isCollectionPath(path string) bool {
	seg := strings.Split(strings.Trim(path, "/"), "/")
	switch {
	case len(seg) >= 2 && seg[0] == "api":
		seg = seg[2:]
	case len(seg) >= 3 && seg[0] == "apis":
		seg = seg[3:]
	default:
		return false // discovery
	}
	if len(seg) >= 2 && seg[0] == "namespaces" {
		seg = seg[2:]
		if len(seg) == 0 {
			return false // GET of a namespace
		}
	}
	return len(seg) == 1
}

func TestIsCollectionPath(t *testing.T) {
	for path, want := range map[string]bool{
		"/api/v1/pods":                                                    true,
		"/api/v1/namespaces/default/pods":                                 true,
		"/api/v1/namespaces/default/pods/p-1":                             false,
		"/api/v1/namespaces/default":                                      false,
		"/api/v1/namespaces":                                              true,
		"/apis/kubevirt.io/v1/virtualmachineinstances":                    true,
		"/apis/kubevirt.io/v1/namespaces/ns/virtualmachineinstances/vm-1": false,
		"/apis/kubevirt.io/v1":                                            false,
		"/api":                                                            false,
	} {
		require.Equal(t, want, isCollectionPath(path), path)
	}
}

// TestNodeUsageFollowsThePodCache: the scheduler's per-node usage, kept from pod events, is
// what counting every pod gives, through binds, terminations and deletions, with the pods it
// bound that the cache does not show yet.
func TestNodeUsageFollowsThePodCache(t *testing.T) {
	s := &Simulator{scheduler: newSchedulerState()}
	store := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
	s.podInformer = fakeInformer{idx: store}
	u := s.scheduler.usage
	pod := func(name, node string, cpu string, phase corev1.PodPhase) *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "ns", UID: types.UID(name)},
			Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Resources: corev1.ResourceRequirements{
				Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse(cpu), corev1.ResourceMemory: resource.MustParse("1Gi")}}}}},
			Status: corev1.PodStatus{Phase: phase},
		}
	}
	apply := func(p *corev1.Pod, deleted bool) {
		if deleted {
			require.NoError(t, store.Delete(p))
		} else {
			require.NoError(t, store.Update(p))
		}
		u.observe(p, deleted)
	}
	apply(pod("a", "n1", "1", corev1.PodRunning), false)
	apply(pod("b", "", "2", corev1.PodPending), false)
	apply(pod("c", "n2", "500m", corev1.PodRunning), false)
	require.Equal(t, map[string]resources{"n1": {cpu: 1000, mem: 1 << 30, pods: 1}, "n2": {cpu: 500, mem: 1 << 30, pods: 1}}, s.nodeUsage())

	// the scheduler bound b to n1; the cache has not caught up
	s.scheduler.assumed["b"] = assumedPod{key: "ns/b", node: "n1", req: resources{cpu: 2000, mem: 1 << 30, pods: 1}}
	require.Equal(t, resources{cpu: 3000, mem: 2 << 30, pods: 2}, s.nodeUsage()["n1"])
	apply(pod("b", "n1", "2", corev1.PodPending), false) // now it has: counted once
	require.Equal(t, resources{cpu: 3000, mem: 2 << 30, pods: 2}, s.nodeUsage()["n1"])
	require.Empty(t, s.scheduler.assumed)

	apply(pod("a", "n1", "1", corev1.PodSucceeded), false) // terminal: frees its room
	apply(pod("c", "n2", "500m", corev1.PodRunning), true)
	require.Equal(t, map[string]resources{"n1": {cpu: 2000, mem: 1 << 30, pods: 1}, "n2": {}}, s.nodeUsage())
}

// fakeInformer serves an indexer as an informer's cache; nothing else of it is used.
type fakeInformer struct {
	cache.SharedIndexInformer
	idx cache.Indexer
}

func (f fakeInformer) GetIndexer() cache.Indexer { return f.idx }
func (f fakeInformer) GetStore() cache.Store     { return f.idx }
