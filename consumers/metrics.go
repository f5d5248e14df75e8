package consumers

import "github.com/prometheus/client_golang/prometheus"

// Results a message can end with, the "result" label of drover_messages_total.
const (
	ResultAcked        = "acked"         // handler succeeded (or cancelled cleanly)
	ResultSkipped      = "skipped"       // operation already finished: acked without acting
	ResultRetried      = "retried"       // nak with backoff
	ResultDeadLettered = "dead_lettered" // moved to DROVER_DLQ and terminated
	ResultAbandoned    = "abandoned"     // lease lost or shutdown: left unacked for redelivery
)

// Metrics are the runtime's Prometheus metrics.
type Metrics struct {
	Messages    *prometheus.CounterVec
	Duration    *prometheus.HistogramVec
	InFlight    *prometheus.GaugeVec
	DeadLetters *prometheus.CounterVec
	LeaseWaits  *prometheus.CounterVec
}

// NewMetrics registers the runtime's metrics with reg (nil: not registered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		Messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "messages_total",
			Help: "Request messages handled, by workflow and result.",
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
			Help: "Messages moved to the dead-letter stream, by workflow and cause.",
		}, []string{"workflow", "cause"}),
		LeaseWaits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "lease_waits_total",
			Help: "Deliveries that found their lease held by another worker, by workflow.",
		}, []string{"workflow"}),
	}
	if reg != nil {
		reg.MustRegister(m.Messages, m.Duration, m.InFlight, m.DeadLetters, m.LeaseWaits)
	}
	return m
}
