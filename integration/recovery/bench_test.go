package recovery_test

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/integration/sim"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// benchResult is one measured recovery. Times are wall-clock; with a time
// scale above 1 the simulated world's parts (lease timeout, watchdog, VM
// start) shrink, drover's own overhead does not.
type benchResult struct {
	mode string
	vms  int
	// From the node's death (the fault) and from its last heartbeat.
	sinceDeath, total time.Duration
	// drover's phases, from its final checkpoint.
	detect, gate, cleanup, running time.Duration
	// The parts that are not drover's: the lease timeout, the wait for
	// fencing (the watchdog timeout and margin past the lease timeout, or the
	// fencing agent's answer) and the simulator's VM start (from the last
	// launcher pod's deletion to the last VM Running).
	leaseTimeout, fencingWait, vmStart time.Duration
	overhead                           time.Duration
}

var (
	benchMu      sync.Mutex
	benchResults []benchResult
)

func benchScale() float64 {
	if v := os.Getenv("DROVER_BENCH_TIME_SCALE"); v != "" {
		if f, err := strconv.ParseFloat(v, 64); err == nil && f > 0 {
			return f
		}
	}
	return 1
}

// BenchmarkRecovery (make bench-recovery): a node with 10, then 50 VMs dies,
// in watchdog mode and with a fencing agent's node.fenced event. It prints
// the phases and drover's overhead: the time from the last heartbeat to
// every VM Running, minus the lease timeout, the fencing wait and the
// simulator's VM start time. It asserts nothing about time.
func BenchmarkRecovery(b *testing.B) {
	for _, mode := range []string{"watchdog", "fencing-agent"} {
		for _, vms := range []int{10, 50} {
			b.Run(fmt.Sprintf("%s/%dVMs", mode, vms), func(b *testing.B) {
				for range b.N {
					r := benchOnce(b, mode, vms)
					b.ReportMetric(r.overhead.Seconds(), "overhead-s")
					b.ReportMetric(r.total.Seconds(), "total-s")
					benchMu.Lock()
					benchResults = append(benchResults, r)
					benchMu.Unlock()
				}
			})
		}
	}
	printBench(b)
}

func benchOnce(b *testing.B, mode string, vms int) benchResult {
	b.StopTimer()
	scale := benchScale()
	e := newEnv(b, envOptions{Scale: scale})
	big := sim.NodeOptions{CPU: "256", Memory: "1Ti", Pods: 250}
	e.controlPlane()
	e.node("n1", big, false)
	for i := range vms {
		e.vm(fmt.Sprintf("vm-%d", i+1), sim.VMOptions{Memory: "1Gi"})
	}
	for i := range vms {
		e.running(fmt.Sprintf("vm-%d", i+1), 5*time.Minute)
	}
	e.node("n2", big, false)
	e.node("n3", big, false)
	o := e.droverOptions()
	o.LogLevel = "warn"
	if mode == "watchdog" {
		o.Fencing = recovery.FencingWatchdog
	}
	e.serve(o)
	releases, started := e.watchTimes()

	allowed := func(hb time.Time) time.Time { return hb.Add(o.WatchdogTimeout + o.WatchdogMargin) }
	if mode == "fencing-agent" {
		// The fencing agent power-fences the node (it is off already) as soon
		// as drover's status says it waits at its gate, and says so.
		ctx, cancel := context.WithCancel(e.ctx)
		b.Cleanup(cancel)
		agent := make(chan time.Time, 1)
		go e.fencingAgent(ctx, "n1", agent)
		allowed = func(time.Time) time.Time {
			select {
			case t := <-agent:
				return t
			default:
				return time.Time{}
			}
		}
	}
	b.StartTimer()
	return e.benchRun(b, mode, vms, o.NodeLeaseTimeout, releases, started, allowed)
}

// benchRun fails n1 and measures its recovery. allowed says when the gate
// could open at the earliest, given the last heartbeat.
func (e *env) benchRun(b *testing.B, mode string, vms int, leaseTimeout time.Duration, releases, started *timeLog, allowed func(hb time.Time) time.Time) benchResult {
	death := time.Now()
	e.fault("n1", sim.FaultDown)
	rec := e.recoveryOf("n1", 10*time.Minute, "succeeded", succeeded)
	b.StopTimer()
	inc := incidentOf(b, rec)
	at := func(k string) time.Time {
		s, _ := inc[k].(string)
		t, _ := time.Parse(time.RFC3339Nano, s)
		return t
	}
	hb, detected, gate, cleaned, running := at("spellStart"), at("detected"), at("gateOpened"), at("cleanedUp"), at("allRunning")
	gateAllowed := allowed(hb)
	lastRelease := releases.last()
	lastStart := started.last()
	r := benchResult{mode: mode, vms: vms,
		sinceDeath: running.Sub(death), total: running.Sub(hb),
		detect: detected.Sub(hb), gate: gate.Sub(detected), cleanup: cleaned.Sub(gate), running: running.Sub(cleaned),
		leaseTimeout: leaseTimeout, fencingWait: max(gateAllowed.Sub(hb.Add(leaseTimeout)), 0), vmStart: lastStart.Sub(lastRelease)}
	r.overhead = r.total - r.leaseTimeout - r.fencingWait - r.vmStart
	e.t.Logf("%s %d VMs: %s", mode, vms, rec.Message)
	return r
}

// fencingAgent publishes node.fenced for node once drover's status says
// its recovery waits at the fencing gate, and reports when.
func (e *env) fencingAgent(ctx context.Context, node string, out chan<- time.Time) {
	subject, _ := schemas.StatusSubject(schemas.WorkflowRecovery, node)
	cons, err := e.js.OrderedConsumer(ctx, "DROVER_STATUS", jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}, DeliverPolicy: jetstream.DeliverNewPolicy})
	if err != nil {
		return
	}
	it, err := cons.Messages()
	if err != nil {
		return
	}
	go func() { <-ctx.Done(); it.Stop() }()
	for {
		m, err := it.Next()
		if err != nil {
			return
		}
		ev, err := schemas.FromHeaders(m.Headers(), m.Data())
		if err != nil {
			continue
		}
		p, err := schemas.Decode(ev)
		st, ok := p.(*schemas.Status)
		if err != nil || !ok || st.Phase != schemas.PhaseWaiting || !strings.Contains(st.Message, "fencing gate") {
			continue
		}
		fe, err := schemas.New("bench/fence-agent", "fence-"+node, &schemas.NodeFenced{Node: node, Method: "ipmi-power-off", By: "bench fence agent"})
		if err != nil {
			return
		}
		t0 := time.Now()
		if _, err := (&producers.Publisher{JS: e.js}).Publish(ctx, fe); err == nil {
			out <- t0
			return
		}
	}
}

// timeLog keeps the times of events.
type timeLog struct {
	mu    sync.Mutex
	times []time.Time
}

func (l *timeLog) add(t time.Time) {
	l.mu.Lock()
	l.times = append(l.times, t)
	l.mu.Unlock()
}

func (l *timeLog) last() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	sort.Slice(l.times, func(i, j int) bool { return l.times[i].Before(l.times[j]) })
	if len(l.times) == 0 {
		return time.Time{}
	}
	return l.times[len(l.times)-1]
}

// watchTimes records when n1's virt-launcher pods leave the API and when
// VMIs start Running elsewhere.
func (e *env) watchTimes() (releases, started *timeLog) {
	releases, started = &timeLog{}, &timeLog{}
	pw, err := e.s.Kube.CoreV1().Pods(ns).Watch(e.ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("spec.nodeName", "n1").String(), LabelSelector: "kubevirt.io=virt-launcher"})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(pw.Stop)
	go func() {
		for ev := range pw.ResultChan() {
			if ev.Type == watch.Deleted {
				releases.add(time.Now())
			}
		}
	}()
	vw, err := e.s.KubeVirt.VirtualMachineInstances(ns).Watch(e.ctx, metav1.ListOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(vw.Stop)
	go func() {
		seen := map[string]bool{}
		for ev := range vw.ResultChan() {
			vmi, ok := ev.Object.(*kvv1.VirtualMachineInstance)
			if !ok || vmi.Status.Phase != kvv1.Running || vmi.Status.NodeName == "n1" || seen[string(vmi.UID)] {
				continue
			}
			seen[string(vmi.UID)] = true
			started.add(time.Now())
		}
	}()
	return releases, started
}

func printBench(b *testing.B) {
	benchMu.Lock()
	defer benchMu.Unlock()
	if len(benchResults) == 0 {
		return
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nRecovery of a node that dies (time scale %g: wall-clock times; the lease timeout, fencing wait and VM start are the simulator's, scaled)\n", benchScale())
	tw := tabwriter.NewWriter(&sb, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "mode\tVMs\tdeath->all Running\tlast heartbeat->all Running\tdetect\tgate\tclean-up\tall Running\t|\tlease timeout\tfencing wait\tVM start\tdrover overhead\t")
	r2 := func(d time.Duration) string { return d.Round(time.Millisecond).String() }
	for _, r := range benchResults {
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t|\t%s\t%s\t%s\t%s\t\n", r.mode, r.vms, r2(r.sinceDeath), r2(r.total),
			r2(r.detect), r2(r.gate), r2(r.cleanup), r2(r.running), r2(r.leaseTimeout), r2(r.fencingWait), r2(r.vmStart), r2(r.overhead))
	}
	_ = tw.Flush()
	fmt.Fprintln(&sb, "overhead = (last heartbeat -> all Running) - lease timeout - fencing wait - VM start; detect includes the lease timeout, gate the fencing wait")
	fmt.Fprint(os.Stdout, sb.String())
	benchResults = nil
}
