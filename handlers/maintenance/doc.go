// Package maintenance is drover's maintenance workflow: a pure plan (Make:
// an action per VM by eviction strategy, run strategy and the
// drover.io/maintenance-strategy label, a capacity verdict, an order and the
// expected makespan) and an idempotent executor that cordons the node,
// migrates, restarts and shuts down VMs within the cluster's migration
// limits, evicts the remaining pods and, when the maintenance ends, undoes
// what drover did to the node.
package maintenance
