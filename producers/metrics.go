package producers

import "github.com/prometheus/client_golang/prometheus"

// Metrics count what the producers receive and publish, by source
// (ingress, nodewatch, alertmanager, gitops, evacuation, nodemaintenance)
// and event type.
type Metrics struct {
	Received  *prometheus.CounterVec
	Published *prometheus.CounterVec
	Duplicate *prometheus.CounterVec
	Rejected  *prometheus.CounterVec
}

// NewMetrics registers the producers' metrics with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "events_received_total",
			Help: "Events a producer received or produced, before validation, by source and type.",
		}, []string{"source", "type"}),
		Published: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "events_published_total",
			Help: "Events stored by JetStream, by source and type (duplicates included).",
		}, []string{"source", "type"}),
		Duplicate: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "events_duplicate_total",
			Help: "Events JetStream already had within its duplicate window, by source and type.",
		}, []string{"source", "type"}),
		Rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "events_rejected_total",
			Help: "Events refused at the edge, by source and reason (invalid, unauthenticated, forbidden, too_large, back_pressure, unavailable).",
		}, []string{"source", "reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.Received, m.Published, m.Duplicate, m.Rejected)
	}
	return m
}
