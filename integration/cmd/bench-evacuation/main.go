// Command bench-evacuation is `make bench-evacuation`: drover's evacuation of
// the busy-node scenario next to the plan's estimate and lower bound and to
// plain kubectl drain on a copy of the scene, under KubeVirt's and
// Deckhouse's migration limits. It asserts nothing about time.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/rs/zerolog"

	"github.com/drover-io/drover/integration/bench"
)

func main() {
	scale := flag.Float64("time-scale", 10, "how much faster the simulated world runs")
	scenario := flag.String("scenario", "", "scenario file (default integration/scenarios/busy-node.yaml)")
	logs := flag.String("logs", filepath.Join(os.TempDir(), "drover-bench-evacuation.log"), "file for drover's and the simulator's logs")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	f, err := os.Create(*logs)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer f.Close()
	log := zerolog.New(f).With().Timestamp().Logger()
	fmt.Printf("logs: %s\n", *logs)
	rs, err := bench.Run(ctx, bench.Options{Scenario: *scenario, TimeScale: *scale, Progress: os.Stdout, Logs: &log})
	fmt.Println()
	bench.Print(os.Stdout, rs, *scale)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-evacuation:", err)
		os.Exit(1)
	}
}
