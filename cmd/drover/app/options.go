package app

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"sigs.k8s.io/yaml"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/producers/alertmanager"
)

// Options configure `drover serve`. Every field can be set in the YAML
// configuration file, by a DROVER_* environment variable and by a flag;
// precedence is flag > environment > file > default.
type Options struct {
	// NATSURL joins an external NATS (cluster); empty runs an embedded server.
	NATSURL string `json:"natsURL"`
	// NATSListen is where the embedded server listens for clients.
	NATSListen string `json:"natsListen"`
	// NATSAuthFile lists the users the embedded server accepts and their
	// roles (natsauth); without it the server accepts anyone, so it may
	// listen only on a loopback address.
	NATSAuthFile string `json:"natsAuthFile"`
	// NodeMaintenanceCRD turns on the NodeMaintenance resource watcher.
	NodeMaintenanceCRD bool `json:"nodemaintenanceCRD"`
	// IngressTokensFile turns on POST /events (the HTTP CloudEvents ingress)
	// for the tokens it lists.
	IngressTokensFile string `json:"ingressTokensFile"`
	// DataDir holds the embedded server's JetStream store.
	DataDir string `json:"dataDir"`
	// Kubeconfig is the cluster to act on; empty: in-cluster config if
	// present, else no cluster (events are recorded, nothing acts).
	Kubeconfig string `json:"kubeconfig"`
	// HTTPListen serves /metrics, /healthz and /readyz.
	HTTPListen string `json:"httpListen"`
	// Replicas of streams and buckets (1 embedded, 3 in a cluster).
	Replicas int `json:"replicas"`
	// Concurrency is the number of worker slots per workflow; the
	// per-workflow fields override it when set.
	Concurrency            int `json:"concurrency"`
	MaintenanceConcurrency int `json:"maintenanceConcurrency"`
	RecoveryConcurrency    int `json:"recoveryConcurrency"`
	MigrationConcurrency   int `json:"migrationConcurrency"`
	// AckWait, LeaseTTL, MaxAttempts and DuplicateWindow tune the runtime.
	AckWait         time.Duration `json:"ackWait"`
	LeaseTTL        time.Duration `json:"leaseTTL"`
	MaxAttempts     int           `json:"maxAttempts"`
	DuplicateWindow time.Duration `json:"duplicateWindow"`
	// Reconfigure writes this replica's ack wait and lease TTL over the
	// values the server holds (otherwise a replica adopts the server's).
	Reconfigure bool `json:"reconfigure"`
	// ShutdownGrace bounds how long in-flight handlers may finish on SIGTERM.
	ShutdownGrace time.Duration `json:"shutdownGrace"`
	// LogLevel is debug, info, warn or error; LogFormat json or console.
	LogLevel  string `json:"logLevel"`
	LogFormat string `json:"logFormat"`
	// Platform forces kubevirt or deckhouse; empty decides per VM (a VMI
	// owned by a Deckhouse VirtualMachine is migrated with its operations).
	Platform string `json:"platform"`
	// NATS client credentials when joining an external server.
	Client ClientOptions `json:"client"`

	// NodeWatch runs the node watcher (with a cluster configured).
	NodeWatch bool `json:"nodewatch"`
	// NodeLeaseTimeout: a kubelet Lease this old makes its node not ready.
	NodeLeaseTimeout time.Duration `json:"nodeLeaseTimeout"`
	// Fencing, WatchdogTimeout and WatchdogMargin are the default recovery
	// policy; RecoveryPolicies (config file key recovery.policies) set
	// others by node selector.
	Fencing          string            `json:"fencing"`
	WatchdogTimeout  time.Duration     `json:"watchdogTimeout"`
	WatchdogMargin   time.Duration     `json:"watchdogMargin"`
	RecoveryPolicies []recovery.Policy `json:"recoveryPolicies,omitempty"`
	// StormMaxUnhealthy is the storm guard's limit: "30%" or a number of nodes.
	StormMaxUnhealthy string `json:"stormMaxUnhealthy"`
	// Alertmanager receiver: mapped alert names (comma-separated), the
	// label naming the node, and the file holding the shared token
	// (the receiver refuses every request without one).
	AlertmanagerAlerts    string `json:"alertmanagerAlerts"`
	AlertmanagerNodeLabel string `json:"alertmanagerNodeLabel"`
	AlertmanagerTokenFile string `json:"alertmanagerTokenFile"`
	// Git configures the Git producer (off without a URL).
	Git GitOptions `json:"git"`
}

// GitOptions configure the Git producer of `drover serve` (--git-*).
type GitOptions struct {
	URL               string        `json:"url"`
	Branch            string        `json:"branch"`
	Path              string        `json:"path"`
	Interval          time.Duration `json:"interval"`
	TokenFile         string        `json:"tokenFile"`
	CAFile            string        `json:"caFile"`
	SSHKeyFile        string        `json:"sshKeyFile"`
	KnownHostsFile    string        `json:"knownHostsFile"`
	WebhookSecretFile string        `json:"webhookSecretFile"`
	TrustedKeysFile   string        `json:"trustedKeysFile"`
}

// DefaultOptions are the defaults of `drover serve`.
func DefaultOptions() Options {
	return Options{
		NATSListen:      "127.0.0.1:4222",
		DataDir:         "./drover-data",
		HTTPListen:      "127.0.0.1:9090",
		Replicas:        1,
		Concurrency:     4,
		AckWait:         30 * time.Second,
		MaxAttempts:     10,
		DuplicateWindow: 30 * time.Minute,
		ShutdownGrace:   20 * time.Second,
		LogLevel:        "info",
		LogFormat:       "json",

		NodeWatch:             true,
		NodeLeaseTimeout:      recovery.DefaultLeaseTimeout,
		Fencing:               recovery.FencingTaint,
		WatchdogTimeout:       recovery.DefaultWatchdogTimeout,
		WatchdogMargin:        recovery.DefaultWatchdogMargin,
		StormMaxUnhealthy:     "30%",
		AlertmanagerAlerts:    strings.Join(alertmanager.DefaultAlerts, ","),
		AlertmanagerNodeLabel: alertmanager.DefaultNodeLabel,
		Git:                   GitOptions{Branch: "main", Path: "maintenance/*.yaml", Interval: 30 * time.Second},
	}
}

// RecoveryConfig maps the options onto the recovery handler's configuration.
func (o Options) RecoveryConfig() (recovery.Config, error) {
	storm, err := recovery.ParseStormLimit(o.StormMaxUnhealthy)
	if err != nil {
		return recovery.Config{}, err
	}
	cfg := recovery.Config{
		LeaseTimeout: o.NodeLeaseTimeout,
		Default:      recovery.Policy{Fencing: o.Fencing, WatchdogTimeout: o.WatchdogTimeout, WatchdogMargin: o.WatchdogMargin},
		Policies:     o.RecoveryPolicies,
		Storm:        storm,
	}
	return cfg, cfg.Validate()
}

// AlertNames are the Alertmanager alert names mapped to node events.
func (o Options) AlertNames() []string {
	var out []string
	for _, n := range strings.Split(o.AlertmanagerAlerts, ",") {
		if n = strings.TrimSpace(n); n != "" {
			out = append(out, n)
		}
	}
	return out
}

// WorkflowConcurrency is the number of worker slots of one workflow.
func (o Options) WorkflowConcurrency(workflow string) int {
	n := map[string]int{"maintenance": o.MaintenanceConcurrency, "recovery": o.RecoveryConcurrency, "migration": o.MigrationConcurrency}[workflow]
	if n > 0 {
		return n
	}
	return o.Concurrency
}

// RuntimeConfig maps the options onto the consumers runtime.
func (o Options) RuntimeConfig() consumers.Config {
	return consumers.Config{
		Replicas: o.Replicas, AckWait: o.AckWait, LeaseTTL: o.LeaseTTL, MaxAttempts: o.MaxAttempts,
		Reconfigure:     o.Reconfigure,
		DuplicateWindow: o.DuplicateWindow, ShutdownGrace: o.ShutdownGrace,
		Source: "drover/serve",
	}
}

// field binds one option to its flag and environment variable.
type field struct {
	flag, env, usage string
	// kind is the value's type as help shows it: string, int, duration or bool.
	kind  string
	set   func(string) error
	value func() string
}

// binding is how one option is set from text and shown as text.
type binding struct {
	kind  string
	set   func(string) error
	value func() string
}

func (o *Options) fields() []field {
	str := func(p *string) binding {
		return binding{"string", func(v string) error { *p = v; return nil }, func() string { return *p }}
	}
	num := func(p *int) binding {
		return binding{"int", func(v string) error {
			n, err := strconv.Atoi(v)
			if err != nil {
				return fmt.Errorf("not a number: %q", v)
			}
			*p = n
			return nil
		}, func() string { return strconv.Itoa(*p) }}
	}
	dur := func(p *time.Duration) binding {
		return binding{"duration", func(v string) error {
			d, err := time.ParseDuration(v)
			if err != nil {
				return fmt.Errorf("not a duration: %q", v)
			}
			*p = d
			return nil
		}, func() string { return p.String() }}
	}
	boolean := func(p *bool) binding {
		return binding{"bool", func(v string) error {
			b, err := strconv.ParseBool(v)
			if err != nil {
				return fmt.Errorf("not true or false: %q", v)
			}
			*p = b
			return nil
		}, func() string { return strconv.FormatBool(*p) }}
	}
	var fs []field
	add := func(name, usage string, b binding) {
		fs = append(fs, field{flag: name, env: envName(name), usage: usage, kind: b.kind, set: b.set, value: b.value})
	}
	add("nats-url", "NATS server URL(s) to join; empty runs an embedded JetStream server", str(&o.NATSURL))
	add("nats-listen", "client listen address of the embedded NATS server", str(&o.NATSListen))
	add("ingress-tokens-file", "bearer tokens (SHA-256) and the event types each may POST to /events; without it the HTTP ingress is off", str(&o.IngressTokensFile))
	add("nats-auth-file", "users (nkeys) and roles the embedded NATS server accepts; required to listen beyond loopback", str(&o.NATSAuthFile))
	add("data-dir", "directory of the embedded server's JetStream store", str(&o.DataDir))
	add("kubeconfig", "kubeconfig of the cluster to act on", str(&o.Kubeconfig))
	add("http-listen", "address of the HTTP listener: the status page at /, /metrics, /healthz, /readyz, POST /events, /alertmanager, /git/webhook", str(&o.HTTPListen))
	add("replicas", "replicas of streams and buckets (1, 3 or 5)", num(&o.Replicas))
	add("concurrency", "worker slots per workflow", num(&o.Concurrency))
	add("maintenance-concurrency", "worker slots of the maintenance workflow (default: --concurrency)", num(&o.MaintenanceConcurrency))
	add("recovery-concurrency", "worker slots of the recovery workflow (default: --concurrency)", num(&o.RecoveryConcurrency))
	add("migration-concurrency", "worker slots of the migration workflow (default: --concurrency)", num(&o.MigrationConcurrency))
	add("ack-wait", "JetStream ack wait; heartbeats run at a third of it", dur(&o.AckWait))
	add("lease-ttl", "how long a node lease outlives its last renewal (default: --ack-wait)", dur(&o.LeaseTTL))
	add("max-attempts", "handler runs of one operation before it is dead-lettered (waiting for a lease or a pre-emption does not count)", num(&o.MaxAttempts))
	add("max-deliver", "deprecated: the former name of --max-attempts", num(&o.MaxAttempts))
	add("nodemaintenance-crd", "watch medik8s NodeMaintenance resources and run their maintenance (true/false; the CRD must be installed)", boolean(&o.NodeMaintenanceCRD))
	add("reconfigure", "write this replica's --ack-wait and --lease-ttl over the values the NATS server holds (true/false); without it a replica adopts the server's", boolean(&o.Reconfigure))
	add("duplicate-window", "JetStream de-duplication window of requests", dur(&o.DuplicateWindow))
	add("shutdown-grace", "time in-flight handlers get to finish on shutdown", dur(&o.ShutdownGrace))
	add("log-level", "debug, info, warn or error", str(&o.LogLevel))
	add("log-format", "json or console", str(&o.LogFormat))
	add("platform", "kubevirt or deckhouse: force the virtualization platform (default: per VM, found by API discovery and the VM's owner)", str(&o.Platform))
	add("git-url", "Git repository of maintenance requests (file://, https://, ssh://); empty: no Git producer", str(&o.Git.URL))
	add("git-branch", "branch to follow", str(&o.Git.Branch))
	add("git-path", "glob of request files in the repository", str(&o.Git.Path))
	add("git-interval", "how often to poll the repository (POST /git/webhook polls at once)", dur(&o.Git.Interval))
	add("git-token-file", "file with a token for HTTPS", str(&o.Git.TokenFile))
	add("git-ca-file", "PEM certificates to trust for the HTTPS Git server (a private CA); empty: the system's roots", str(&o.Git.CAFile))
	add("git-ssh-key-file", "private key file for SSH", str(&o.Git.SSHKeyFile))
	add("git-known-hosts", "known_hosts file for SSH", str(&o.Git.KnownHostsFile))
	add("git-webhook-secret-file", "file with the secret POST /git/webhook checks (GitHub/Gitea HMAC, GitLab token)", str(&o.Git.WebhookSecretFile))
	add("git-trusted-keys", "armored OpenPGP keyring: act only on commits signed by these keys", str(&o.Git.TrustedKeysFile))
	add("nats-creds", "NATS credentials file", str(&o.Client.Creds))
	add("nats-nkey", "NATS nkey seed file", str(&o.Client.NKey))
	add("nats-ca", "CA file to verify the NATS server", str(&o.Client.CA))
	add("nats-cert", "client certificate file for NATS TLS", str(&o.Client.Cert))
	add("nats-key", "client key file for NATS TLS", str(&o.Client.Key))
	add("nodewatch", "watch Nodes and kubelet Leases and publish node.notready/node.ready/node.fenced (true/false; needs a cluster)", boolean(&o.NodeWatch))
	add("node-lease-timeout", "a node whose kubelet Lease is this old is not ready", dur(&o.NodeLeaseTimeout))
	add("fencing", "default fencing gate of recoveries: taint, watchdog or none (none is unsafe)", str(&o.Fencing))
	add("watchdog-timeout", "the nodes' watchdog timeout (fencing watchdog)", dur(&o.WatchdogTimeout))
	add("watchdog-margin", "added to the watchdog timeout before a silent node counts as fenced", dur(&o.WatchdogMargin))
	add("storm-max-unhealthy", "storm guard: most nodes unhealthy at once before recoveries stop (30% or a number)", str(&o.StormMaxUnhealthy))
	add("alertmanager-alerts", "Alertmanager alert names that become node events (comma-separated)", str(&o.AlertmanagerAlerts))
	add("alertmanager-node-label", "the alert label naming the node", str(&o.AlertmanagerNodeLabel))
	add("alertmanager-token-file", "file holding the token Alertmanager sends (bearer or basic-auth password) to POST /alertmanager; without it the receiver refuses every request", str(&o.AlertmanagerTokenFile))
	return fs
}

// envName is the environment variable of a serve flag: DROVER_ and the
// flag name in upper case, dashes as underscores.
func envName(flag string) string {
	return "DROVER_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// serveFlags are the flags of `drover serve` as given on the command line:
// each remembers its text, and only the flags given override the
// environment, the file and the defaults (LoadOptions applies them last).
type serveFlags struct {
	fs     *pflag.FlagSet
	config string
	given  map[string]*flagText
}

// flagText is a serve flag's value: the text given, checked when the
// options are loaded; help shows the default.
type flagText struct {
	def, kind, text string
}

func (f *flagText) String() string {
	if f.text != "" {
		return f.text
	}
	return f.def
}
func (f *flagText) Set(v string) error { f.text = v; return nil }
func (f *flagText) Type() string       { return f.kind }

// registerServeFlags adds --config and a flag per option to fs.
func registerServeFlags(fs *pflag.FlagSet) *serveFlags {
	sf := &serveFlags{fs: fs, given: map[string]*flagText{}}
	fs.StringVar(&sf.config, "config", "", "YAML configuration file; its keys are the flag names (env DROVER_CONFIG)")
	d := DefaultOptions()
	for _, f := range d.fields() {
		v := &flagText{def: f.value(), kind: f.kind}
		if v.def == "0s" {
			v.def = "" // unset: the help text says what it defaults to
		}
		sf.given[f.flag] = v
		fl := fs.VarPF(v, f.flag, "", f.usage+" (env "+f.env+")")
		if f.kind == "bool" {
			fl.NoOptDefVal = "true" // --nodewatch alone means true, as --nodewatch=true
		}
	}
	return sf
}

// LoadOptions parses serve's arguments: defaults, then the YAML file named by
// --config (or DROVER_CONFIG), then DROVER_* variables, then flags.
func LoadOptions(args []string, getenv func(string) string) (Options, error) {
	fs := pflag.NewFlagSet("drover serve", pflag.ContinueOnError)
	fs.SetOutput(new(strings.Builder))
	sf := registerServeFlags(fs)
	if err := fs.Parse(args); err != nil {
		return DefaultOptions(), usageError{fmt.Errorf("%w\n%s", err, serveUsage(fs))}
	}
	if fs.NArg() > 0 {
		return DefaultOptions(), usageError{fmt.Errorf("unexpected argument %q\n%s", fs.Arg(0), serveUsage(fs))}
	}
	return sf.load(getenv)
}

// load layers the options: defaults, the configuration file, the
// environment, then the flags given.
func (sf *serveFlags) load(getenv func(string) string) (Options, error) {
	o := DefaultOptions()
	fields := o.fields()
	path := sf.config
	if path == "" {
		path = getenv("DROVER_CONFIG")
	}
	if path != "" {
		b, err := os.ReadFile(path)
		if err != nil {
			return o, usageError{fmt.Errorf("read config: %w", err)}
		}
		if err := applyFile(path, b, &o, fields); err != nil {
			return o, usageError{err}
		}
	}
	for _, f := range fields {
		if v := getenv(f.env); v != "" {
			if err := f.set(v); err != nil {
				return o, usageError{fmt.Errorf("%s: %w", f.env, err)}
			}
		}
	}
	for _, f := range fields {
		if !sf.fs.Changed(f.flag) {
			continue
		}
		if err := f.set(sf.given[f.flag].text); err != nil {
			return o, usageError{fmt.Errorf("--%s: %w", f.flag, err)}
		}
	}
	return o, o.validate()
}

// applyFile sets options from a YAML file whose keys are the flag names
// (nats-url, ack-wait: 40s, ...). Unknown keys are errors, not silently ignored.
func applyFile(path string, b []byte, o *Options, fields []field) error {
	var m map[string]any
	if err := yaml.Unmarshal(b, &m); err != nil {
		return fmt.Errorf("config %s: %w", path, err)
	}
	byName := map[string]field{}
	for _, f := range fields {
		byName[f.flag] = f
	}
	var errs []error
	for k, v := range m {
		if k == "recovery" {
			errs = append(errs, applyRecovery(path, v, o))
			continue
		}
		f, ok := byName[k]
		if !ok {
			errs = append(errs, fmt.Errorf("config %s: unknown key %q (keys are the flag names, e.g. nats-url)", path, k))
			continue
		}
		if v == nil {
			continue
		}
		switch v.(type) {
		case map[string]any, []any:
			errs = append(errs, fmt.Errorf("config %s: %s must be a single value", path, k))
			continue
		}
		if err := f.set(fmt.Sprint(v)); err != nil {
			errs = append(errs, fmt.Errorf("config %s: %s: %w", path, k, err))
		}
	}
	return errors.Join(errs...)
}

// applyRecovery reads the file's recovery section: recovery.policies, a
// list of {nodeSelector, fencing, watchdogTimeout, watchdogMargin}.
func applyRecovery(path string, v any, o *Options) error {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("config %s: recovery: %w", path, err)
	}
	var sec struct {
		Policies []recovery.Policy `json:"policies"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&sec); err != nil {
		return fmt.Errorf("config %s: recovery (keys: policies): %w", path, err)
	}
	o.RecoveryPolicies = sec.Policies
	return nil
}

func (o Options) validate() error {
	var errs []error
	if _, err := o.RecoveryConfig(); err != nil {
		errs = append(errs, err)
	}
	if o.NodeLeaseTimeout < time.Second {
		errs = append(errs, fmt.Errorf("node-lease-timeout must be at least 1s, got %s", o.NodeLeaseTimeout))
	}
	if o.NATSURL == "" && o.DataDir == "" {
		errs = append(errs, errors.New("data-dir must be set when NATS is embedded"))
	}
	if o.NATSURL != "" && o.NATSAuthFile != "" {
		errs = append(errs, errors.New("nats-auth-file configures the embedded NATS server; with nats-url the NATS cluster's own configuration says who may do what (drover auth server-config prints it)"))
	}
	if o.NATSURL == "" && o.NATSAuthFile == "" {
		if err := checkUnauthenticatedListen(o.NATSListen); err != nil {
			errs = append(errs, err)
		}
	}
	if o.Replicas != 1 && o.Replicas != 3 && o.Replicas != 5 {
		errs = append(errs, fmt.Errorf("replicas must be 1, 3 or 5, got %d", o.Replicas))
	}
	if o.NATSURL == "" && o.Replicas != 1 {
		errs = append(errs, errors.New("an embedded NATS server holds one replica: replicas must be 1"))
	}
	if o.Concurrency < 1 || o.Concurrency > 256 {
		errs = append(errs, fmt.Errorf("concurrency must be 1..256, got %d", o.Concurrency))
	}
	for name, n := range map[string]int{"maintenance": o.MaintenanceConcurrency, "recovery": o.RecoveryConcurrency, "migration": o.MigrationConcurrency} {
		if n < 0 || n > 256 {
			errs = append(errs, fmt.Errorf("%s-concurrency must be 0..256 (0: --concurrency), got %d", name, n))
		}
	}
	if o.AckWait < time.Second {
		errs = append(errs, fmt.Errorf("ack-wait must be at least 1s, got %s", o.AckWait))
	}
	if o.MaxAttempts < 1 {
		errs = append(errs, fmt.Errorf("max-attempts must be at least 1, got %d", o.MaxAttempts))
	}
	if o.LeaseTTL != 0 && o.LeaseTTL < time.Second {
		errs = append(errs, fmt.Errorf("lease-ttl must be at least 1s, got %s", o.LeaseTTL))
	}
	if o.Git.URL != "" && o.Git.Interval < time.Second {
		errs = append(errs, fmt.Errorf("git-interval must be at least 1s, got %s", o.Git.Interval))
	}
	switch o.Platform {
	case "", "kubevirt", "deckhouse":
	default:
		errs = append(errs, fmt.Errorf("platform must be kubevirt or deckhouse, got %q", o.Platform))
	}
	switch o.LogFormat {
	case "json", "console":
	default:
		errs = append(errs, fmt.Errorf("log-format must be json or console, got %q", o.LogFormat))
	}
	if err := errors.Join(errs...); err != nil {
		return usageError{err}
	}
	return nil
}

func serveUsage(fs *pflag.FlagSet) string {
	return "usage: drover serve [--config FILE] [flags]\n" + fs.FlagUsages()
}

// usageError marks bad arguments: exit code 2, nothing was done.
type usageError struct{ error }

func (u usageError) Unwrap() error { return u.error }
