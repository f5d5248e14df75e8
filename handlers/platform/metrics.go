package platform

import "github.com/prometheus/client_golang/prometheus"

// Metrics count what the workflows did to the cluster.
type Metrics struct {
	// MigrationsCreated counts migration objects created, by platform.
	MigrationsCreated *prometheus.CounterVec
	// MigrationsRefused counts creates the platform's admission refused:
	// drover checks what admission checks first, so it should stay 0.
	MigrationsRefused *prometheus.CounterVec
}

// NewMetrics registers the metrics with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		MigrationsCreated: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "migrations_created_total",
			Help: "Migration objects drover created (VirtualMachineInstanceMigrations, Deckhouse Evict/Migrate operations), by platform.",
		}, []string{"platform"}),
		MigrationsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "migrations_refused_total",
			Help: "Migration creates refused by the platform's admission, by platform.",
		}, []string{"platform"}),
	}
	if reg != nil {
		reg.MustRegister(m.MigrationsCreated, m.MigrationsRefused)
	}
	return m
}
