package monitoring_test

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"sigs.k8s.io/yaml"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/deploy/monitoring"
	"github.com/drover-io/drover/handlers/maintenance"
	"github.com/drover-io/drover/handlers/platform"
	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/integration/cluster"
	"github.com/drover-io/drover/producers"
)

// exported returns the names of every metric drover registers (drover serve
// builds its registry from these constructors), with the kind of each.
func exported(t *testing.T) map[string]string {
	t.Helper()
	reg := &namer{names: map[string]string{}}
	consumers.NewMetrics(reg)
	producers.NewMetrics(reg)
	recovery.NewMetrics(reg)
	maintenance.NewMetrics(reg)
	platform.NewMetrics(reg)
	require.NotEmpty(t, reg.names)
	return reg.names
}

// namer is a Registerer that notes the names its collectors describe.
type namer struct{ names map[string]string }

var fqName = regexp.MustCompile(`fqName: "([a-z_:]+)"`)

func (n *namer) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 16)
	go func() { c.Describe(ch); close(ch) }()
	kind := "other"
	switch c.(type) {
	case prometheus.Histogram, *prometheus.HistogramVec:
		kind = "histogram"
	}
	for d := range ch {
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			n.names[m[1]] = kind
		}
	}
	return nil
}

func (n *namer) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		_ = n.Register(c)
	}
}

func (n *namer) Unregister(prometheus.Collector) bool { return false }

var droverMetric = regexp.MustCompile(`\bdrover_[a-z_]+`)

// unknownMetrics returns the drover_ names in expr that drover does not
// export (a histogram's _bucket, _sum and _count series count as it).
func unknownMetrics(expr string, known map[string]string) []string {
	var out []string
	for _, name := range droverMetric.FindAllString(expr, -1) {
		if _, ok := known[name]; ok {
			continue
		}
		base := name
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			base = strings.TrimSuffix(base, suffix)
		}
		if known[base] == "histogram" && base != name {
			continue
		}
		out = append(out, name)
	}
	return out
}

type ruleFile struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Alert       string            `json:"alert"`
			Expr        string            `json:"expr"`
			For         string            `json:"for,omitempty"`
			Labels      map[string]string `json:"labels,omitempty"`
			Annotations map[string]string `json:"annotations,omitempty"`
		} `json:"rules"`
	} `json:"groups"`
}

// rules reads the PrometheusRule's spec: the plain rules file promtool
// checks.
func rules(t *testing.T) (ruleFile, []byte) {
	t.Helper()
	b, err := os.ReadFile("prometheusrule.yaml")
	require.NoError(t, err)
	var pr struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name   string            `json:"name"`
			Labels map[string]string `json:"labels"`
		} `json:"metadata"`
		Spec ruleFile `json:"spec"`
	}
	require.NoError(t, yaml.UnmarshalStrict(b, &pr))
	require.Equal(t, "monitoring.coreos.com/v1", pr.APIVersion)
	require.Equal(t, "PrometheusRule", pr.Kind)
	plain, err := yaml.Marshal(pr.Spec)
	require.NoError(t, err)
	return pr.Spec, plain
}

// TestAlertRulesNameExportedMetrics: every alert expression names metrics
// drover exports (up aside), and no alert is in the file twice.
func TestAlertRulesNameExportedMetrics(t *testing.T) {
	known := exported(t)
	spec, _ := rules(t)
	seen := map[string]bool{}
	for _, g := range spec.Groups {
		for _, r := range g.Rules {
			require.NotEmpty(t, r.Alert, "group %s: only alerts here", g.Name)
			require.False(t, seen[r.Alert], "alert %s twice", r.Alert)
			seen[r.Alert] = true
			require.NotEmpty(t, r.Labels["severity"], r.Alert)
			require.NotEmpty(t, r.Annotations["summary"], r.Alert)
			names := droverMetric.FindAllString(r.Expr, -1)
			require.True(t, len(names) > 0 || strings.Contains(r.Expr, "up{"), "%s names no drover metric", r.Alert)
			require.Empty(t, unknownMetrics(r.Expr, known), "%s uses metrics drover does not export", r.Alert)
		}
	}
	for _, a := range []string{"DroverDown", "DroverDeadLetters", "DroverOperationStuck", "DroverRecoveryGateWaitTooLong",
		"DroverNoFailoverCapacity", "DroverRecoveryStormGuard", "DroverRecoveryUnsafeGate"} {
		require.True(t, seen[a], "alert %s missing", a)
	}
}

// promtool is the promtool `make promtool` builds (pinned in
// integration/tools/promtool) into DROVER_TEST_BIN; missing, the test fails.
func promtool(t *testing.T) string {
	t.Helper()
	dir, err := cluster.ResolveBinDir("")
	require.NoError(t, err)
	p := filepath.Join(dir, "promtool")
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("promtool missing (%v): build it with `make promtool` (integration/tools/build.sh %s promtool)", err, dir)
	}
	return p
}

// TestPromtool: the PrometheusRule's groups pass `promtool check rules`, and
// rules_test.yaml passes `promtool test rules`, seeing every alert both
// firing and quiet.
func TestPromtool(t *testing.T) {
	bin := promtool(t)
	spec, plain := rules(t)
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "rules.yaml"), plain, 0o644))
	tests, err := os.ReadFile("rules_test.yaml")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "rules_test.yaml"), tests, 0o644))

	run := func(args ...string) string {
		cmd := exec.Command(bin, args...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "promtool %s:\n%s", strings.Join(args, " "), out)
		return string(out)
	}
	out := run("check", "rules", "rules.yaml")
	require.Contains(t, out, "SUCCESS")
	out = run("test", "rules", "rules_test.yaml")
	require.Contains(t, out, "SUCCESS")

	// Every alert is tested firing and quiet.
	var unit struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string            `json:"alertname"`
				ExpAlerts []json.RawMessage `json:"exp_alerts"`
			} `json:"alert_rule_test"`
		} `json:"tests"`
	}
	require.NoError(t, yaml.Unmarshal(tests, &unit))
	fires, quiet := map[string]bool{}, map[string]bool{}
	for _, tc := range unit.Tests {
		for _, a := range tc.AlertRuleTest {
			if len(a.ExpAlerts) > 0 {
				fires[a.Alertname] = true
			} else {
				quiet[a.Alertname] = true
			}
		}
	}
	for _, g := range spec.Groups {
		for _, r := range g.Rules {
			require.True(t, fires[r.Alert], "rules_test.yaml never sees %s firing", r.Alert)
			require.True(t, quiet[r.Alert], "rules_test.yaml never sees %s quiet", r.Alert)
		}
	}

	// promtool does fail a wrong expectation: the tests are not vacuous.
	broken := bytes.Replace(tests, []byte("severity: critical"), []byte("severity: page"), 1)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "broken_test.yaml"), broken, 0o644))
	cmd := exec.Command(bin, "test", "rules", "broken_test.yaml")
	cmd.Dir = dir
	bout, err := cmd.CombinedOutput()
	require.Error(t, err, "promtool accepted a wrong expectation:\n%s", bout)
}

// TestDashboardUpToDate: the committed dashboard files are what the
// generator writes (`make dashboard` regenerates them).
func TestDashboardUpToDate(t *testing.T) {
	js, err := monitoring.DashboardJSON()
	require.NoError(t, err)
	cm, err := monitoring.DashboardConfigMap(js)
	require.NoError(t, err)
	for file, want := range map[string][]byte{monitoring.DashboardFile: js, monitoring.DashboardConfigMapFile: cm} {
		got, err := os.ReadFile(file)
		require.NoError(t, err)
		require.True(t, bytes.Equal(want, got), "deploy/monitoring/%s is stale: run `make dashboard`", file)
	}
}

// TestDashboardQueries: every panel has queries, each naming only metrics
// drover exports; the panels the issue asks for are there.
func TestDashboardQueries(t *testing.T) {
	known := exported(t)
	js, err := monitoring.DashboardJSON()
	require.NoError(t, err)
	var d struct {
		Panels []struct {
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	require.NoError(t, json.Unmarshal(js, &d))
	used := map[string]bool{}
	var titles []string
	for _, p := range d.Panels {
		if p.Type == "row" {
			continue
		}
		titles = append(titles, p.Title)
		require.NotEmpty(t, p.Targets, p.Title)
		for _, q := range p.Targets {
			names := droverMetric.FindAllString(q.Expr, -1)
			require.NotEmpty(t, names, "%s: %s", p.Title, q.Expr)
			require.Empty(t, unknownMetrics(q.Expr, known), "panel %q: %s", p.Title, q.Expr)
			for _, n := range names {
				used[n] = true
			}
		}
	}
	sort.Strings(titles)
	for _, m := range []string{"drover_operations", "drover_maintenance_makespan_seconds_bucket", "drover_recovery_phase_seconds_bucket",
		"drover_migrations_in_flight", "drover_gate_waits_total", "drover_dead_letters_total", "drover_failover_capacity_nodes",
		"drover_events_received_total"} {
		require.True(t, used[m], "no panel shows %s (panels: %s)", m, strings.Join(titles, ", "))
	}
}

// TestREADMENamesEveryMetric: the README's "Metrics and alerts" section
// names every metric drover exports.
func TestREADMENamesEveryMetric(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	require.NoError(t, err)
	readme := string(b)
	start := strings.Index(readme, "### Metrics and alerts")
	require.GreaterOrEqual(t, start, 0, "README has no Metrics and alerts section")
	section := readme[start+1:]
	if end := strings.Index(section, "\n### "); end >= 0 {
		section = section[:end]
	}
	for name := range exported(t) {
		require.Contains(t, section, "`"+name+"`", "README's Metrics and alerts section does not name %s", name)
	}
}
