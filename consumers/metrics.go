package consumers

import "github.com/prometheus/client_golang/prometheus"

// Results a message can end with, the "result" label of drover_messages_total.
const (
	ResultAcked        = "acked"         // handler succeeded (or cancelled cleanly)
	ResultSkipped      = "skipped"       // operation already finished: acked without acting
	ResultRetried      = "retried"       // sent back with backoff after a failed attempt
	ResultWaiting      = "waiting"       // sent back: a lease is busy, or the handler waits for something
	ResultSuspended    = "suspended"     // pre-empted: sent back, its lease handed to a higher-priority operation
	ResultDeadLettered = "dead_lettered" // moved to DROVER_DLQ and terminated
	ResultAbandoned    = "abandoned"     // lease lost or shutdown: left for redelivery
)

// Metrics are the runtime's Prometheus metrics.
type Metrics struct {
	Messages    *prometheus.CounterVec
	Duration    *prometheus.HistogramVec
	InFlight    *prometheus.GaugeVec
	DeadLetters *prometheus.CounterVec
	LeaseWaits  *prometheus.CounterVec
	Preemptions *prometheus.CounterVec
	LeasesLost  *prometheus.CounterVec
	Orphans     *prometheus.CounterVec
	OldestAge   prometheus.Gauge
	Operations  *prometheus.GaugeVec
}

// NewMetrics registers the runtime's metrics with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "messages_total",
			Help: "Request message deliveries handled, by workflow and result.",
		}, []string{"workflow", "result"}),
		Duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: "drover", Name: "handler_duration_seconds",
			Help:    "Time a handler ran for one delivery, by workflow.",
			Buckets: []float64{.001, .01, .1, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600},
		}, []string{"workflow"}),
		InFlight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "drover", Name: "handlers_in_flight",
			Help: "Handlers running now, by workflow.",
		}, []string{"workflow"}),
		DeadLetters: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "dead_letters_total",
			Help: "Messages moved to the dead-letter stream, by workflow and cause (invalid, terminal, budget, orphan).",
		}, []string{"workflow", "cause"}),
		LeaseWaits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "lease_waits_total",
			Help: "Deliveries that found a lease busy and were sent back to wait, by workflow.",
		}, []string{"workflow"}),
		Preemptions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "preemptions_total",
			Help: "Yield requests made to a lower-priority lease holder, by the holder's workflow and the requester's.",
		}, []string{"workflow", "by"}),
		LeasesLost: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "leases_lost_total",
			Help: "Handlers stopped because their lease could not be renewed in time, by workflow.",
		}, []string{"workflow"}),
		Orphans: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "orphans_total",
			Help: "Messages no consumer would deliver again and operations stuck without a live holder, found by the reconciler, by kind.",
		}, []string{"kind"}),
		OldestAge: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "drover", Name: "oldest_unacked_message_age_seconds",
			Help: "Age of the oldest request message not yet acknowledged, as the reconciler last saw it.",
		}),
		Operations: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "drover", Name: "operations",
			Help: "Unfinished operations by workflow and state (pending, running, waiting, suspended), as the reconciler last counted them.",
		}, []string{"workflow", "state"}),
	}
	if reg != nil {
		reg.MustRegister(m.Messages, m.Duration, m.InFlight, m.DeadLetters, m.LeaseWaits, m.Preemptions,
			m.LeasesLost, m.Orphans, m.OldestAge, m.Operations)
	}
	return m
}
