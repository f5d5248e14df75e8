package platform

import (
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kvv1 "kubevirt.io/api/core/v1"
)

// Metrics count what the workflows did to the cluster.
type Metrics struct {
	// MigrationsCreated counts migration objects created, by platform.
	MigrationsCreated *prometheus.CounterVec
	// MigrationsRefused counts creates the platform's admission refused:
	// drover checks what admission checks first, so it should stay 0.
	MigrationsRefused *prometheus.CounterVec
	// InFlight reports, at each scrape, the unfinished migrations drover
	// created, from the Cluster's caches (the Cluster built with these
	// metrics: New connects them).
	InFlight *InFlightCollector
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
		InFlight: &InFlightCollector{desc: prometheus.NewDesc("drover_migrations_in_flight",
			"Unfinished migrations drover created (by any workflow, any replica), by platform, as this replica's caches see them.",
			[]string{"platform"}, nil)},
	}
	if reg != nil {
		reg.MustRegister(m.MigrationsCreated, m.MigrationsRefused, m.InFlight)
	}
	return m
}

// InFlightCollector is drover_migrations_in_flight: counted from the
// informer caches at each scrape, so that it cannot drift from the cluster
// when a replica dies mid-migration.
type InFlightCollector struct {
	desc    *prometheus.Desc
	cluster atomic.Pointer[Cluster]
}

// Describe implements prometheus.Collector.
func (c *InFlightCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector: nothing until the caches synced.
func (c *InFlightCollector) Collect(ch chan<- prometheus.Metric) {
	cl := c.cluster.Load()
	if cl == nil {
		return
	}
	select {
	case <-cl.ready:
	default:
		return
	}
	if cl.readyErr != nil {
		return
	}
	n := 0
	for _, o := range cl.vmims.GetStore().List() {
		if m := vmimToMigration(o.(*kvv1.VirtualMachineInstanceMigration)); m.Operation != "" && !m.Final {
			n++
		}
	}
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), KubeVirt)
	if cl.vmops == nil {
		return
	}
	n = 0
	for _, o := range cl.vmops.GetStore().List() {
		if m, ok := vmopToMigration(o.(*unstructured.Unstructured)); ok && m.Operation != "" && !m.Final {
			n++
		}
	}
	ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(n), Deckhouse)
}
