package platform

import (
	"sync"
	"time"
)

// Estimator corrects the expected duration of migrations and restarts with
// what drover measured on this cluster: the ratio of measured to predicted
// time, averaged (exponentially, recent runs weigh more). It starts at 1.
type Estimator struct {
	mu         sync.Mutex
	migration  float64
	migrationN int
	restart    float64
	restartN   int
}

// NewEstimator returns an estimator that has measured nothing.
func NewEstimator() *Estimator { return &Estimator{migration: 1, restart: 1} }

// alpha weighs a new measurement.
const alpha = 0.3

func ewma(cur float64, n int, x float64) float64 {
	if n == 0 {
		return x
	}
	return (1-alpha)*cur + alpha*x
}

// ObserveMigration records a migration that was predicted to take predicted
// (uncorrected) and took took.
func (e *Estimator) ObserveMigration(predicted, took time.Duration) {
	if predicted <= 0 || took <= 0 {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.migration = ewma(e.migration, e.migrationN, float64(took)/float64(predicted))
	e.migrationN++
}

// ObserveRestart records a restart predicted to take predicted that took took.
func (e *Estimator) ObserveRestart(predicted, took time.Duration) {
	if predicted <= 0 || took <= 0 {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.restart = ewma(e.restart, e.restartN, float64(took)/float64(predicted))
	e.restartN++
}

// Corrections returns the migration and restart corrections and how many
// migrations they rest on.
func (e *Estimator) Corrections() (migration, restart float64, samples int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.migration, e.restart, e.migrationN
}
