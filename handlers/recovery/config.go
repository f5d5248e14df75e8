package recovery

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/labels"
)

// Fencing modes: what proves a node dead before drover releases its VMs.
const (
	// FencingTaint waits for node.kubernetes.io/out-of-service on the node
	// (a person or a fencing agent put it there) or a node.fenced event,
	// which drover turns into the taint.
	FencingTaint = "taint"
	// FencingWatchdog waits until the node's kubelet Lease is older than the
	// watchdog timeout plus a margin: a node with an armed watchdog that
	// lost the API has rebooted itself by then.
	FencingWatchdog = "watchdog"
	// FencingNone proceeds at once. Unsafe: a partitioned node's guests may
	// still run, and their VMs then run twice.
	FencingNone = "none"
)

// Names drover reads and writes on Kubernetes objects.
const (
	// TaintOutOfService is Kubernetes' non-graceful node shutdown taint.
	TaintOutOfService = "node.kubernetes.io/out-of-service"
	// LabelExclude on a Node ("true") keeps drover from recovering it.
	LabelExclude = "drover.io/exclude-from-recovery"
	// LabelRestartPriority on a VirtualMachine (an integer, default 0):
	// when the remaining nodes cannot hold every VM, higher restarts first.
	// An annotation of the same name is read when the label is absent.
	LabelRestartPriority = "drover.io/restart-priority"
	// TaintRecovering (NoSchedule) keeps the scheduler from placing the
	// released VMs back on the failed node: a node whose Lease stopped looks
	// schedulable until the node lifecycle controller marks it unreachable
	// (50 s), and the out-of-service taint comes only after the clean-up.
	TaintRecovering = "drover.io/recovering"
	// AnnotationTaintedBy on a Node names the recovery that put the
	// out-of-service taint there: drover removes only a taint it added.
	AnnotationTaintedBy = "drover.io/out-of-service-by"
)

// Deckhouse's node fencing (modules/040-node-manager): the fencing agent on
// a node arms the watchdog and labels the node; the fencing controller
// force-deletes every pod of a labelled node whose Lease is older than 60 s
// and then deletes the Node, unless a maintenance annotation is set.
const (
	DeckhouseFencingLabel   = "node-manager.deckhouse.io/fencing-enabled"
	DeckhouseFencingTimeout = 60 * time.Second
)

// deckhouseMaintenance are the annotations that disarm Deckhouse fencing.
var deckhouseMaintenance = []string{
	"update.node.deckhouse.io/disruption-approved",
	"update.node.deckhouse.io/approved",
	"node-manager.deckhouse.io/fencing-disable",
}

// Defaults of Config.
const (
	DefaultWatchdogTimeout = 60 * time.Second
	// DefaultWatchdogMargin covers the time between a kubelet's last Lease
	// renewal and its node's last contact with the API (the kubelet renews
	// every 10 s; the node feeds its watchdog while it reaches the API), plus
	// clock skew.
	DefaultWatchdogMargin = 15 * time.Second
	DefaultGatePoll       = 250 * time.Millisecond
	DefaultRunningPoll    = 200 * time.Millisecond
	DefaultRunningWait    = 2 * time.Minute
)

// Policy says how nodes matching NodeSelector are fenced. The first
// matching policy of Config.Policies applies; the flags set the default.
type Policy struct {
	// NodeSelector matches node labels; empty matches every node.
	NodeSelector map[string]string `json:"nodeSelector,omitempty"`
	// Fencing is FencingTaint, FencingWatchdog or FencingNone.
	Fencing string `json:"fencing"`
	// WatchdogTimeout is the nodes' watchdog timeout (watchdog mode);
	// 0 takes the default policy's.
	WatchdogTimeout time.Duration `json:"watchdogTimeout,omitempty"`
	// WatchdogMargin is added to it; default DefaultWatchdogMargin.
	WatchdogMargin time.Duration `json:"watchdogMargin,omitempty"`
}

// UnmarshalJSON reads durations as Go duration strings ("60s").
func (p *Policy) UnmarshalJSON(b []byte) error {
	var raw struct {
		NodeSelector    map[string]string `json:"nodeSelector"`
		Fencing         string            `json:"fencing"`
		WatchdogTimeout string            `json:"watchdogTimeout"`
		WatchdogMargin  string            `json:"watchdogMargin"`
	}
	dec := json.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&raw); err != nil {
		return err
	}
	*p = Policy{NodeSelector: raw.NodeSelector, Fencing: raw.Fencing}
	for _, d := range []struct {
		s   string
		dst *time.Duration
		key string
	}{{raw.WatchdogTimeout, &p.WatchdogTimeout, "watchdogTimeout"}, {raw.WatchdogMargin, &p.WatchdogMargin, "watchdogMargin"}} {
		if d.s == "" {
			continue
		}
		v, err := time.ParseDuration(d.s)
		if err != nil {
			return fmt.Errorf("%s: not a duration: %q", d.key, d.s)
		}
		*d.dst = v
	}
	return nil
}

// Validate checks the mode and the watchdog timing.
func (p Policy) Validate() error {
	switch p.Fencing {
	case FencingTaint, FencingNone, FencingWatchdog:
	default:
		return fmt.Errorf("fencing must be taint, watchdog or none, got %q", p.Fencing)
	}
	if p.WatchdogTimeout < 0 || p.WatchdogMargin < 0 {
		return fmt.Errorf("watchdogTimeout and watchdogMargin must not be negative, got %s and %s", p.WatchdogTimeout, p.WatchdogMargin)
	}
	if _, err := labels.ValidatedSelectorFromSet(p.NodeSelector); err != nil {
		return fmt.Errorf("nodeSelector: %w", err)
	}
	return nil
}

func (p Policy) matches(nodeLabels map[string]string) bool {
	return labels.SelectorFromSet(p.NodeSelector).Matches(labels.Set(nodeLabels))
}

func (p Policy) margin() time.Duration {
	if p.WatchdogMargin > 0 {
		return p.WatchdogMargin
	}
	return DefaultWatchdogMargin
}

// StormLimit is the storm guard's threshold: at most Count nodes, or
// Percent of the nodes in scope, may be unhealthy at once.
type StormLimit struct {
	Count   int
	Percent float64 // used when Count is 0
}

// ParseStormLimit reads "30%" or "3".
func ParseStormLimit(s string) (StormLimit, error) {
	s = strings.TrimSpace(s)
	if p, ok := strings.CutSuffix(s, "%"); ok {
		v, err := strconv.ParseFloat(p, 64)
		if err != nil || v <= 0 || v > 100 {
			return StormLimit{}, fmt.Errorf("storm limit %q: a percentage must be in (0, 100]", s)
		}
		return StormLimit{Percent: v}, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return StormLimit{}, fmt.Errorf("storm limit %q: want a percentage (30%%) or a number of nodes (3)", s)
	}
	return StormLimit{Count: n}, nil
}

func (l StormLimit) String() string {
	if l.Count > 0 {
		return strconv.Itoa(l.Count) + " nodes"
	}
	return strconv.FormatFloat(l.Percent, 'f', -1, 64) + "%"
}

// exceeded: more than the limit, and more than one, of inScope nodes are
// unhealthy.
func (l StormLimit) exceeded(unhealthy, inScope int) bool {
	if unhealthy <= 1 {
		return false
	}
	if l.Count > 0 {
		return unhealthy > l.Count
	}
	return float64(unhealthy) > l.Percent/100*float64(inScope)
}

// Config tunes the recovery handler. Zero fields take the defaults.
type Config struct {
	// LeaseTimeout: a node whose kubelet Lease is this old is gone
	// (DefaultLeaseTimeout); the node watcher uses the same value.
	LeaseTimeout time.Duration
	// Default is the policy of nodes no entry of Policies matches
	// (default: FencingTaint).
	Default  Policy
	Policies []Policy
	// Storm is the storm guard's limit (default 30%).
	Storm StormLimit
	// GatePoll is how often a recovery waiting for fencing looks again
	// (DefaultGatePoll: a fencing agent's answer opens the gate within it);
	// one held by a storm or a pause looks every 8 GatePoll.
	GatePoll time.Duration
	// RunningPoll is how often the VMs are checked while waiting for them to
	// run (DefaultRunningPoll); RunningWait bounds one handler run's wait,
	// after which it checks again later without holding a worker
	// (DefaultRunningWait).
	RunningPoll time.Duration
	RunningWait time.Duration
}

func (c Config) withDefaults() Config {
	if c.LeaseTimeout <= 0 {
		c.LeaseTimeout = DefaultLeaseTimeout
	}
	if c.Default.Fencing == "" {
		c.Default.Fencing = FencingTaint
	}
	if c.Default.WatchdogTimeout <= 0 {
		c.Default.WatchdogTimeout = DefaultWatchdogTimeout
	}
	if c.Storm.Count == 0 && c.Storm.Percent == 0 {
		c.Storm.Percent = 30
	}
	if c.GatePoll <= 0 {
		c.GatePoll = DefaultGatePoll
	}
	if c.RunningPoll <= 0 {
		c.RunningPoll = DefaultRunningPoll
	}
	if c.RunningWait <= 0 {
		c.RunningWait = DefaultRunningWait
	}
	return c
}

// Validate checks every policy.
func (c Config) Validate() error {
	c = c.withDefaults()
	var errs []error
	if err := c.Default.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("default policy: %w", err))
	}
	for i, p := range c.Policies {
		if err := p.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("recovery.policies[%d]: %w", i, err))
		}
	}
	return errors.Join(errs...)
}

// PolicyFor returns the policy of a node with these labels.
func (c Config) PolicyFor(nodeLabels map[string]string) Policy {
	c = c.withDefaults()
	for _, p := range c.Policies {
		if p.matches(nodeLabels) {
			if p.Fencing == FencingWatchdog && p.WatchdogTimeout <= 0 {
				p.WatchdogTimeout = c.Default.WatchdogTimeout
			}
			return p
		}
	}
	return c.Default
}
