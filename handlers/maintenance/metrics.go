package maintenance

import "github.com/prometheus/client_golang/prometheus"

// Metrics of the maintenance workflow. Build them with NewMetrics; a nil
// *Metrics records nothing.
type Metrics struct {
	// Makespan times evacuations: from the request's first run to the node
	// holding none of the VMs drover had to move, by outcome (completed,
	// failed).
	Makespan *prometheus.HistogramVec
}

// NewMetrics registers the maintenance metrics with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Makespan: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "drover", Subsystem: "maintenance", Name: "makespan_seconds",
			Help:    "Evacuation makespan: request to node empty of the VMs drover had to move, by outcome (completed, failed).",
			Buckets: []float64{1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400}}, []string{"outcome"}),
	}
	if reg != nil {
		reg.MustRegister(m.Makespan)
	}
	return m
}

func (m *Metrics) makespan(outcome string, seconds float64) {
	if m != nil && seconds >= 0 {
		m.Makespan.WithLabelValues(outcome).Observe(seconds)
	}
}
