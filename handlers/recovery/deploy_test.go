package recovery

import (
	"os"
	"regexp"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"sigs.k8s.io/yaml"
)

// TestAlertRules: the shipped alert rules parse and name only metrics this
// package exports.
func TestAlertRules(t *testing.T) {
	b, err := os.ReadFile("../../deploy/alerts/recovery.yaml")
	require.NoError(t, err)
	var rules struct {
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
	require.NoError(t, yaml.UnmarshalStrict(b, &rules))
	reg := prometheus.NewRegistry()
	m := NewMetrics(reg)
	m.Operations.WithLabelValues("recovered")
	m.Phase.WithLabelValues("gate")
	families, err := reg.Gather()
	require.NoError(t, err)
	known := map[string]bool{}
	for _, f := range families {
		known[f.GetName()] = true
	}
	metric := regexp.MustCompile(`drover_[a-z_]+`)
	alerts := 0
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			alerts++
			names := metric.FindAllString(r.Expr, -1)
			require.NotEmpty(t, names, r.Alert)
			for _, n := range names {
				require.True(t, known[n], "%s uses %s, which drover does not export", r.Alert, n)
			}
		}
	}
	require.Equal(t, 3, alerts)
}
