// Package producers holds what every event source shares: a Publisher that
// validates a CloudEvent, derives its subject and message id and publishes it
// to JetStream, reporting duplicates. Each source lives in its own
// sub-package (nodewatch, alertmanager, gitops, ingress) and only publishes.
package producers
