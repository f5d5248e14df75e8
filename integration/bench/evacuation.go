// Package bench measures drover's evacuation of the busy-node scenario (one
// node, 20 VMs of every kind) against the plan's estimate and lower bound
// and against plain `kubectl drain` through KubeVirt's eviction path on a
// copy of the same scene, under KubeVirt's default migration limits and
// under Deckhouse's (one outbound migration per node). It asserts nothing
// about time: `make bench-evacuation` prints the figures.
package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/maintenance"
	"github.com/drover-io/drover/integration/e2e"
)

// Setting is one configuration of migration limits.
type Setting struct {
	Name       string
	PerCluster uint32
	PerNode    uint32
}

// Settings are KubeVirt's defaults and Deckhouse's (max(2, nodes) per
// cluster with the scene's 3 nodes, one outbound per node).
var Settings = []Setting{
	{Name: "KubeVirt defaults (5 per cluster, 2 per node)", PerCluster: 5, PerNode: 2},
	{Name: "Deckhouse settings (3 per cluster, 1 per node)", PerCluster: 3, PerNode: 1},
}

// Options configure a run.
type Options struct {
	// Scenario file (default integration/scenarios/busy-node.yaml under the module root).
	Scenario string
	// TimeScale of the simulator (default 10); figures are in simulated time.
	TimeScale float64
	Kubectl   string
	Settings  []Setting
	// Progress receives a line per step.
	Progress io.Writer
	// Logs receives drover's and the simulator's logs (default discarded).
	Logs *zerolog.Logger
}

// Result is one setting's figures, in simulated time.
type Result struct {
	Setting Setting
	// Drover is the time until every VM that plain kubectl drain moves has
	// left the node; DroverAll the makespan drover reports (every VM in its
	// planned state or given up on).
	Drover, DroverAll time.Duration
	Estimate          time.Duration
	LowerBound        time.Duration
	DroverOutcome     string
	// Drain is the time until the same VMs left under kubectl drain;
	// DrainCompleted says whether the drain itself ever finished.
	Drain          time.Duration
	DrainCompleted bool
	DrainStuck     []string
}

// Never-leaving VMs of the scene under kubectl drain: legacy-1 is
// LiveMigrate but not migratable (its eviction is denied for good),
// legacy-2 is External (KubeVirt only marks it), cache-1 dirties memory
// faster than any migration transfers it.
var drainStuck = map[string]bool{"legacy-1": true, "legacy-2": true, "cache-1": true}

// Run measures every setting.
func Run(ctx context.Context, o Options) ([]Result, error) {
	if o.TimeScale == 0 {
		o.TimeScale = 10
	}
	if o.Settings == nil {
		o.Settings = Settings
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.Scenario == "" {
		root, err := moduleRoot()
		if err != nil {
			return nil, err
		}
		o.Scenario = filepath.Join(root, "integration", "scenarios", "busy-node.yaml")
	}
	scene, err := os.ReadFile(o.Scenario)
	if err != nil {
		return nil, err
	}
	var out []Result
	for _, s := range o.Settings {
		r := Result{Setting: s}
		fmt.Fprintf(o.Progress, "== %s: drover\n", s.Name)
		if err := droverRun(ctx, o, string(scene), &r); err != nil {
			return out, fmt.Errorf("%s: drover: %w", s.Name, err)
		}
		fmt.Fprintf(o.Progress, "== %s: kubectl drain on a copy of the scene\n", s.Name)
		if err := drainRun(ctx, o, string(scene), &r); err != nil {
			return out, fmt.Errorf("%s: kubectl drain: %w", s.Name, err)
		}
		out = append(out, r)
	}
	return out, nil
}

func moduleRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", fmt.Errorf("cannot find the module root")
	}
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..")), nil
}

func start(ctx context.Context, o Options, scene string, s Setting, serve bool) (*e2e.Env, error) {
	e, err := e2e.Start(ctx, e2e.Options{Scenario: scene, TimeScale: o.TimeScale, Logs: o.Logs, NoServe: !serve})
	if err != nil {
		return nil, err
	}
	l, err := e.KubeVirt.KubeVirts("").List(ctx, metav1.ListOptions{})
	if err != nil || len(l.Items) == 0 {
		e.Close()
		return nil, fmt.Errorf("read the KubeVirt CR: %v", err)
	}
	cr := &l.Items[0]
	if cr.Spec.Configuration.MigrationConfiguration == nil {
		cr.Spec.Configuration.MigrationConfiguration = &kvv1.MigrationConfiguration{}
	}
	cr.Spec.Configuration.MigrationConfiguration.ParallelMigrationsPerCluster = ptr.To(s.PerCluster)
	cr.Spec.Configuration.MigrationConfiguration.ParallelOutboundMigrationsPerNode = ptr.To(s.PerNode)
	if _, err := e.KubeVirt.KubeVirts(cr.Namespace).Update(ctx, cr, metav1.UpdateOptions{}); err != nil {
		e.Close()
		return nil, err
	}
	return e, nil
}

// leftAt watches the node until every VM of the scene but the stuck ones
// has left it (running elsewhere, or stopped) and returns when that was.
func leftAt(ctx context.Context, e *e2e.Env, node string, begin time.Time, limit time.Duration) (time.Duration, error) {
	var at time.Duration
	err := e.Poll(ctx, limit, "the movable VMs off "+node, func() (bool, string) {
		l, err := e.KubeVirt.VirtualMachineInstances("").List(ctx, metav1.ListOptions{})
		if err != nil {
			return false, err.Error()
		}
		var left []string
		for _, v := range l.Items {
			if drainStuck[v.Name] {
				continue
			}
			if v.Status.NodeName == node && !v.IsFinal() || v.Status.Phase != kvv1.Running && v.Status.Phase != "" && !v.IsFinal() {
				left = append(left, v.Name)
			}
		}
		at = time.Since(begin)
		return len(left) == 0, strings.Join(left, ",")
	})
	return at, err
}

func droverRun(ctx context.Context, o Options, scene string, r *Result) error {
	e, err := start(ctx, o, scene, r.Setting, true)
	if err != nil {
		return err
	}
	defer e.Close()
	begin := time.Now()
	done := make(chan int, 1)
	var out string
	go func() {
		code, s := e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "benchmark", "--request-id", "bench", "--force", "--wait")
		out = s
		done <- code
	}()
	wall, err := leftAt(ctx, e, "node-1", begin, 10*time.Minute)
	if err != nil {
		return err
	}
	<-done
	fmt.Fprint(o.Progress, indent(out))
	rec, ok := e.Op(ctx, consumers.MaintenanceOperationKey("node-1", "bench"))
	if !ok {
		return fmt.Errorf("no operation record")
	}
	var st maintenance.State
	if err := json.Unmarshal(rec.Data, &st); err != nil {
		return err
	}
	scale := func(d time.Duration) time.Duration { return time.Duration(float64(d) * o.TimeScale) }
	r.Drover, r.DroverAll = scale(wall), scale(st.Makespan)
	r.Estimate, r.LowerBound = st.Plan.Estimate, st.Plan.LowerBound
	r.DroverOutcome = st.Outcome
	if v := e.Sim.Violations(); len(v) > 0 {
		return fmt.Errorf("invariant violated: %v", v)
	}
	return nil
}

func drainRun(ctx context.Context, o Options, scene string, r *Result) error {
	e, err := start(ctx, o, scene, r.Setting, false)
	if err != nil {
		return err
	}
	defer e.Close()
	kubectl := o.Kubectl
	if kubectl == "" {
		if kubectl, err = e2e.Kubectl(); err != nil {
			return err
		}
	}
	dctx, cancel := context.WithCancel(ctx)
	defer cancel()
	begin := time.Now()
	cmd := exec.CommandContext(dctx, kubectl, "--kubeconfig", e.Kubeconfig(), "drain", "node-1",
		"--pod-selector", "kubevirt.io=virt-launcher", "--ignore-daemonsets", "--delete-emptydir-data", "--timeout", "10m")
	drained := make(chan error, 1)
	go func() { drained <- cmd.Run() }()
	wall, err := leftAt(ctx, e, "node-1", begin, 10*time.Minute)
	if err != nil {
		return err
	}
	r.Drain = time.Duration(float64(wall) * o.TimeScale)
	select {
	case err := <-drained:
		r.DrainCompleted = err == nil
	case <-time.After(5 * time.Second):
		cancel()
		<-drained
	}
	for name := range drainStuck {
		if v := e.VMI(ctx, "default", name); v != nil && v.Status.NodeName == "node-1" {
			r.DrainStuck = append(r.DrainStuck, name)
		}
	}
	if v := e.Sim.Violations(); len(v) > 0 {
		return fmt.Errorf("invariant violated: %v", v)
	}
	return nil
}

func indent(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return "   " + strings.Join(lines, "\n   ") + "\n"
}

// Print writes the figures side by side.
func Print(w io.Writer, rs []Result, timeScale float64) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "setting\tdrover\tplan estimate\tlower bound\tkubectl drain\tdrover/bound\tdrover/drain\tdrover, every VM settled\n")
	for _, r := range rs {
		drain := r.Drain.Round(time.Second).String()
		if !r.DrainCompleted {
			drain += " (never completes)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%.2f\t%.2f\t%s (%s)\n", r.Setting.Name, r.Drover.Round(time.Second), r.Estimate.Round(time.Second),
			r.LowerBound.Round(time.Second), drain, ratio(r.Drover, r.LowerBound), ratio(r.Drover, r.Drain), r.DroverAll.Round(time.Second), r.DroverOutcome)
	}
	_ = tw.Flush()
	fmt.Fprintf(w, "\nTimes are simulated (wall time x %g). 'drover' and 'kubectl drain' are the time until every VM that plain kubectl drain\n", timeScale)
	fmt.Fprintln(w, "moves has left node-1 (migrated, restarted elsewhere or shut down); kubectl drain never moves legacy-1 (LiveMigrate, RWO:")
	fmt.Fprintln(w, "eviction denied for good), legacy-2 (External: only marked) or cache-1 (dirties memory faster than it transfers), and never")
	fmt.Fprintln(w, "completes. drover runs with --force: it restarts legacy-1, migrates legacy-2 and gives cache-1 up after 3 failed migrations")
	fmt.Fprintln(w, "('every VM settled'). The plan's estimate and lower bound use drover's defaults (1 GiB/s, 10 s per migration) before it")
	fmt.Fprintln(w, "measured anything on this cluster, and include cache-1's migration as if it converged.")
}

func ratio(a, b time.Duration) float64 {
	if b <= 0 {
		return 0
	}
	return float64(a) / float64(b)
}
