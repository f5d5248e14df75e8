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
	// Finished counts operations that reached a final state (succeeded,
	// failed, cancelled), by workflow, as the replica that settled them saw it.
	Finished *prometheus.CounterVec
	// GateWaits counts deliveries sent back to wait, by workflow and what
	// they waited for: "lease" (another operation holds the node), or the
	// gate a handler named with WaitFor (fencing, storm, eviction...);
	// "other" for a plain Wait.
	GateWaits *prometheus.CounterVec
	// OldestOperation is the age (since created) of the oldest unfinished
	// operation, by workflow and state, as the reconciler last counted.
	OldestOperation *prometheus.GaugeVec
	// InPhase counts unfinished operations by workflow and the phase of
	// their last checkpoint (a recovery at its fencing gate: "gate"), as
	// the reconciler last counted.
	InPhase *prometheus.GaugeVec
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
		Finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "operations_finished_total",
			Help: "Operations that reached a final state, by workflow and state (succeeded, failed, cancelled).",
		}, []string{"workflow", "state"}),
		GateWaits: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "drover", Name: "gate_waits_total",
			Help: "Deliveries sent back to wait, by workflow and reason (lease, fencing, storm, paused, eviction, restart, release, lease_renewing, other).",
		}, []string{"workflow", "reason"}),
		OldestOperation: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "drover", Name: "operation_oldest_age_seconds",
			Help: "Age since creation of the oldest unfinished operation, by workflow and state, as the reconciler last saw it.",
		}, []string{"workflow", "state"}),
		InPhase: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: "drover", Name: "operations_in_phase",
			Help: "Unfinished operations by workflow and the phase of their last checkpoint (recovery: detect, paused, storm, gate, cleanup...), as the reconciler last counted them.",
		}, []string{"workflow", "phase"}),
	}
	if reg != nil {
		reg.MustRegister(m.Messages, m.Duration, m.InFlight, m.DeadLetters, m.LeaseWaits, m.Preemptions,
			m.LeasesLost, m.Orphans, m.OldestAge, m.Operations, m.Finished, m.GateWaits, m.OldestOperation, m.InPhase)
	}
	return m
}

// DeadLetterCauses are the cause labels of drover_dead_letters_total.
var DeadLetterCauses = []string{"invalid", "terminal", "budget", "orphan"}

// initWorkflow creates the counters alerts take increase() of at 0 for a
// workflow: a series that first appears at 1 has no increase, so the first
// dead letter of a replica's life would never alert.
func (m *Metrics) initWorkflow(workflow string) {
	for _, cause := range DeadLetterCauses {
		m.DeadLetters.WithLabelValues(workflow, cause)
	}
	for _, st := range []State{StateSucceeded, StateFailed, StateCancelled} {
		m.Finished.WithLabelValues(workflow, string(st))
	}
}

// finished counts an operation that reached a final state.
func (m *Metrics) finished(workflow string, state State) {
	if workflow != "" && state.Terminal() {
		m.Finished.WithLabelValues(workflow, string(state)).Inc()
	}
}

// GateOther is the gate label of a plain Wait.
const GateOther = "other"

// GateLease is the gate label of a delivery that waits for a lease.
const GateLease = "lease"
