// Command drover-demo is `make demo`: a real kube-apiserver and etcd, the
// KubeVirt/kubelet simulator and drover, narrated. It finishes on its own and
// leaves no process behind.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/drover-io/drover/integration/demo"
)

func main() {
	o := demo.Options{Out: os.Stdout, Bench: true}
	flag.IntVar(&o.Nodes, "nodes", 4, "nodes")
	flag.IntVar(&o.VMs, "vms", 12, "VMs (mixed sizes and run strategies)")
	flag.Float64Var(&o.TimeScale, "time-scale", 10, "how much faster than real time the simulated world runs")
	flag.StringVar(&o.LogDir, "log-dir", "", "where drover and the simulator log (default: a temporary folder)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 8*time.Minute)
	defer cancel()
	start := time.Now()
	sum, err := demo.Run(ctx, o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "drover-demo:", err)
		os.Exit(1)
	}
	fmt.Printf("\ndemo finished in %s\n", time.Since(start).Round(time.Second))
	if len(sum.Violations) > 0 {
		os.Exit(1)
	}
}
