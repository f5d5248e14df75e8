// Package e2e runs drover end to end against the test cluster: a real
// kube-apiserver and etcd, the KubeVirt simulator, a real nats-server and
// `drover serve`, driven through drover's own entry points (the CLI, Git,
// kubectl drain). Env is shared by the tests, the evacuation benchmark and
// the demo.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	kvv1 "kubevirt.io/api/core/v1"
	kvclient "kubevirt.io/client-go/kubevirt/typed/core/v1"

	"github.com/drover-io/drover/cmd/drover/app"
	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/cluster"
	"github.com/drover-io/drover/integration/deploy"
	"github.com/drover-io/drover/integration/sim"
)

// Options configure an Env.
type Options struct {
	// Scenario is a scenario in YAML (see integration/scenarios); it is
	// seeded and every VM whose run strategy runs it is waited for.
	Scenario string
	// TimeScale of the simulator (default 10).
	TimeScale float64
	// Logs receives drover's and the simulator's logs (default: discarded).
	Logs *zerolog.Logger
	// Serve edits drover serve's options before it starts.
	Serve func(*app.Options)
	// NoServe leaves drover serve out (a test starts it itself).
	NoServe bool
}

// Env is one test cluster with the simulator, a nats-server and drover.
type Env struct {
	Cluster  *cluster.Cluster
	Sim      *sim.Simulator
	Kube     kubernetes.Interface
	KubeVirt kvclient.KubevirtV1Interface
	NATS     *server.Server
	NATSURL  string
	JS       jetstream.JetStream
	Log      zerolog.Logger

	// HTTPAddr is where drover serve's /metrics listens.
	HTTPAddr string
	// DroverKubeconfig acts as drover's ServiceAccount (deploy/base's RBAC, installed by
	// Start): drover serve uses it, so a permission the ClusterRole lacks fails the test.
	DroverKubeconfig string

	opts     Options
	mu       sync.Mutex
	cleanups []func()
	serve    func()
}

// Start brings an Env up; Close takes it down (in reverse order).
func Start(ctx context.Context, o Options) (e *Env, err error) {
	if o.TimeScale == 0 {
		o.TimeScale = 10
	}
	log := zerolog.Nop()
	if o.Logs != nil {
		log = *o.Logs
	}
	e = &Env{opts: o, Log: log}
	defer func() {
		if err != nil {
			e.Close()
		}
	}()
	e.Cluster, err = cluster.Start(ctx, cluster.Options{Audit: true})
	if err != nil {
		return e, err
	}
	e.cleanups = append(e.cleanups, func() { _ = e.Cluster.Stop() })
	if e.DroverKubeconfig, err = deploy.InstallRBAC(ctx, e.Cluster); err != nil {
		return e, err
	}
	var sc *sim.Scenario
	simOpts := sim.Options{TimeScale: o.TimeScale, Logger: ref(log.With().Str("component", "sim").Logger())}
	if o.Scenario != "" {
		sc, err = sim.ParseScenario([]byte(o.Scenario))
		if err != nil {
			return e, err
		}
		sc.Configure(&simOpts)
	}
	sctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	var stop func() error
	e.Sim, stop, err = sim.Start(sctx, e.Cluster.Config, simOpts)
	if err != nil {
		return e, err
	}
	e.cleanups = append(e.cleanups, func() { _ = stop() })
	e.Kube, e.KubeVirt = e.Sim.Kube, e.Sim.KubeVirt
	if sc != nil {
		if _, err := e.Sim.SeedScenario(ctx, sc); err != nil {
			return e, err
		}
		if err := e.waitScenario(ctx, sc); err != nil {
			return e, err
		}
	}
	dir, err := os.MkdirTemp("", "drover-e2e-nats-")
	if err != nil {
		return e, err
	}
	ns, err := server.NewServer(&server.Options{ServerName: "drover-e2e", Host: "127.0.0.1", Port: -1, JetStream: true,
		StoreDir: dir, NoLog: true, NoSigs: true})
	if err != nil {
		return e, err
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		return e, fmt.Errorf("nats-server not ready")
	}
	e.NATS, e.NATSURL = ns, ns.ClientURL()
	e.cleanups = append(e.cleanups, func() { ns.Shutdown(); ns.WaitForShutdown(); _ = os.RemoveAll(dir) })
	nc, err := nats.Connect(e.NATSURL)
	if err != nil {
		return e, err
	}
	e.cleanups = append(e.cleanups, nc.Close)
	if e.JS, err = jetstream.New(nc); err != nil {
		return e, err
	}
	if !o.NoServe {
		if err := e.StartServe(ctx); err != nil {
			return e, err
		}
	}
	return e, nil
}

func ref[T any](v T) *T { return &v }

// ServeOptions are the options of the drover serve an Env starts.
func (e *Env) ServeOptions() app.Options {
	o := app.DefaultOptions()
	o.NATSURL, o.HTTPListen, o.Kubeconfig = e.NATSURL, "127.0.0.1:0", e.DroverKubeconfig
	o.AckWait, o.ShutdownGrace = 6*time.Second, 3*time.Second
	o.LogLevel = "debug"
	if e.opts.Serve != nil {
		e.opts.Serve(&o)
	}
	return o
}

// StartServe starts drover serve in-process; StopServe stops it.
func (e *Env) StartServe(ctx context.Context) error {
	o := e.ServeOptions()
	sctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	ready := make(chan app.Info, 1)
	done := make(chan error, 1)
	go func() {
		done <- app.Serve(sctx, o, e.Log.With().Str("component", "drover").Logger(), func(i app.Info) { ready <- i })
	}()
	select {
	case info := <-ready:
		e.mu.Lock()
		e.HTTPAddr = info.HTTPAddr
		e.mu.Unlock()
	case err := <-done:
		stop()
		return fmt.Errorf("drover serve: %w", err)
	case <-time.After(60 * time.Second):
		stop()
		return fmt.Errorf("drover serve not ready within 60s")
	}
	e.mu.Lock()
	e.serve = func() { stop(); <-done }
	e.mu.Unlock()
	return nil
}

// StopServe stops the in-process drover serve, if any.
func (e *Env) StopServe() {
	e.mu.Lock()
	f := e.serve
	e.serve = nil
	e.mu.Unlock()
	if f != nil {
		f()
	}
}

// Close stops everything the Env started.
func (e *Env) Close() {
	e.StopServe()
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
	e.cleanups = nil
}

// StartT is Start for a test: it fails the test on error, closes the Env
// with the test and, when the test failed, logs the cluster's state.
func StartT(t *testing.T, o Options) *Env {
	t.Helper()
	if o.Logs == nil {
		l := zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel).With().Timestamp().Logger()
		if os.Getenv("E2E_DEBUG") != "" {
			l = l.Level(zerolog.DebugLevel)
		}
		o.Logs = &l
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	e, err := Start(ctx, o)
	if err != nil {
		t.Fatalf("start e2e env: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("cluster at failure:\n%s", e.Describe(context.Background()))
		}
		e.StopServe()
		if err := e.CheckRBAC(); err != nil {
			t.Error(err)
		}
		e.Close()
	})
	return e
}

// waitScenario waits until every VM of sc that its run strategy starts runs.
func (e *Env) waitScenario(ctx context.Context, sc *sim.Scenario) error {
	want := map[string]bool{}
	for _, vm := range sc.VMs {
		if vm.RunStrategy == string(kvv1.RunStrategyHalted) || vm.RunPolicy == sim.RunPolicyAlwaysOff {
			continue
		}
		ns := vm.Namespace
		if ns == "" {
			ns = "default"
		}
		want[ns+"/"+vm.Name] = true
	}
	return e.Poll(ctx, 3*time.Minute, "the scenario's VMs running", func() (bool, string) {
		missing := []string{}
		for key := range want {
			ns, name, _ := strings.Cut(key, "/")
			vmi, err := e.KubeVirt.VirtualMachineInstances(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil || vmi.Status.Phase != kvv1.Running {
				missing = append(missing, key)
			}
		}
		sort.Strings(missing)
		return len(missing) == 0, "not running: " + strings.Join(missing, ", ")
	})
}

// Poll calls cond every 50ms until it holds, ctx ends or timeout passes; the
// error says what and the last state cond described.
func (e *Env) Poll(ctx context.Context, timeout time.Duration, what string, cond func() (bool, string)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, last := cond()
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s waiting for %s; last seen: %s", timeout, what, last)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Drover runs the drover CLI in-process against the Env's NATS and returns
// its exit status and output (stdout and stderr together).
func (e *Env) Drover(ctx context.Context, args ...string) (int, string) {
	var out bytes.Buffer
	code := app.Main(ctx, append(args, "--nats-url", e.NATSURL), &out, &out)
	return code, out.String()
}

// Op reads an operation record.
func (e *Env) Op(ctx context.Context, key string) (consumers.Record, bool) {
	kv, err := e.JS.KeyValue(ctx, consumers.BucketOps)
	if err != nil {
		return consumers.Record{}, false
	}
	rec, _, found, err := consumers.NewOpStore(kv).Get(ctx, key)
	if err != nil {
		return consumers.Record{}, false
	}
	return rec, found
}

// VMI returns a VMI, nil when there is none.
func (e *Env) VMI(ctx context.Context, ns, name string) *kvv1.VirtualMachineInstance {
	vmi, err := e.KubeVirt.VirtualMachineInstances(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	return vmi
}

// VMIsOn names the running VMIs whose node is node.
func (e *Env) VMIsOn(ctx context.Context, node string) []string {
	l, err := e.KubeVirt.VirtualMachineInstances("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return []string{"error: " + err.Error()}
	}
	var out []string
	for _, v := range l.Items {
		if v.Status.NodeName == node && !v.IsFinal() {
			out = append(out, v.Namespace+"/"+v.Name)
		}
	}
	sort.Strings(out)
	return out
}

// Node returns a node.
func (e *Env) Node(ctx context.Context, name string) *corev1.Node {
	n, err := e.Kube.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil
	}
	return n
}

// Describe is a picture of the cluster for a failure message.
func (e *Env) Describe(ctx context.Context) string {
	var b strings.Builder
	if nodes, err := e.Kube.CoreV1().Nodes().List(ctx, metav1.ListOptions{}); err == nil {
		for _, n := range nodes.Items {
			fmt.Fprintf(&b, "node %s unschedulable=%t taints=%v\n", n.Name, n.Spec.Unschedulable, n.Spec.Taints)
		}
	}
	if vmis, err := e.KubeVirt.VirtualMachineInstances("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, v := range vmis.Items {
			fmt.Fprintf(&b, "vmi %s/%s %s on %s uid %s\n", v.Namespace, v.Name, v.Status.Phase, v.Status.NodeName, v.UID)
		}
	}
	if migs, err := e.KubeVirt.VirtualMachineInstanceMigrations("").List(ctx, metav1.ListOptions{}); err == nil {
		for _, m := range migs.Items {
			reason := ""
			if m.Status.MigrationState != nil {
				reason = m.Status.MigrationState.FailureReason
			}
			fmt.Fprintf(&b, "vmim %s/%s vmi %s %s %s\n", m.Namespace, m.Name, m.Spec.VMIName, m.Status.Phase, reason)
		}
	}
	if kv, err := e.JS.KeyValue(ctx, consumers.BucketOps); err == nil {
		if recs, err := consumers.NewOpStore(kv).List(ctx, ">"); err == nil {
			for _, r := range recs {
				fmt.Fprintf(&b, "op %s %s phase=%s msg=%q err=%q wait=%q\n", r.Key, r.State, r.Phase, r.Message, r.LastError, r.WaitReason)
			}
		}
	}
	for _, v := range e.Sim.Violations() {
		fmt.Fprintf(&b, "VIOLATION %s\n", v)
	}
	return b.String()
}

// CheckRBAC reads what drover did as its ServiceAccount (the cluster's audit log), records it for
// the package's RBAC report (deploy.WriteReport) and returns an error naming every request RBAC
// refused. Call it before Close.
func (e *Env) CheckRBAC() error {
	if e.Cluster == nil {
		return nil
	}
	return deploy.CheckAudit(e.Cluster)
}

// Kubeconfig is the cluster's (admin) kubeconfig file; drover uses DroverKubeconfig.
func (e *Env) Kubeconfig() string { return e.Cluster.Kubeconfig }

// Metric returns the sum of a counter's samples on drover serve's /metrics
// whose line starts with prefix (name and, optionally, labels).
func (e *Env) Metric(ctx context.Context, prefix string) (float64, error) {
	e.mu.Lock()
	addr := e.HTTPAddr
	e.mu.Unlock()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	if err != nil {
		return 0, err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return 0, err
	}
	sum := 0.0
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum, nil
}

// Kubectl is the kubectl binary the tests and the benchmark run: $KUBECTL,
// else kubectl on PATH, else /usr/bin/kubectl (deploy.Kubectl). The machine
// image has it (shared/DEPENDENCIES.md).
func Kubectl() (string, error) { return deploy.Kubectl() }
