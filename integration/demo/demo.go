// Package demo is `make demo`: it starts a real kube-apiserver and etcd, the
// KubeVirt/kubelet simulator with a few nodes and VMs, and `drover serve`
// with embedded NATS, then walks through what drover does today, narrating
// and timing each step. It is a package so that a test can run it too.
package demo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/cmd/drover/app"
	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/bench"
	"github.com/drover-io/drover/integration/cluster"
	"github.com/drover-io/drover/integration/gitrepo"
	"github.com/drover-io/drover/integration/sim"
	"github.com/drover-io/drover/schemas"
)

// Options configure a demo run.
type Options struct {
	Out       io.Writer
	Nodes     int     // default 4
	VMs       int     // default 12
	TimeScale float64 // how much faster the simulated world runs; default 10
	// LogDir receives drover's and the simulator's logs; default a temporary folder.
	LogDir string
	// Kubectl is the kubectl binary for the `kubectl drain` baseline; default "kubectl" on PATH.
	Kubectl string
	// Bench ends the demo with the evacuation benchmark's side-by-side line
	// (KubeVirt's default limits; `make bench-evacuation` runs every setting).
	Bench bool
}

// Timing is one measured step.
type Timing struct {
	Step     string
	Duration time.Duration
}

// Summary is what a run measured and found.
type Summary struct {
	Timings    []Timing
	Violations []string
	// Events maps each published event type to whether its operation finished.
	Events map[string]consumers.State
	// Recoveries are the final messages of the recoveries the demo ran.
	Recoveries []string
}

type run struct {
	o          Options
	mu         sync.Mutex // serializes output
	sum        Summary
	c          *cluster.Cluster
	s          *sim.Simulator
	natsURL    string
	httpAddr   string
	js         jetstream.JetStream
	stopDrover func()
	git        *gitrepo.Remote
	clone      *gitrepo.Clone
}

// scaled turns a real-world duration into the demo's time.
func (r *run) scaled(d time.Duration) time.Duration { return time.Duration(float64(d) / r.o.TimeScale) }

func (r *run) say(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	fmt.Fprintf(r.o.Out, format+"\n", args...)
}

func (r *run) scene(title string) { r.say("\n== %s", title) }

func (r *run) timed(step string, d time.Duration) {
	r.sum.Timings = append(r.sum.Timings, Timing{step, d})
	r.say("   (%s: %s)", step, d.Round(time.Millisecond))
}

// Run runs the demo until it is done or ctx ends, and stops everything it started.
func Run(ctx context.Context, o Options) (sum Summary, err error) {
	if o.Out == nil {
		o.Out = os.Stdout
	}
	if o.Nodes == 0 {
		o.Nodes = 4
	}
	if o.VMs == 0 {
		o.VMs = 12
	}
	if o.TimeScale == 0 {
		o.TimeScale = 10
	}
	if o.Kubectl == "" {
		o.Kubectl = "kubectl"
	}
	if o.LogDir == "" {
		dir, err := os.MkdirTemp("", "drover-demo-")
		if err != nil {
			return sum, err
		}
		o.LogDir = dir
	}
	r := &run{o: o, sum: Summary{Events: map[string]consumers.State{}}}
	var cleanups []func()
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			cleanups[i]()
		}
	}()
	logFile, err := os.Create(filepath.Join(o.LogDir, "drover.log"))
	if err != nil {
		return sum, err
	}
	cleanups = append(cleanups, func() { _ = logFile.Close() })
	log := zerolog.New(logFile).With().Timestamp().Logger()

	r.scene("1. A real control plane: kube-apiserver and etcd, built from their Go modules")
	start := time.Now()
	r.c, err = cluster.Start(log.WithContext(ctx), cluster.Options{})
	if err != nil {
		return sum, err
	}
	cleanups = append(cleanups, func() { _ = r.c.Stop() })
	r.say("   kubeconfig: %s", r.c.Kubeconfig)
	r.timed("control plane up", time.Since(start))

	r.scene(fmt.Sprintf("2. The KubeVirt/kubelet simulator: %d nodes, %d VMs, time x%g", o.Nodes, o.VMs, o.TimeScale))
	simLog := log.With().Str("component", "sim").Logger()
	var stopSim func() error
	r.s, stopSim, err = sim.Start(ctx, r.c.Config, sim.Options{TimeScale: o.TimeScale, Logger: &simLog})
	if err != nil {
		return sum, err
	}
	cleanups = append(cleanups, func() { _ = stopSim() })
	start = time.Now()
	seed, err := r.s.Seed(ctx, sim.SeedOptions{Nodes: o.Nodes, VMs: o.VMs})
	if err != nil {
		return sum, err
	}
	want, err := r.wantRunning(ctx)
	if err != nil {
		return sum, err
	}
	if err := r.waitVMIs(ctx, 2*time.Minute, func(vmis []kvv1.VirtualMachineInstance) bool {
		return countRunning(vmis) >= want
	}); err != nil {
		return sum, fmt.Errorf("waiting for %d VMs to run: %w", want, err)
	}
	r.timed(fmt.Sprintf("%d nodes and %d VMs created, %d running (the rest are Halted)", len(seed.Nodes), len(seed.VMs), want), time.Since(start))
	if err := r.printVMs(ctx); err != nil {
		return sum, err
	}
	stopWatch := r.watchVMIs(ctx)
	cleanups = append(cleanups, stopWatch)

	if r.git, err = gitrepo.NewRemote(o.LogDir); err != nil {
		return sum, err
	}
	if r.clone, err = r.git.NewClone(filepath.Join(o.LogDir, "ops-repo")); err != nil {
		return sum, err
	}
	if _, err := r.clone.CommitAndPush(map[string]string{"README.md": "Maintenance requests: maintenance/*.yaml\n"}, nil, "init"); err != nil {
		return sum, err
	}

	r.scene("3. drover serve: embedded NATS JetStream, the cluster's kubeconfig, a Git repository of maintenance requests")
	start = time.Now()
	if err := r.serve(ctx, log, &cleanups); err != nil {
		return sum, err
	}
	r.timed("drover ready", time.Since(start))

	if err := r.requests(ctx); err != nil {
		return sum, err
	}
	if err := r.gitops(ctx, seed.Nodes[2]); err != nil {
		return sum, err
	}
	if err := r.drainBaseline(ctx, seed.Nodes[1]); err != nil {
		return sum, err
	}
	if err := r.nodeFailure(ctx, seed.Nodes[len(seed.Nodes)-1]); err != nil {
		return sum, err
	}
	if err := r.alertmanager(ctx, log, &cleanups, seed.Nodes[len(seed.Nodes)-2]); err != nil {
		return sum, err
	}

	stopWatch()
	r.scene("Invariants (ground truth of the simulator)")
	for _, v := range r.s.Violations() {
		r.sum.Violations = append(r.sum.Violations, v.String())
	}
	if len(r.sum.Violations) == 0 {
		r.say("   no VM ever ran on two nodes; no RWO volume was ever attached to two nodes")
	} else {
		for _, v := range r.sum.Violations {
			r.say("   VIOLATION: %s", v)
		}
	}
	if o.Bench {
		if err := r.bench(ctx, log); err != nil {
			return sum, err
		}
	}
	r.summary()
	return r.sum, nil
}

func (r *run) serve(ctx context.Context, log zerolog.Logger, cleanups *[]func()) error {
	stop, err := r.serveWith(ctx, log, cleanups, nil)
	r.stopDrover = stop
	return err
}

// serveWith starts drover serve with the demo's options, changed by tweak,
// and returns a function that stops it.
func (r *run) serveWith(ctx context.Context, log zerolog.Logger, cleanups *[]func(), tweak func(*app.Options)) (func(), error) {
	o := app.DefaultOptions()
	o.NATSListen, o.HTTPListen, o.Kubeconfig = "127.0.0.1:0", "127.0.0.1:0", r.c.Kubeconfig
	o.DataDir = filepath.Join(r.o.LogDir, "drover-data")
	o.ShutdownGrace = 5 * time.Second
	o.Git.URL, o.Git.Interval = r.git.URL, time.Second
	// The simulated world runs TimeScale times faster: so do drover's timeouts.
	o.NodeLeaseTimeout = r.scaled(recoveryLeaseTimeout)
	o.WatchdogTimeout = r.scaled(60 * time.Second)
	o.WatchdogMargin = r.scaled(15 * time.Second)
	if tweak != nil {
		tweak(&o)
	}
	sctx, stop := context.WithCancel(ctx)
	ready := make(chan app.Info, 1)
	done := make(chan error, 1)
	go func() {
		done <- app.Serve(sctx, o, log.With().Str("component", "drover").Logger(), func(i app.Info) { ready <- i })
	}()
	var once sync.Once
	stopFn := func() { once.Do(func() { stop(); <-done }) }
	*cleanups = append(*cleanups, stopFn)
	select {
	case info := <-ready:
		r.natsURL, r.httpAddr = info.NATSURL, info.HTTPAddr
		r.say("   NATS %s, metrics http://%s/metrics, logs %s", info.NATSURL, info.HTTPAddr, filepath.Join(r.o.LogDir, "drover.log"))
	case err := <-done:
		return stopFn, fmt.Errorf("drover serve: %w", err)
	}
	nc, err := nats.Connect(r.natsURL)
	if err != nil {
		return stopFn, err
	}
	*cleanups = append(*cleanups, nc.Close)
	r.js, err = jetstream.New(nc)
	return stopFn, err
}

// drover runs one CLI command in-process and prints it like a shell session.
func (r *run) drover(ctx context.Context, args ...string) (int, string) {
	var out bytes.Buffer
	code := app.Main(ctx, append(args, "--nats-url", r.natsURL), &out, &out)
	r.say("   $ drover %s", strings.Join(args, " "))
	for _, line := range strings.Split(strings.TrimRight(out.String(), "\n"), "\n") {
		r.say("     %s", line)
	}
	if code != 0 {
		r.say("     (exit status %d)", code)
	}
	return code, out.String()
}

func (r *run) opState(ctx context.Context, key string) consumers.State {
	kv, err := r.js.KeyValue(ctx, consumers.BucketOps)
	if err != nil {
		return ""
	}
	rec, _, _, err := consumers.NewOpStore(kv).Get(ctx, key)
	if err != nil {
		return ""
	}
	return rec.State
}

// waitOps waits until every operation matching filter has finished and
// returns how many there were.
func (r *run) waitOps(ctx context.Context, filter string, n int) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		kv, err := r.js.KeyValue(ctx, consumers.BucketOps)
		if err != nil {
			return err
		}
		recs, err := consumers.NewOpStore(kv).List(ctx, filter)
		if err != nil {
			return err
		}
		done := 0
		for _, rec := range recs {
			if rec.State.Terminal() {
				done++
			}
		}
		if done >= n {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("operations %s: %d of %d finished after 30s", filter, done, n)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (r *run) requests(ctx context.Context) error {
	r.scene("4. Maintenance from a chat command: plan first, then evacuate with live progress")
	r.say("   A dry run plans and changes nothing: an action per VM by its eviction strategy, run strategy and the")
	r.say("   drover.io/maintenance-strategy label, a capacity verdict, the order, the expected makespan and its lower bound.")
	r.drover(ctx, "maintenance", "start", "node-1", "--reason", "BIOS update", "--dry-run")
	r.say("\n   What a chat bot runs: --force shuts down (and restarts elsewhere where the run strategy allows) the VMs")
	r.say("   that cannot move; --wait follows the operation and exits 0 only when every VM is where it must be.")
	start := time.Now()
	key := consumers.MaintenanceOperationKey("node-1", "demo-1")
	r.droverLive(ctx, "maintenance", "start", "node-1", "--reason", "BIOS update", "--request-id", "demo-1", "--force", "--wait")
	r.timed("maintenance of node-1 requested -> every VM moved, message acked", time.Since(start))
	r.sum.Events[schemas.TypeMaintenanceRequested] = r.opState(ctx, key)
	r.say("   The same request again (a retrying bot) is dropped by JetStream:")
	r.drover(ctx, "maintenance", "start", "node-1", "--reason", "BIOS update", "--request-id", "demo-1")

	r.say("\n   Bad input gets a clear error. Invalid arguments are refused before anything is sent:")
	r.drover(ctx, "maintenance", "start", "node-1", "--reason", "x", "--mode", "Sideways")
	r.say("   A VM that does not exist is refused by the handler and dead-lettered, not retried:")
	r.drover(ctx, "vm", "migrate", "default/no-such-vm")

	r.say("\n   One event of every other type:")
	r.drover(ctx, "vm", "migrate", "default/vm-1", "--node-selector", "kubernetes.io/hostname=node-2")
	r.drover(ctx, "vm", "cancel", "default/vm-1")
	r.drover(ctx, "node", "fenced", "node-4", "--method", "ipmi-power-off")
	r.say("   Ending the maintenance gives node-1 back (uncordoned: drover cordoned it) and starts what it kept down:")
	r.drover(ctx, "maintenance", "end", "node-1", "--wait")
	if err := r.waitOps(ctx, ">", 6); err != nil {
		return err
	}
	r.drover(ctx, "status")
	r.drover(ctx, "dlq", "list")
	return nil
}

// gitops requests a maintenance with a commit and ends it by removing the file.
func (r *run) gitops(ctx context.Context, node string) error {
	r.scene(fmt.Sprintf("5. Maintenance from a Git commit: %s, requested by adding a file, ended by removing it", node))
	file := gitrepo.Request(node+"-kernel", node, "kernel update", "")
	r.say("   maintenance/%s-kernel.yaml:", node)
	for _, l := range strings.Split(strings.TrimSpace(file), "\n") {
		r.say("     %s", l)
	}
	start := time.Now()
	h, err := r.clone.CommitAndPush(map[string]string{"maintenance/" + node + "-kernel.yaml": file}, nil, "kernel update on "+node)
	if err != nil {
		return err
	}
	r.say("   committed %s and pushed; drover polls every second (POST /git/webhook polls at once)", h[:12])
	if err := r.waitOps(ctx, consumers.MaintenanceOperationFilter(node), 1); err != nil {
		return err
	}
	r.timed("commit pushed -> "+node+" emptied", time.Since(start))
	r.drover(ctx, "status")
	start = time.Now()
	if _, err := r.clone.CommitAndPush(nil, []string{"maintenance/" + node + "-kernel.yaml"}, node+" done"); err != nil {
		return err
	}
	r.say("   removed the file and pushed")
	if err := r.waitOps(ctx, consumers.MaintenanceEndFilter(node), 1); err != nil {
		return err
	}
	n, err := r.s.Kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
	if err != nil {
		return err
	}
	r.say("   %s unschedulable: %t", node, n.Spec.Unschedulable)
	r.timed("file removed -> "+node+" given back", time.Since(start))
	return nil
}

// bench runs the evacuation benchmark for KubeVirt's default limits.
func (r *run) bench(ctx context.Context, log zerolog.Logger) error {
	r.scene("Benchmark: the busy node (20 mixed VMs), drover next to the plan and plain kubectl drain")
	benchLog := log.With().Str("component", "bench").Logger()
	rs, err := bench.Run(ctx, bench.Options{TimeScale: r.o.TimeScale, Kubectl: r.o.Kubectl, Settings: bench.Settings[:1], Logs: &benchLog})
	if err != nil {
		return err
	}
	var b strings.Builder
	bench.Print(&b, rs, r.o.TimeScale)
	for _, l := range strings.Split(strings.TrimRight(b.String(), "\n"), "\n") {
		r.say("   %s", l)
	}
	r.say("   (make bench-evacuation adds Deckhouse's limits)")
	return nil
}

// droverLive runs one CLI command and prints its output as it comes.
func (r *run) droverLive(ctx context.Context, args ...string) int {
	r.say("   $ drover %s", strings.Join(args, " "))
	w := &lineWriter{say: func(l string) { r.say("     %s", l) }}
	code := app.Main(ctx, append(args, "--nats-url", r.natsURL), w, w)
	w.flush()
	if code != 0 {
		r.say("     (exit status %d)", code)
	}
	return code
}

// lineWriter hands complete lines to say.
type lineWriter struct {
	mu  sync.Mutex
	buf []byte
	say func(string)
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf = append(w.buf, p...)
	for {
		i := bytes.IndexByte(w.buf, '\n')
		if i < 0 {
			return len(p), nil
		}
		w.say(string(w.buf[:i]))
		w.buf = w.buf[i+1:]
	}
}

func (w *lineWriter) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.buf) > 0 {
		w.say(string(w.buf))
		w.buf = nil
	}
}

// drainBaseline measures what operators do by hand today: kubectl drain,
// which on KubeVirt goes through the eviction webhook and live migration.
func (r *run) drainBaseline(ctx context.Context, node string) error {
	r.scene(fmt.Sprintf("6. Baseline: `kubectl drain %s` as operators run it today (KubeVirt eviction webhook -> live migration)", node))
	before, err := r.vmisOn(ctx, node)
	if err != nil {
		return err
	}
	r.say("   VMs on %s: %s", node, strings.Join(before, ", "))
	start := time.Now()
	dctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(dctx, r.o.Kubectl, "--kubeconfig", r.c.Kubeconfig, "drain", node,
		"--pod-selector", "kubevirt.io=virt-launcher", "--ignore-daemonsets", "--delete-emptydir-data", "--timeout", "80s")
	out, err := cmd.CombinedOutput()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	shown := 0
	for _, l := range lines {
		if strings.Contains(l, "error when evicting") {
			continue // kubectl's retry chatter while the webhook holds an eviction for a migration
		}
		r.say("   | %s", l)
		shown++
	}
	if hidden := len(lines) - shown; hidden > 0 {
		r.say("   | (%d 'Cannot evict pod ... will retry' lines: the webhook answers 429 while the VM migrates)", hidden)
	}
	if err != nil {
		return fmt.Errorf("kubectl drain %s: %w", node, err)
	}
	if err := r.waitVMIs(ctx, time.Minute, func(vmis []kvv1.VirtualMachineInstance) bool {
		for _, v := range vmis {
			if v.Status.NodeName == node && v.Status.Phase == kvv1.Running {
				return false
			}
		}
		return true
	}); err != nil {
		return err
	}
	r.timed(fmt.Sprintf("kubectl drain %s until no VM runs there", node), time.Since(start))
	if err := exec.CommandContext(ctx, r.o.Kubectl, "--kubeconfig", r.c.Kubeconfig, "uncordon", node).Run(); err != nil {
		return fmt.Errorf("kubectl uncordon %s: %w", node, err)
	}
	r.say("   uncordoned %s", node)
	return nil
}

func (r *run) waitNode(ctx context.Context, cond func(*corev1.Node) bool, node string) error {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		n, err := r.s.Kube.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
		if err == nil && cond(n) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("node %s: condition not reached within 2m", node)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (r *run) summary() {
	r.scene("Summary of this run")
	tw := tabwriter.NewWriter(r.o.Out, 0, 4, 2, ' ', 0)
	for _, t := range r.sum.Timings {
		fmt.Fprintf(tw, "   %s\t%s\n", t.Step, t.Duration.Round(time.Millisecond))
	}
	_ = tw.Flush()
	r.say("   invariant violations: %d", len(r.sum.Violations))
}

// wantRunning counts the VMs whose run strategy starts them.
func (r *run) wantRunning(ctx context.Context) (int, error) {
	vms, err := r.s.KubeVirt.VirtualMachines(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{})
	if err != nil {
		return 0, err
	}
	n := 0
	for _, vm := range vms.Items {
		if vm.Spec.RunStrategy != nil && *vm.Spec.RunStrategy != kvv1.RunStrategyHalted {
			n++
		}
	}
	return n, nil
}

func countRunning(vmis []kvv1.VirtualMachineInstance) int {
	n := 0
	for _, v := range vmis {
		if v.Status.Phase == kvv1.Running {
			n++
		}
	}
	return n
}

func (r *run) waitVMIs(ctx context.Context, limit time.Duration, cond func([]kvv1.VirtualMachineInstance) bool) error {
	deadline := time.Now().Add(limit)
	for {
		l, err := r.s.KubeVirt.VirtualMachineInstances(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{})
		if err == nil && cond(l.Items) {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("condition on VMIs not reached in time")
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (r *run) vmisOn(ctx context.Context, node string) ([]string, error) {
	l, err := r.s.KubeVirt.VirtualMachineInstances(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	var names []string
	for _, v := range l.Items {
		if v.Status.NodeName == node {
			names = append(names, v.Name)
		}
	}
	sort.Strings(names)
	return names, nil
}

// printVMs prints the VMs like `kubectl get vm -o wide`.
func (r *run) printVMs(ctx context.Context) error {
	vms, err := r.s.KubeVirt.VirtualMachines(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	vmis, err := r.s.KubeVirt.VirtualMachineInstances(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	nodeOf := map[string]string{}
	for _, v := range vmis.Items {
		nodeOf[v.Name] = v.Status.NodeName
	}
	sort.Slice(vms.Items, func(i, j int) bool { return natLess(vms.Items[i].Name, vms.Items[j].Name) })
	r.mu.Lock()
	defer r.mu.Unlock()
	tw := tabwriter.NewWriter(r.o.Out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "   NAME\tSTATUS\tRUNSTRATEGY\tMEMORY\tNODE")
	for _, vm := range vms.Items {
		strategy := ""
		if vm.Spec.RunStrategy != nil {
			strategy = string(*vm.Spec.RunStrategy)
		}
		mem := ""
		if vm.Spec.Template != nil && vm.Spec.Template.Spec.Domain.Memory != nil && vm.Spec.Template.Spec.Domain.Memory.Guest != nil {
			mem = vm.Spec.Template.Spec.Domain.Memory.Guest.String()
		}
		fmt.Fprintf(tw, "   %s\t%s\t%s\t%s\t%s\n", vm.Name, vm.Status.PrintableStatus, strategy, mem, nodeOf[vm.Name])
	}
	return tw.Flush()
}

func natLess(a, b string) bool {
	if len(a) != len(b) {
		return len(a) < len(b)
	}
	return a < b
}

// watchVMIs prints every change of a VMI's phase or node, like
// `kubectl get vmi -o wide -w`, until the returned function is called.
func (r *run) watchVMIs(ctx context.Context) func() {
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		last := map[string]string{}
		for wctx.Err() == nil {
			w, err := r.s.KubeVirt.VirtualMachineInstances(metav1.NamespaceDefault).Watch(wctx, metav1.ListOptions{})
			if err != nil {
				return
			}
			for ev := range w.ResultChan() {
				v, ok := ev.Object.(*kvv1.VirtualMachineInstance)
				if !ok {
					continue
				}
				state := string(v.Status.Phase) + " " + v.Status.NodeName
				if ev.Type == watch.Deleted {
					state = "Deleted"
				}
				if v.Status.MigrationState != nil && !v.Status.MigrationState.Completed && v.Status.MigrationState.TargetNode != "" {
					state = "Migrating " + v.Status.MigrationState.SourceNode + " -> " + v.Status.MigrationState.TargetNode
				}
				if last[v.Name] == state {
					continue
				}
				_, seen := last[v.Name]
				last[v.Name] = state
				if seen {
					r.say("     vmi %-6s %s   (%s)", v.Name, state, time.Now().Format("15:04:05.000"))
				}
			}
			w.Stop()
		}
	}()
	return func() { cancel(); <-done }
}
