// Package handlers holds drover's workflows, one sub-package each: what
// happens in the cluster when an event arrives. Handlers implement
// consumers.Handler; they see events and operation records, never NATS.
package handlers
