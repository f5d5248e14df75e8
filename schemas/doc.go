// Package schemas is the event contract shared by drover's producers, consumers and handlers:
// the CloudEvents types and their JSON Schemas, validation, NATS subjects with reversibly encoded
// targets, deterministic ids, and the CloudEvents NATS protocol binding (binary and structured mode).
// It imports nothing else from this repository.
package schemas
