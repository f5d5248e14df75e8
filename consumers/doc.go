// Package consumers is drover's JetStream runtime: it declares the streams,
// KV buckets and durable pull consumers, fetches one message per worker slot,
// keeps the message and the per-node lease alive while a handler runs, and maps
// the handler's result to exactly one of ack, nak-with-backoff or dead-letter.
// Handlers (package handlers/...) see events and operation records, never NATS.
package consumers
