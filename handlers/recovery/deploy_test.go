package recovery

import (
	"os"
	"regexp"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"sigs.k8s.io/yaml"

	"github.com/drover-io/drover/consumers"
)

// TestAlertRules: the shipped recovery alert rules (the drover-recovery
// group of deploy/monitoring's PrometheusRule) parse and name only metrics
// this package or the runtime exports. deploy/monitoring's tests check every
// group with promtool.
func TestAlertRules(t *testing.T) {
	b, err := os.ReadFile("../../deploy/monitoring/prometheusrule.yaml")
	require.NoError(t, err)
	var pr struct {
		APIVersion string         `json:"apiVersion"`
		Kind       string         `json:"kind"`
		Metadata   map[string]any `json:"metadata"`
		Spec       rulesFile      `json:"spec"`
	}
	require.NoError(t, yaml.UnmarshalStrict(b, &pr))
	rules := pr.Spec
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	m.Operations.WithLabelValues("recovered")
	m.Phase.WithLabelValues("gate")
	cm := consumers.NewMetrics(reg)
	cm.InPhase.WithLabelValues("recovery", "gate")
	families, err := reg.Gather()
	require.NoError(t, err)
	known := map[string]bool{}
	for _, f := range families {
		known[f.GetName()] = true
	}
	metric := regexp.MustCompile(`drover_[a-z_]+`)
	alerts := 0
	for _, g := range rules.Groups {
		if g.Name != "drover-recovery" {
			continue
		}
		for _, r := range g.Rules {
			alerts++
			names := metric.FindAllString(r.Expr, -1)
			require.NotEmpty(t, names, r.Alert)
			for _, n := range names {
				require.True(t, known[n], "%s uses %s, which drover does not export", r.Alert, n)
			}
		}
	}
	require.Equal(t, 4, alerts)
}

type rulesFile struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Alert       string            `json:"alert"`
			Expr        string            `json:"expr"`
			For         string            `json:"for"`
			Labels      map[string]string `json:"labels"`
			Annotations map[string]string `json:"annotations"`
		} `json:"rules"`
	} `json:"groups"`
}
