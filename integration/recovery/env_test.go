// Package recovery_test runs the recovery workflow end to end in the real
// test cluster: kube-apiserver and etcd, the KubeVirt/kubelet simulator,
// nats-server, `drover serve` (in-process, or as a process where a test
// kills it), kubectl and the real Alertmanager where a person or a peer
// would use them.
package recovery_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	cloudevent "github.com/cloudevents/sdk-go/v2/event"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/util/retry"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/cmd/drover/app"
	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/cluster"
	"github.com/drover-io/drover/integration/deploy"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/integration/sim"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

const ns = "default"

// env is one test's world: a cluster, the simulator on it, a NATS server
// and the drover replicas serving against both.
type env struct {
	t   testing.TB
	ctx context.Context
	c   *cluster.Cluster
	// droverKubeconfig acts as drover's ServiceAccount, bound to deploy/base's ClusterRole.
	droverKubeconfig string
	s                *sim.Simulator
	scale            float64
	nats             *natstest.Server
	nc               *nats.Conn
	js               jetstream.JetStream
	log              zerolog.Logger

	mu      sync.Mutex
	drovers []*drover
}

type envOptions struct {
	// Scale is the simulator's time scale (default 10).
	Scale float64
	// KubeVirtPods places virt-api and virt-controller (default both on a
	// cordoned node "cp" that never fails).
	KubeVirtPods *sim.KubeVirtPods
	// Sim tweaks the simulator's options.
	Sim func(*sim.Options)
}

var setTimeFormat sync.Once

func newEnv(t testing.TB, o envOptions) *env {
	t.Helper()
	if pt, ok := t.(*testing.T); ok {
		pt.Parallel()
	}
	if o.Scale == 0 {
		o.Scale = 10
	}
	setTimeFormat.Do(func() { zerolog.TimeFieldFormat = "15:04:05.000" })
	lvl := zerolog.InfoLevel
	if os.Getenv("DROVER_TEST_DEBUG") != "" {
		lvl = zerolog.DebugLevel
	}
	log := zerolog.New(zerolog.NewTestWriter(t)).Level(lvl).With().Timestamp().Logger()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	e := &env{t: t, ctx: ctx, scale: o.Scale, log: log}
	e.c = cluster.StartWithOptionsT(t, cluster.Options{Audit: true})
	kubeconfig, err := deploy.InstallRBAC(ctx, e.c)
	require.NoError(t, err)
	e.droverKubeconfig = kubeconfig
	// Runs after the drovers and the simulator stopped (cleanups run last first), before the
	// cluster stops: a request RBAC refused drover fails the test.
	t.Cleanup(func() {
		if err := deploy.CheckAudit(e.c); err != nil {
			t.Error(err)
		}
	})
	opts := sim.Options{TimeScale: o.Scale, KubeVirtPods: sim.KubeVirtPods{VirtAPI: []string{"cp", "cp"}, VirtController: []string{"cp", "cp"}}}
	if o.KubeVirtPods != nil {
		opts.KubeVirtPods = *o.KubeVirtPods
	}
	simLog := log.With().Str("component", "sim").Logger().Level(max(lvl, simLevel()))
	opts.Logger = &simLog
	if o.Sim != nil {
		o.Sim(&opts)
	}
	e.s = sim.StartT(t, e.c.Config, opts)
	e.nats = natstest.Start(t)
	t.Cleanup(e.stopDrovers) // before the NATS server stops
	e.nc = natstest.Connect(t, e.nats.URL())
	e.js, err = jetstream.New(e.nc)
	require.NoError(t, err)
	return e
}

// scaled turns a simulated (real-world) duration into test time.
func (e *env) scaled(d time.Duration) time.Duration { return time.Duration(float64(d) / e.scale) }

// droverOptions are the options of `drover serve` for this world: the
// simulator's timings scaled, fencing taint unless changed.
func (e *env) droverOptions() app.Options {
	o := app.DefaultOptions()
	o.NATSURL = e.nats.URL()
	o.Kubeconfig = e.droverKubeconfig
	o.HTTPListen = "127.0.0.1:0"
	o.NodeLeaseTimeout = e.scaled(40 * time.Second)
	o.WatchdogTimeout = e.scaled(60 * time.Second)
	o.WatchdogMargin = e.scaled(15 * time.Second)
	o.ShutdownGrace = 5 * time.Second
	o.LogLevel = "info"
	return o
}

// drover is one in-process replica of `drover serve`.
type drover struct {
	info app.Info
	stop func()
}

// serve starts a drover replica with o and returns where it listens.
func (e *env) serve(o app.Options) app.Info {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan app.Info, 1)
	done := make(chan error, 1)
	e.mu.Lock()
	n := len(e.drovers)
	e.mu.Unlock()
	log := e.log.With().Str("component", fmt.Sprintf("drover-%d", n)).Logger()
	go func() { done <- app.Serve(ctx, o, log, func(i app.Info) { ready <- i }) }()
	d := &drover{}
	var once sync.Once
	d.stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				e.t.Error("drover serve did not stop within 30s")
			}
		})
	}
	select {
	case d.info = <-ready:
	case err := <-done:
		e.t.Fatalf("drover serve: %v", err)
	case <-time.After(60 * time.Second):
		e.t.Fatal("drover serve not ready within 60s")
	}
	e.mu.Lock()
	e.drovers = append(e.drovers, d)
	e.mu.Unlock()
	return d.info
}

func (e *env) stopDrovers() {
	e.mu.Lock()
	ds := e.drovers
	e.drovers = nil
	e.mu.Unlock()
	for _, d := range ds {
		d.stop()
	}
}

// cli runs a drover client command against this world's NATS.
func (e *env) cli(args ...string) string {
	e.t.Helper()
	var out bytes.Buffer
	code := app.Main(e.ctx, append(args, "--nats-url", e.nats.URL()), &out, &out)
	require.Equal(e.t, 0, code, "drover %s: %s", strings.Join(args, " "), out.String())
	return out.String()
}

// node creates a node; cordoned ones hold no VMs.
func (e *env) node(name string, o sim.NodeOptions, cordoned bool) {
	e.t.Helper()
	n := sim.NewNode(name, o)
	n.Spec.Unschedulable = cordoned
	_, err := e.s.CreateNode(e.ctx, n)
	require.NoError(e.t, err)
	e.eventually(30*time.Second, "node "+name+" Ready", func() (bool, string) {
		n, err := e.s.Kube.CoreV1().Nodes().Get(e.ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return ready(n), fmt.Sprint(n.Status.Conditions)
	})
}

func ready(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// controlPlane creates the cordoned node "cp" for KubeVirt's own pods and
// waits until KubeVirt answers.
func (e *env) controlPlane() {
	e.t.Helper()
	e.node("cp", sim.NodeOptions{}, true)
	e.waitKubeVirt()
}

// waitKubeVirt waits until virt-api admits a VM (its webhook answers).
func (e *env) waitKubeVirt() {
	e.t.Helper()
	e.eventually(60*time.Second, "virt-api answering", func() (bool, string) {
		_, err := e.s.KubeVirt.VirtualMachineInstanceMigrations(ns).Create(e.ctx, &kvv1.VirtualMachineInstanceMigration{
			ObjectMeta: metav1.ObjectMeta{Name: "probe"}, Spec: kvv1.VirtualMachineInstanceMigrationSpec{VMIName: "no-such-vmi"}}, metav1.CreateOptions{})
		return err != nil && strings.Contains(err.Error(), "does not exist"), fmt.Sprint(err)
	})
}

func (e *env) updateNode(name string, f func(*corev1.Node)) {
	e.t.Helper()
	require.NoError(e.t, retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := e.s.Kube.CoreV1().Nodes().Get(e.ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		f(n)
		_, err = e.s.Kube.CoreV1().Nodes().Update(e.ctx, n, metav1.UpdateOptions{})
		return err
	}))
}

// vm creates a KubeVirt VM; a Manual one is started.
func (e *env) vm(name string, o sim.VMOptions) {
	e.t.Helper()
	vm := sim.NewKubeVirtVM(ns, name, o)
	_, err := e.s.CreateKubeVirtVM(e.ctx, vm)
	require.NoError(e.t, err)
	if o.RunStrategy == kvv1.RunStrategyManual {
		require.NoError(e.t, e.s.StartKubeVirtVM(e.ctx, ns, name))
	}
}

// running waits until VMI name runs and returns it.
func (e *env) running(name string, timeout time.Duration) *kvv1.VirtualMachineInstance {
	e.t.Helper()
	var out *kvv1.VirtualMachineInstance
	e.eventually(timeout, "vmi "+name+" Running", func() (bool, string) {
		vmi, err := e.s.KubeVirt.VirtualMachineInstances(ns).Get(e.ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		out = vmi
		return vmi.Status.Phase == kvv1.Running && vmi.DeletionTimestamp == nil, string(vmi.Status.Phase) + " on " + vmi.Status.NodeName
	})
	return out
}

// runningElsewhere waits until VMI name runs on another node than from,
// as a new instance.
func (e *env) runningElsewhere(name, from string, timeout time.Duration) *kvv1.VirtualMachineInstance {
	e.t.Helper()
	var out *kvv1.VirtualMachineInstance
	e.eventually(timeout, "vmi "+name+" Running off "+from, func() (bool, string) {
		vmi, err := e.s.KubeVirt.VirtualMachineInstances(ns).Get(e.ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		out = vmi
		return vmi.Status.Phase == kvv1.Running && vmi.Status.NodeName != from && vmi.DeletionTimestamp == nil,
			string(vmi.Status.Phase) + " on " + vmi.Status.NodeName
	})
	return out
}

func (e *env) fault(node, fault string) {
	e.t.Helper()
	require.NoError(e.t, e.s.SetFault(e.ctx, node, fault))
}

// eventually polls cond until it holds or timeout passes.
func (e *env) eventually(timeout time.Duration, what string, cond func() (bool, string)) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		ok, msg := cond()
		if ok {
			return
		}
		last = msg
		if time.Now().After(deadline) {
			e.dump()
			e.t.Fatalf("timed out after %s waiting for %s: %s", timeout, what, last)
		}
		select {
		case <-e.ctx.Done():
			e.t.Fatalf("test context ended waiting for %s", what)
		case <-time.After(25 * time.Millisecond):
		}
	}
}

// dump logs the operation records, to explain a failure.
func (e *env) dump() {
	for _, r := range e.ops(">") {
		e.t.Logf("op %s: %s phase=%q attempts=%d wait=%q err=%q msg=%q", r.Key, r.State, r.Phase, r.Attempts, r.WaitReason, r.LastError, r.Message)
	}
}

// ops lists the operation records matching filter.
func (e *env) ops(filter string) []consumers.Record {
	kv, err := e.js.KeyValue(e.ctx, consumers.BucketOps)
	if err != nil {
		return nil
	}
	recs, err := consumers.NewOpStore(kv).List(e.ctx, filter)
	if err != nil {
		return nil
	}
	return recs
}

// recoveryOf waits until exactly one recovery operation of node exists and
// satisfies cond, and returns it.
func (e *env) recoveryOf(node string, timeout time.Duration, what string, cond func(r consumers.Record) bool) consumers.Record {
	e.t.Helper()
	var out consumers.Record
	e.eventually(timeout, "recovery of "+node+": "+what, func() (bool, string) {
		recs := e.ops(consumers.RecoveryOperationFilter(node))
		if len(recs) != 1 {
			return false, fmt.Sprintf("%d recovery operations", len(recs))
		}
		out = recs[0]
		return cond(out), fmt.Sprintf("%s phase %q: %s %s", out.State, out.Phase, out.WaitReason, out.Message)
	})
	return out
}

func waitingAtGate(r consumers.Record) bool {
	return r.State == consumers.StateWaiting && r.Phase == "gate"
}

func succeeded(r consumers.Record) bool { return r.State == consumers.StateSucceeded }

// deletions records when the first pod on node was removed from the API
// (a graceful deletion on a dead node never completes: only a forced one, or
// the pod garbage collector, removes the pod).
type deletions struct {
	mu    sync.Mutex
	first time.Time
	names []string
}

func (d *deletions) First() (time.Time, []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.first, append([]string(nil), d.names...)
}

// watchDeletions watches the pods bound to node and records the ones
// removed from the API, from now on.
func (e *env) watchDeletions(node string) *deletions {
	e.t.Helper()
	d := &deletions{}
	w, err := e.s.Kube.CoreV1().Pods(metav1.NamespaceAll).Watch(e.ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.nodeName", node).String()})
	require.NoError(e.t, err)
	e.t.Cleanup(w.Stop)
	go func() {
		for ev := range w.ResultChan() {
			p, ok := ev.Object.(*corev1.Pod)
			if !ok {
				continue
			}
			if ev.Type == watch.Deleted {
				d.mu.Lock()
				if d.first.IsZero() {
					d.first = time.Now()
				}
				d.names = append(d.names, p.Namespace+"/"+p.Name)
				d.mu.Unlock()
			}
		}
	}()
	return d
}

// incident decodes a recovery's checkpoint.
func incidentOf(t testing.TB, r consumers.Record) map[string]any {
	t.Helper()
	var m map[string]any
	require.NoError(t, jsonUnmarshal(r.Data, &m))
	return m
}

// gateOpened is when the recovery opened its gate.
func gateOpened(t testing.TB, r consumers.Record) time.Time {
	t.Helper()
	s, _ := incidentOf(t, r)["gateOpened"].(string)
	at, err := time.Parse(time.RFC3339Nano, s)
	require.NoError(t, err, "gateOpened %q", s)
	return at
}

// progress reads the per-VM progress of an operation.
func (e *env) progress(op string) map[string]consumers.TargetProgress {
	kv, err := e.js.KeyValue(e.ctx, consumers.BucketProgress)
	require.NoError(e.t, err)
	keys, err := kv.ListKeysFiltered(e.ctx, op+".>")
	require.NoError(e.t, err)
	out := map[string]consumers.TargetProgress{}
	for k := range keys.Keys() {
		v, err := kv.Get(e.ctx, k)
		if err != nil {
			continue
		}
		var p struct {
			Target string `json:"target"`
			consumers.TargetProgress
		}
		if jsonUnmarshal(v.Value(), &p) == nil {
			out[p.Target] = p.TargetProgress
		}
	}
	return out
}

// events lists the Kubernetes Events drover recorded on an object.
func (e *env) events(kind, namespace, name string) []corev1.Event {
	e.t.Helper()
	if namespace == "" {
		namespace = metav1.NamespaceDefault
	}
	l, err := e.s.Kube.CoreV1().Events(namespace).List(e.ctx, metav1.ListOptions{FieldSelector: fields.AndSelectors(
		fields.OneTermEqualSelector("involvedObject.kind", kind), fields.OneTermEqualSelector("involvedObject.name", name)).String()})
	require.NoError(e.t, err)
	var out []corev1.Event
	for _, ev := range l.Items {
		if ev.Source.Component == "drover" || ev.ReportingController == "drover" {
			out = append(out, ev)
		}
	}
	return out
}

// hasEvents waits until drover recorded Events with these reasons on an
// object (the recorder sends them asynchronously).
func (e *env) hasEvents(kind, namespace, name string, want ...string) {
	e.t.Helper()
	e.eventually(10*time.Second, fmt.Sprintf("events %v on %s %s", want, kind, name), func() (bool, string) {
		got := map[string]bool{}
		for _, r := range reasons(e.events(kind, namespace, name)) {
			got[r] = true
		}
		for _, w := range want {
			if !got[w] {
				return false, fmt.Sprint(reasons(e.events(kind, namespace, name)))
			}
		}
		return true, ""
	})
}

func reasons(evs []corev1.Event) []string {
	var out []string
	for _, e := range evs {
		out = append(out, e.Reason)
	}
	return out
}

// metric scrapes one sample of drover's /metrics (the first line that
// starts with name).
func metric(t *testing.T, addr, name string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, name+" ") {
			return strings.TrimPrefix(line, name+" ")
		}
	}
	return ""
}

// noViolations asserts that no VM ever ran twice and no RWO volume was ever
// written from two nodes, over the whole test.
func (e *env) noViolations() {
	e.t.Helper()
	require.Empty(e.t, e.s.Violations(), "the invariant checker's full history")
}

// publishNotReady publishes a node.notready event as a producer would.
func (e *env) publishNotReady(node string, since time.Time) {
	e.t.Helper()
	ev, err := schemas.New("test/producer", schemas.DeterministicID(node, since.String()), &schemas.NodeNotReady{Node: node, Since: since, Reason: "Test"})
	require.NoError(e.t, err)
	subject, err := schemas.SubjectFor(&schemas.NodeNotReady{Node: node})
	require.NoError(e.t, err)
	msg, err := schemas.ToMsg(subject, ev)
	require.NoError(e.t, err)
	_, err = e.js.PublishMsg(e.ctx, msg)
	require.NoError(e.t, err)
}

// publish publishes an event as a producer does.
func publish(t *testing.T, e *env, ev cloudevent.Event) producers.Result {
	t.Helper()
	res, err := (&producers.Publisher{JS: e.js}).Publish(e.ctx, ev)
	require.NoError(t, err)
	return res
}

// simLevel is the simulator's log level: warnings, or everything with
// DROVER_TEST_SIM_LOG set.
func simLevel() zerolog.Level {
	if os.Getenv("DROVER_TEST_SIM_LOG") != "" {
		return zerolog.DebugLevel
	}
	return zerolog.WarnLevel
}

// vmOn creates a VM and has it start on node: the other schedulable nodes
// are cordoned meanwhile (a node selector would keep it from restarting
// elsewhere).
func (e *env) vmOn(name, node string, o sim.VMOptions) {
	e.t.Helper()
	nodes, err := e.s.Kube.CoreV1().Nodes().List(e.ctx, metav1.ListOptions{})
	require.NoError(e.t, err)
	var cordoned []string
	for _, n := range nodes.Items {
		if n.Name != node && !n.Spec.Unschedulable {
			e.updateNode(n.Name, func(n *corev1.Node) { n.Spec.Unschedulable = true })
			cordoned = append(cordoned, n.Name)
		}
	}
	e.vm(name, o)
	require.Equal(e.t, node, e.running(name, 30*time.Second).Status.NodeName)
	for _, n := range cordoned {
		e.updateNode(n, func(n *corev1.Node) { n.Spec.Unschedulable = false })
	}
}
