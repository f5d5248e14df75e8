// Command drover-sim runs the KubeVirt/kubelet simulator against any
// kubeconfig: it installs the CRDs when missing, creates nodes and VMs, and
// plays kubelets, scheduler and KubeVirt until SIGINT or SIGTERM.
//
//	go run ./integration/cmd/drover-sim --kubeconfig FILE [--nodes N] [--vms M] [--platform kubevirt|deckhouse] [--time-scale X]
//	go run ./integration/cmd/drover-sim --kubeconfig FILE --scenario integration/scenarios/busy-node.yaml [--time-scale X]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/rs/zerolog"
	"golang.org/x/term"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/drover-io/drover/integration/sim"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "drover-sim:", err)
		stop()
		os.Exit(1)
	}
}

// run parses args, then seeds and runs the simulator until ctx ends.
func run(ctx context.Context, args []string, stderr *os.File) error {
	fs := flag.NewFlagSet("drover-sim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		kubeconfig = fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig of the cluster to simulate in")
		nodes      = fs.Int("nodes", 4, "nodes to create")
		vms        = fs.Int("vms", 12, "VMs to create (mixed sizes and run strategies)")
		platform   = fs.String("platform", sim.PlatformKubeVirt, "kubevirt or deckhouse")
		namespace  = fs.String("namespace", "default", "namespace of the VMs")
		timeScale  = fs.Float64("time-scale", 1, "how much faster than real time the simulated world runs")
		webhook    = fs.String("webhook-addr", "", "host:port the eviction webhook listens on; the API server must reach it there (default 127.0.0.1, random port)")
		watchdog   = fs.Duration("watchdog-timeout", 0, "arm a watchdog of this timeout on every node (0: none)")
		scenario   = fs.String("scenario", "", "seed the cluster a scenario file describes (YAML, see integration/scenarios) instead of --nodes/--vms")
		level      = fs.String("log-level", "info", "zerolog level")
		logJSON    = fs.Bool("log-json", false, "log JSON even on a terminal")
	)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *kubeconfig == "" {
		return errors.New("--kubeconfig is required")
	}
	var sc *sim.Scenario
	if *scenario != "" {
		var generated []string
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "nodes", "vms", "platform", "namespace", "watchdog-timeout":
				generated = append(generated, "--"+f.Name)
			}
		})
		if len(generated) > 0 {
			return fmt.Errorf("--scenario describes the whole cluster; drop %s", strings.Join(generated, ", "))
		}
		var err error
		if sc, err = sim.LoadScenario(*scenario); err != nil {
			return err
		}
	} else {
		if *platform != sim.PlatformKubeVirt && *platform != sim.PlatformDeckhouse {
			return fmt.Errorf("--platform %q: want %s or %s", *platform, sim.PlatformKubeVirt, sim.PlatformDeckhouse)
		}
		sc = sim.SeedOptions{Nodes: *nodes, VMs: *vms, Platform: *platform, Namespace: *namespace, Node: sim.NodeOptions{WatchdogTimeout: *watchdog}}.Scenario()
		if err := sc.Validate(); err != nil {
			return err
		}
	}
	lvl, err := zerolog.ParseLevel(*level)
	if err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	var log zerolog.Logger
	if !*logJSON && term.IsTerminal(int(stderr.Fd())) {
		log = zerolog.New(zerolog.ConsoleWriter{Out: stderr, TimeFormat: "15:04:05.000"})
	} else {
		log = zerolog.New(stderr)
	}
	log = log.Level(lvl).With().Timestamp().Str("component", "drover-sim").Logger()

	cfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return fmt.Errorf("load kubeconfig %s: %w", *kubeconfig, err)
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()

	opts := sim.Options{TimeScale: *timeScale, Logger: &log, WebhookListenAddr: *webhook}
	sc.Configure(&opts) // where KubeVirt's pods start
	s, err := sim.New(cfg, opts)
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	select {
	case <-s.Ready():
	case err := <-done:
		return err
	}
	res, err := s.SeedScenario(ctx, sc)
	if err != nil {
		stop()
		<-done
		return err
	}
	log.Info().Strs("nodes", res.Nodes).Strs("vms", res.VMs).Str("platform", sc.Platform()).Float64("timeScale", *timeScale).
		Msg("seeded; faults: kubectl annotate node NAME " + sim.AnnotationFault + "=down|partitioned|reboot")
	err = <-done
	if v := s.Violations(); len(v) > 0 {
		for _, x := range v {
			log.Error().Str("violation", x.String()).Msg("invariant violated during the run")
		}
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	log.Info().Msg("stopped")
	return nil
}
