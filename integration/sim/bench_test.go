package sim

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/integration/cluster"
)

// BenchmarkScale100x1000 seeds the shipped 100-node, 1,000-VM scenario at time scale 10 and
// prints how long seeding took (until every VM runs) and the average CPU the simulator used over
// a steady window, from process CPU time, next to the API server's and etcd's. It asserts
// nothing about time (`make bench-sim`). SIM_BENCH_STEADY sets the window (default 30s);
// SIM_BENCH_CPUPROFILE=prefix writes CPU profiles of the seeding (prefix-seed.pprof) and of the
// steady window (prefix-steady.pprof).
func BenchmarkScale100x1000(b *testing.B) {
	window := 30 * time.Second
	if v := os.Getenv("SIM_BENCH_STEADY"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			b.Fatalf("SIM_BENCH_STEADY: %v", err)
		}
		window = d
	}
	sc, err := LoadScenario(filepath.Join(scenarioDir, "scale-100x1000.yaml"))
	if err != nil {
		b.Fatal(err)
	}
	for i := 0; i < b.N; i++ {
		benchScenario(b, sc, 10, window)
	}
}

func benchScenario(b *testing.B, sc *Scenario, timeScale float64, window time.Duration) {
	c := cluster.StartT(b)
	s, err := New(c.Config, Options{TimeScale: timeScale})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			b.Errorf("Run: %v", err)
		}
	}()
	select {
	case <-s.Ready():
	case err := <-done:
		b.Fatalf("Run: %v", err)
	}
	apiPID, etcdPID := c.PIDs()

	profile := os.Getenv("SIM_BENCH_CPUPROFILE")
	stopProfile := startProfile(b, profile, "seed")
	begin := time.Now()
	cpu0 := processCPU()
	if _, err := s.SeedScenario(ctx, sc); err != nil {
		b.Fatal(err)
	}
	created := time.Since(begin)
	want := len(sc.VMs)
	deadline := time.Now().Add(15 * time.Minute)
	for running := 0; running < want; {
		running = 0
		for _, o := range s.vmiInformer.GetStore().List() {
			vmi := o.(*kvv1.VirtualMachineInstance)
			if c := vmiCondition(vmi, kvv1.VirtualMachineInstanceReady); vmi.Status.Phase == kvv1.Running && c != nil && c.Status == corev1.ConditionTrue {
				running++
			}
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d VMs running after 15 minutes", running, want)
		}
		time.Sleep(500 * time.Millisecond)
	}
	seeded := time.Since(begin)
	seedCPU := processCPU() - cpu0
	stopProfile()

	// Let the last writes of the start-up settle, then measure.
	time.Sleep(5 * time.Second)
	simCPU0, apiCPU0, etcdCPU0 := processCPU(), pidCPU(apiPID), pidCPU(etcdPID)
	stopProfile = startProfile(b, profile, "steady")
	start := time.Now()
	time.Sleep(window)
	wall := time.Since(start)
	stopProfile()
	cores := func(d time.Duration) float64 { return d.Seconds() / wall.Seconds() }
	simCores := cores(processCPU() - simCPU0)
	apiCores, etcdCores := cores(pidCPU(apiPID)-apiCPU0), cores(pidCPU(etcdPID)-etcdCPU0)
	if v := s.Violations(); len(v) > 0 {
		b.Errorf("invariants violated: %v", v)
	}

	b.ReportMetric(seeded.Seconds(), "seed-s")
	b.ReportMetric(simCores, "sim-cores")
	fmt.Printf("scene: %d nodes, %d VMs, time scale %g\n", len(sc.Nodes), want, timeScale)
	fmt.Printf("seeding: objects created in %s, every VM running after %s (simulator CPU %.1fs, %.2f cores)\n",
		created.Round(100*time.Millisecond), seeded.Round(100*time.Millisecond), seedCPU.Seconds(), seedCPU.Seconds()/seeded.Seconds())
	fmt.Printf("steady (%s window): simulator %.3f cores, kube-apiserver %.3f cores, etcd %.3f cores\n",
		wall.Round(time.Second), simCores, apiCores, etcdCores)
}

// startProfile writes a CPU profile to prefix-phase.pprof until the returned func is called;
// with no prefix it does nothing.
func startProfile(b *testing.B, prefix, phase string) func() {
	if prefix == "" {
		return func() {}
	}
	f, err := os.Create(prefix + "-" + phase + ".pprof")
	if err != nil {
		b.Fatal(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		b.Fatal(err)
	}
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			b.Error(err)
		}
	}
}

// processCPU is the CPU time (user and system) this process has used.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// pidCPU is the CPU time process pid has used, from /proc (0 when unknown).
func pidCPU(pid int) time.Duration {
	if pid <= 0 {
		return 0
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command (which may hold spaces) end with ')'.
	f := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	const ticks = 100 // USER_HZ on Linux
	return time.Duration(utime+stime) * time.Second / ticks
}
