package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	kvclient "kubevirt.io/client-go/kubevirt/typed/core/v1"

	"github.com/drover-io/drover/cmd/drover/app/web"
	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/maintenance"
	"github.com/drover-io/drover/handlers/migration"
	"github.com/drover-io/drover/handlers/observe"
	"github.com/drover-io/drover/handlers/platform"
	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/natsauth"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/producers/alertmanager"
	"github.com/drover-io/drover/producers/evacuation"
	"github.com/drover-io/drover/producers/gitops"
	"github.com/drover-io/drover/producers/ingress"
	"github.com/drover-io/drover/producers/nodemaintenance"
	"github.com/drover-io/drover/producers/nodewatch"
	"github.com/drover-io/drover/schemas"
)

// eventRecorder sends Kubernetes Events through the API server.
func eventRecorder(kube kubernetes.Interface, log zerolog.Logger) record.EventBroadcaster {
	b := record.NewBroadcaster()
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: kube.CoreV1().Events("")})
	b.StartEventWatcher(func(e *corev1.Event) {
		log.Debug().Str("object", e.InvolvedObject.Kind+" "+e.InvolvedObject.Namespace+"/"+e.InvolvedObject.Name).
			Str("reason", e.Reason).Msg(e.Message)
	})
	return b
}

// Version is set at build time (-ldflags -X).
var Version = "dev"

// Info tells a caller where a started server can be reached.
type Info struct {
	NATSURL  string
	HTTPAddr string
}

// kubeCheckTimeout bounds the start-up check of the Kubernetes API, so a
// wrong kubeconfig fails fast (well inside 15 s) instead of hanging.
const kubeCheckTimeout = 10 * time.Second

// setTimeFormat sets zerolog's global time format once; the global must not
// change while anything logs.
var setTimeFormat sync.Once

// NewLogger builds the process logger: JSON, or a console writer.
func NewLogger(w io.Writer, level, format string) (zerolog.Logger, error) {
	lvl, err := zerolog.ParseLevel(level)
	if err != nil || level == "" {
		return zerolog.Nop(), usageError{fmt.Errorf("log-level must be debug, info, warn or error, got %q", level)}
	}
	setTimeFormat.Do(func() { zerolog.TimeFieldFormat = time.RFC3339Nano })
	if format == "console" {
		w = zerolog.ConsoleWriter{Out: w, TimeFormat: "15:04:05.000"}
	}
	return zerolog.New(w).Level(lvl).With().Timestamp().Logger(), nil
}

// Serve runs drover until ctx ends: it checks the cluster, starts or joins
// NATS, serves metrics and runs every workflow's consumer. ready, if not nil,
// is called once everything listens.
func Serve(ctx context.Context, o Options, log zerolog.Logger, ready func(Info)) (err error) {
	var cleanups []func() error
	defer func() {
		for i := len(cleanups) - 1; i >= 0; i-- {
			err = errors.Join(err, cleanups[i]())
		}
	}()

	kubeCfg, kube, dyn, err := connectKube(ctx, o.Kubeconfig)
	if err != nil {
		return err
	}
	if o.NodeMaintenanceCRD && dyn == nil {
		return usageError{errors.New("nodemaintenance-crd needs a Kubernetes cluster (--kubeconfig or in-cluster)")}
	}
	if kube == nil {
		log.Warn().Msg("no Kubernetes API configured: events are recorded, no cluster is inspected or changed")
	}

	url := o.NATSURL
	natsOpts, err := o.Client.natsOptions("drover-serve")
	if err != nil {
		return err
	}
	if url == "" {
		var auth *natsauth.File
		if o.NATSAuthFile != "" {
			if auth, err = natsauth.LoadFile(o.NATSAuthFile); err != nil {
				return err
			}
		}
		ns, svc, err := startEmbedded(o.NATSListen, o.DataDir, auth)
		if err != nil {
			return err
		}
		cleanups = append(cleanups, func() error { ns.Shutdown(); ns.WaitForShutdown(); return nil })
		url = ns.ClientURL()
		natsOpts = append([]nats.Option{nats.Name("drover-serve"), nats.InProcessServer(ns)}, svc...)
		log.Info().Str("url", url).Str("dataDir", o.DataDir).Msg("embedded NATS JetStream server started")
		if auth == nil {
			log.Warn().Str("listen", o.NATSListen).Msg("embedded NATS server is unauthenticated: any local process can publish any request, node.fenced included; pass --nats-auth-file to require credentials")
		} else {
			log.Info().Str("authFile", o.NATSAuthFile).Interface("users", auth.Count()).Msg("embedded NATS server accepts only the auth file's users, each with its role's permissions")
		}
	}
	natsOpts = append(natsOpts, nats.MaxReconnects(-1),
		// A refused subject is a configuration error (the drover role on an
		// external server), not something a retry fixes: say so.
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) { log.Error().Err(err).Msg("NATS error") }),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) { log.Warn().Err(err).Msg("NATS disconnected") }),
		nats.ReconnectHandler(func(c *nats.Conn) { log.Info().Str("url", c.ConnectedUrl()).Msg("NATS reconnected") }))
	nc, err := nats.Connect(url, natsOpts...)
	if err != nil {
		return fmt.Errorf("connect to NATS at %s: %w", url, err)
	}
	cleanups = append(cleanups, func() error { nc.Close(); return nil })

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := consumers.NewMetrics(reg)

	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	rcfg, err := o.RecoveryConfig()
	if err != nil {
		return usageError{err}
	}
	rmetrics := recovery.NewMetrics(reg)
	mmetrics := maintenance.NewMetrics(reg)
	settings, err := settingsBucket(ctx, js, o.Replicas)
	if err != nil {
		return err
	}
	h := &observe.Handler{Kube: kube, Dynamic: dyn}
	var cluster *platform.Cluster
	if kube != nil {
		cluster, err = platform.New(kubeCfg, platform.Options{Platform: o.Platform, Metrics: platform.NewMetrics(reg),
			Log: log.With().Str("component", "cluster").Logger()})
		if err != nil {
			return err
		}
		// The caches outlive ctx: handlers finishing within the shutdown
		// grace still read them; the cleanup stops them after the runtime.
		clusterCtx, stopCluster := context.WithCancel(context.WithoutCancel(ctx))
		clusterDone := make(chan error, 1)
		go func() { clusterDone <- cluster.Run(clusterCtx) }()
		cleanups = append(cleanups, func() error { stopCluster(); return <-clusterDone })
	}
	mover := &platform.Mover{Cluster: cluster}
	var wfs []consumers.Workflow
	for _, name := range schemas.Workflows() {
		wf := consumers.Workflow{Name: name, Concurrency: o.WorkflowConcurrency(name), Handler: h}
		if kube != nil {
			switch name {
			case schemas.WorkflowMaintenance:
				wf.Handler = &maintenance.Handler{Cluster: cluster, Mover: mover, Metrics: mmetrics}
			case schemas.WorkflowMigration:
				wf.Handler = &migration.Handler{Cluster: cluster, Mover: mover}
			}
			// Operations named from the live cluster: one incident of a node
			// is one recovery whoever reports it; a migration holds its VM's node.
			switch name {
			case schemas.WorkflowRecovery:
				events := eventRecorder(kube, log)
				cleanups = append(cleanups, func() error { events.Shutdown(); return nil })
				wf.Resolver = &recovery.Incident{Kube: kube, LeaseTimeout: o.NodeLeaseTimeout}
				wf.Handler = &recovery.Handler{Kube: kube, Dynamic: dyn, Config: rcfg, Pause: kvPauser{settings},
					Metrics: rmetrics, Events: events.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "drover"})}
				if rcfg.Default.Fencing == recovery.FencingNone {
					log.Warn().Msg("UNSAFE: --fencing none: recoveries release a failed node's VMs without proof that the node is dead; a partitioned node's VMs can run twice")
				}
			case schemas.WorkflowMigration:
				wf.Resolver = &migration.NodeLock{Dynamic: dyn}
			}
		}
		wfs = append(wfs, wf)
	}
	rt, err := consumers.NewRuntime(nc, o.RuntimeConfig(), log, metrics, wfs...)
	if err != nil {
		return err
	}

	pub := &producers.Publisher{JS: js}
	producerMetrics := producers.NewMetrics(reg)
	var token []byte
	if o.AlertmanagerTokenFile != "" {
		b, err := os.ReadFile(o.AlertmanagerTokenFile)
		if err != nil {
			return usageError{fmt.Errorf("alertmanager-token-file: %w", err)}
		}
		token = []byte(strings.TrimSpace(string(b)))
	} else {
		log.Info().Msg("no --alertmanager-token-file: POST " + alertmanager.Path + " refuses every request")
	}
	receiver := &alertmanager.Receiver{Publisher: pub, Token: token, Alerts: o.AlertNames(), NodeLabel: o.AlertmanagerNodeLabel,
		Log: log.With().Str("component", "alertmanager").Logger(), Metrics: producerMetrics}
	stopControl, err := serveRecoveryControl(ctx, nc, settings, log.With().Str("component", "recovery-control").Logger())
	if err != nil {
		return err
	}
	cleanups = append(cleanups, func() error { stopControl(); return nil })
	var runners []func(context.Context) error
	if kube != nil && o.NodeWatch {
		w := &nodewatch.Watcher{Kube: kube, Publisher: pub, LeaseTimeout: o.NodeLeaseTimeout,
			Log: log.With().Str("component", "nodewatch").Logger(), Metrics: producerMetrics}
		runners = append(runners, w.Start)
	}
	if kube != nil {
		capacity := &recovery.Capacity{Kube: kube, Dynamic: dyn, LeaseTimeout: o.NodeLeaseTimeout, Metrics: rmetrics,
			Log: log.With().Str("component", "capacity").Logger(),
			Report: func(ctx context.Context, n int, at time.Time) {
				if err := putJSON(ctx, settings, keyFailoverCapacity, capacityReport{Nodes: n, At: at.UTC(), By: rt.ID()}); err != nil && ctx.Err() == nil {
					log.Debug().Err(err).Msg("could not store the failover capacity")
				}
			}}
		runners = append(runners, capacity.Start)
	}

	ln, err := net.Listen("tcp", o.HTTPListen)
	if err != nil {
		return fmt.Errorf("http-listen %s: %w", o.HTTPListen, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	page := &web.Server{NC: nc, JS: js, Log: log.With().Str("component", "web").Logger()}
	if o.IngressTokensFile != "" {
		tokens, err := ingress.NewTokenSource(o.IngressTokensFile, func(err error) { log.Error().Err(err).Msg("ingress tokens") })
		if err != nil {
			return usageError{err}
		}
		mux.Handle("/events", &ingress.Handler{Publisher: pub, Tokens: tokens.Tokens,
			Metrics: producerMetrics, Log: log.With().Str("producer", ingress.Source).Logger()})
		// The page is behind the same tokens: any of them may read it.
		page.Authorize = func(tok string) bool { _, _, ok := tokens.Tokens().Lookup(tok); return tok != "" && ok }
		log.Info().Str("tokens", o.IngressTokensFile).Msg("HTTP CloudEvents ingress on /events")
	}
	mux.Handle("/", page.Handler())
	mux.Handle(alertmanager.Path, receiver)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	apiReady := kubeReadiness(kube)
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		var problems []string
		if !nc.IsConnected() {
			problems = append(problems, "NATS not connected")
		}
		if !rt.Bound() {
			problems = append(problems, "consumers not bound")
		}
		if err := apiReady(r.Context()); err != nil {
			problems = append(problems, "Kubernetes API: "+err.Error())
		}
		if len(problems) > 0 {
			http.Error(w, strings.Join(problems, "; "), http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ok\n")
	})
	if kube != nil {
		// drover is KubeVirt's External eviction handler: a drain of a VMI
		// with evictionStrategy External becomes a migration request.
		kv, err := kvclient.NewForConfig(kubeCfg)
		if err != nil {
			return err
		}
		w := &evacuation.Watcher{KubeVirt: kv, Publisher: &producers.Publisher{JS: pub.JS, Metrics: producerMetrics, Source: "evacuation"}, Log: log.With().Str("component", "evacuation").Logger()}
		cleanups = append(cleanups, runWithStreams(ctx, nc, w.Start))
	}
	if o.Git.URL != "" {
		poller, err := gitops.New(gitops.Config{URL: o.Git.URL, Branch: o.Git.Branch, Path: o.Git.Path, Interval: o.Git.Interval,
			TokenFile: o.Git.TokenFile, CAFile: o.Git.CAFile, SSHKeyFile: o.Git.SSHKeyFile, KnownHostsFile: o.Git.KnownHostsFile,
			WebhookSecretFile: o.Git.WebhookSecretFile, TrustedKeysFile: o.Git.TrustedKeysFile, Replicas: o.Replicas,
			Metrics: producerMetrics}, js, log)
		if err != nil {
			return usageError{err}
		}
		mux.Handle(gitops.WebhookPath, poller)
		cleanups = append(cleanups, runWithStreams(ctx, nc, poller.Start))
		log.Info().Str("repo", o.Git.URL).Str("branch", o.Git.Branch).Str("path", o.Git.Path).Msg("Git producer polling")
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error().Err(err).Msg("http server stopped")
		}
	}()
	cleanups = append(cleanups, func() error {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
	log.Info().Str("version", Version).Str("http", ln.Addr().String()).Str("nats", url).Msg("drover serving")

	errc := make(chan error, 1)
	go func() { errc <- rt.Start(ctx) }()
	// Start declares the streams first; producers and the caller publish
	// once they exist.
	if err := waitForStreams(ctx, nc); err != nil {
		return errors.Join(err, <-errc)
	}
	var producersWG sync.WaitGroup
	for _, run := range runners {
		producersWG.Add(1)
		go func() {
			defer producersWG.Done()
			if err := run(ctx); err != nil {
				log.Error().Err(err).Msg("producer stopped")
			}
		}()
	}
	cleanups = append(cleanups, func() error { producersWG.Wait(); return nil })
	if o.NodeMaintenanceCRD {
		nmw := &nodemaintenance.Watcher{Dynamic: dyn, JS: js, Publisher: &producers.Publisher{JS: js},
			Metrics: producerMetrics, Log: log.With().Str("producer", nodemaintenance.Source).Logger()}
		nmDone := make(chan struct{})
		go func() { defer close(nmDone); _ = nmw.Start(ctx) }()
		cleanups = append(cleanups, func() error { <-nmDone; return nil })
		log.Info().Msg("watching NodeMaintenance resources")
	}
	if ready != nil {
		ready(Info{NATSURL: url, HTTPAddr: ln.Addr().String()})
	}
	err = <-errc
	log.Info().Err(err).Msg("drover stopped")
	return err
}

// runWithStreams runs a producer once the streams exist (it publishes),
// until ctx ends or the returned cleanup stops it and waits for it.
func runWithStreams(ctx context.Context, nc *nats.Conn, start func(context.Context) error) func() error {
	pctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		if err := waitForStreams(pctx, nc); err != nil {
			if pctx.Err() != nil {
				err = nil
			}
			done <- err
			return
		}
		done <- start(pctx)
	}()
	return func() error {
		stop()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			return err
		}
		return nil
	}
}

func waitForStreams(ctx context.Context, nc *nats.Conn) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		js, err := jetstream.New(nc)
		if err == nil {
			// Setup declares the consumers last, so the last one's presence
			// means everything exists.
			if _, err = js.Consumer(ctx, consumers.StreamRequests, schemas.WorkflowMigration); err == nil {
				return nil
			}
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			return fmt.Errorf("streams were not declared within 30s: %v", err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// kubeReadiness returns a check of the Kubernetes API server's /readyz,
// answered from a cache for a few seconds so that probes do not hammer it.
// Without a cluster it always passes.
func kubeReadiness(kube kubernetes.Interface) func(context.Context) error {
	if kube == nil {
		return func(context.Context) error { return nil }
	}
	var mu sync.Mutex
	var last time.Time
	var lastErr error
	return func(ctx context.Context) error {
		mu.Lock()
		defer mu.Unlock()
		if time.Since(last) < 5*time.Second {
			return lastErr
		}
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		_, lastErr = kube.Discovery().RESTClient().Get().AbsPath("/readyz").Do(cctx).Raw()
		last = time.Now()
		return lastErr
	}
}

// connectKube builds clients from kubeconfig (or the in-cluster config when
// kubeconfig is empty and drover runs in a pod) and checks the API answers.
// With neither it returns nil clients.
func connectKube(ctx context.Context, kubeconfig string) (*rest.Config, kubernetes.Interface, dynamic.Interface, error) {
	var cfg *rest.Config
	var err error
	switch {
	case kubeconfig != "":
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
		}
	case os.Getenv("KUBERNETES_SERVICE_HOST") != "":
		cfg, err = rest.InClusterConfig()
		if err != nil {
			return nil, nil, nil, fmt.Errorf("in-cluster Kubernetes config: %w", err)
		}
	default:
		return nil, nil, nil, nil
	}
	cfg.Timeout = kubeCheckTimeout
	if cfg.QPS == 0 {
		// client-go's default (5/s, bursts of 10) would make the clean-up of
		// a node with 50 VMs take seconds; recovery is latency-bound.
		cfg.QPS, cfg.Burst = 100, 200
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("kubernetes client for %s: %w", cfg.Host, err)
	}
	cctx, cancel := context.WithTimeout(ctx, kubeCheckTimeout)
	defer cancel()
	if _, err := kube.Discovery().RESTClient().Get().AbsPath("/version").Do(cctx).Raw(); err != nil {
		return nil, nil, nil, fmt.Errorf("cannot reach the Kubernetes API server at %s: %w", cfg.Host, err)
	}
	cfg.Timeout = 0
	kube, err = kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, nil, nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, nil, nil, err
	}
	return cfg, kube, dyn, nil
}
