package recovery

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics of the recovery workflow. Build them with NewMetrics; a nil
// *Metrics records nothing.
type Metrics struct {
	// Operations counts finished recoveries by result: recovered, stale,
	// excluded, cancelled.
	Operations *prometheus.CounterVec
	// Phase times the phases of a recovery: detect (last heartbeat to
	// drover's first look), gate (to the fencing gate opening), cleanup, and
	// running (clean-up to every restartable VM Running).
	Phase *prometheus.HistogramVec
	// Storm is 1 while the storm guard holds recoveries back.
	Storm prometheus.Gauge
	// StormRefusals counts checks that found a storm and acted on nothing.
	StormRefusals prometheus.Counter
	// Unhealthy is the number of unhealthy nodes in scope at the last check.
	Unhealthy prometheus.Gauge
	// Paused is 1 while new recoveries are paused cluster-wide.
	Paused prometheus.Gauge
	// Unsafe counts gates opened without proof (fencing none).
	Unsafe prometheus.Counter
	// FailoverCapacity is how many of the largest nodes could fail now with
	// every restartable VM still fitting on the others.
	FailoverCapacity prometheus.Gauge
}

// NewMetrics registers the recovery metrics with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Operations: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: "drover", Subsystem: "recovery", Name: "operations_total",
			Help: "Finished recoveries of failed nodes by result (recovered, stale, excluded, cancelled)."}, []string{"result"}),
		Phase: prometheus.NewHistogramVec(prometheus.HistogramOpts{Namespace: "drover", Subsystem: "recovery", Name: "phase_seconds",
			Help:    "Duration of each recovery phase: detect, gate, cleanup, running.",
			Buckets: []float64{0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 90, 120, 180, 300, 600}}, []string{"phase"}),
		Storm: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "drover", Subsystem: "recovery", Name: "storm_active",
			Help: "1 while the storm guard holds recoveries back: too many nodes unhealthy at once."}),
		StormRefusals: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "drover", Subsystem: "recovery", Name: "storm_refusals_total",
			Help: "Recovery checks that found a storm and did nothing."}),
		Unhealthy: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "drover", Subsystem: "recovery", Name: "unhealthy_nodes",
			Help: "Unhealthy nodes in the storm guard's scope at the last check."}),
		Paused: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "drover", Subsystem: "recovery", Name: "paused",
			Help: "1 while new recoveries are paused cluster-wide (drover recovery pause)."}),
		Unsafe: prometheus.NewCounter(prometheus.CounterOpts{Namespace: "drover", Subsystem: "recovery", Name: "unsafe_gates_total",
			Help: "Fencing gates opened without proof that the node is dead (fencing none)."}),
		FailoverCapacity: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: "drover", Name: "failover_capacity_nodes",
			Help: "How many of the largest nodes could fail now with every restartable VM still fitting on the others."}),
	}
	if reg != nil {
		reg.MustRegister(m.Operations, m.Phase, m.Storm, m.StormRefusals, m.Unhealthy, m.Paused, m.Unsafe, m.FailoverCapacity)
	}
	return m
}

func (m *Metrics) finished(result string) {
	if m != nil {
		m.Operations.WithLabelValues(result).Inc()
	}
}

func (m *Metrics) phase(name string, seconds float64) {
	if m != nil && seconds >= 0 {
		m.Phase.WithLabelValues(name).Observe(seconds)
	}
}

func (m *Metrics) storm(s Storm) {
	if m == nil {
		return
	}
	m.Unhealthy.Set(float64(len(s.Unhealthy)))
	if s.Active {
		m.Storm.Set(1)
		m.StormRefusals.Inc()
	} else {
		m.Storm.Set(0)
	}
}

func (m *Metrics) paused(p bool) {
	if m == nil {
		return
	}
	if p {
		m.Paused.Set(1)
	} else {
		m.Paused.Set(0)
	}
}

func (m *Metrics) unsafe() {
	if m != nil {
		m.Unsafe.Inc()
	}
}
