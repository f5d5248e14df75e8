// Package app is the drover command's wiring: flag and configuration parsing,
// `drover serve` (embedded or external NATS, the consumers runtime, metrics)
// and the client commands humans and chatops bots use. It is importable so
// that integration tests and the demo run drover in-process.
package app
