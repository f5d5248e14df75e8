// Package consumers is drover's JetStream runtime. It declares the streams
// and KV buckets, fetches one message per worker slot from each workflow's
// durable consumer, serialises work on a node with leases, keeps operation
// records, and maps each handler result to exactly one way of settling the
// message. Handlers (packages handlers/...) see events and operations, never
// NATS.
//
// # The path of a message
//
// decode (validate the CloudEvent once; poison is dead-lettered), route
// (operation key, leases, what it cancels; a Workflow.Resolver may refine
// them from the live cluster), lease (all of the operation's leases or
// none), start (create or resume the operation record, or skip a finished
// one, or dead-letter one out of budget), run (the handler, with the message
// and the leases kept alive), settle (the one place that acks, sends back,
// suspends or dead-letters).
//
// # Operations
//
// An operation is what an event asks for, not the event: a maintenance
// request, one incident of a node, a migration request. Its record (bucket
// drover-ops) carries its state (pending, running, waiting, suspended,
// succeeded, failed, cancelled), generation and attempt, the handler's
// checkpoint and a summary of its targets; per-target progress lives under
// its own keys (bucket drover-progress). A duplicate event, or a redelivery
// of a finished operation, is acknowledged without running the handler.
// `drover dlq replay` and `drover op retry` start a new generation, which
// runs again from a clean checkpoint.
//
// # Leases and pre-emption
//
// One lease per node (bucket drover-locks): two workflows never act on one
// node at once. A lease names its holder's operation and priority: recovery
// > maintenance end > maintenance > migration. A message whose lease is busy
// goes back at once with a jittered delay: waiting holds no worker slot and
// uses none of the operation's budget. A waiter of higher priority also asks
// the holder to yield; the holder's Operation.Preempted closes, the handler
// checkpoints and returns Yield, the operation is recorded suspended and the
// lease is reserved for the waiter. A handler that does not yield within
// Config.YieldGrace is cancelled with ErrPreempted, which counts as a yield.
//
// A holder renews its leases every heartbeat, each call within
// Config.CallTimeout; its lease is valid until the send time of its last
// successful renewal plus the TTL minus Config.LeaseMargin, and the handler's
// context is cancelled with ErrLeaseLost at that moment, before the key can
// expire on the server and another replica take it. Writes through
// Operation are fenced: once the attempt may no longer act they fail with
// ErrFenced and change nothing.
//
// # Budgets and orphans
//
// Consumers deliver without limit (waiting is a delivery too); the runtime
// counts an operation's handler runs itself (Workflow.MaxAttempts; a crash
// counts, a wait or a yield does not) and its age (Workflow.MaxAge), and
// dead-letters it when either is spent. A reconciler on one replica finds
// messages no consumer will deliver again and operations left running by a
// holder that is gone, and resumes them.
//
// # The handler contract
//
// A Handler must be idempotent: it may run again for the same operation
// after a crash, a yield or a wait, and must then re-plan from the live
// cluster, using the operation's checkpoint and progress as hints of how far
// an earlier attempt got. It returns:
//
//   - nil: the work is complete, or cleanly cancelled after
//     Operation.Cancelled closed. The record becomes succeeded (or
//     cancelled), the final status is published and the message acked.
//   - Terminal(err): no retry can help. The message goes to DROVER_DLQ with
//     the reason and the operation fails.
//   - Wait(d, why): something outside drover must happen first (fencing, a
//     disruption budget). The operation waits, its leases stay reserved for
//     it, and the handler runs again after d, at no cost to its budget.
//   - Yield(why), after Operation.Preempted closed: suspended until the
//     higher-priority operation is done.
//   - any other error: the attempt failed; it is retried with backoff until
//     the budget is spent.
//
// The handler's context ends with cause ErrLeaseLost, ErrPreempted or
// ErrShuttingDown; it must then stop touching the cluster.
//
// Operation gives a handler, safe from several goroutines: Resumed, Data and
// Targets (where an earlier attempt got), Checkpoint (phase, message and
// workflow data, written with compare-and-set), Progress and Flush (per
// target, written in batches and published as status deltas), Token (the
// fencing token to stamp on what it creates in Kubernetes), Cancelled and
// CancelReason, Preempted and PreemptedBy, Uncancellable (past the point of
// no return), Related and RelatedList (other operations), NodeState and
// UpdateNodeState (what drover does to a node; writable only by the node's
// lease holder).
//
// # A worked example
//
// A maintenance that moves every VM off a node, resumable and pre-emptible:
//
//	func (h *Evacuate) Handle(ctx context.Context, op *consumers.Operation, e consumers.Event) error {
//		req := e.Payload.(*schemas.MaintenanceRequested)
//		var plan Plan
//		if ok, err := op.Data(&plan); err != nil {
//			return consumers.Terminal(err)
//		} else if !ok || op.Attempt() > 1 {
//			// First run, or resumed after a crash or a recovery: plan from
//			// the live cluster, not from memory.
//			if plan, err = h.Plan(ctx, req.Node); err != nil {
//				return err // retried with backoff
//			}
//			if len(plan.Blocked) > 0 && !plan.Force {
//				return consumers.Terminalf("maintenance of %s rejected: %s", req.Node, plan.Blocked)
//			}
//		}
//		if _, err := op.UpdateNodeState(ctx, req.Node, func(st *consumers.NodeState) error {
//			st.Maintenance = op.Key()
//			return nil
//		}); err != nil {
//			return err
//		}
//		if err := op.Checkpoint(ctx, "migrating", plan.String(), plan); err != nil {
//			return err // ErrFenced: another attempt owns the operation
//		}
//		for _, vm := range plan.Order {
//			if op.Done(vm.Key(), "Running") {
//				continue // an earlier attempt moved it
//			}
//			select {
//			case <-op.Cancelled():
//				return h.AbortInFlight(ctx, op) // then nil: recorded cancelled
//			case <-op.Preempted():
//				if err := op.Checkpoint(ctx, "suspended", "pre-empted", plan); err != nil {
//					return err
//				}
//				return consumers.Yield("checkpointed before " + vm.Key())
//			default:
//			}
//			// The migration's name derives from the operation, so a re-run
//			// finds it instead of creating a twin; the token marks the attempt.
//			if err := h.Migrate(ctx, vm, op.Key(), op.Token()); err != nil {
//				return err
//			}
//			if err := op.Progress(ctx, vm.Key(), consumers.TargetProgress{Phase: "Running", Node: vm.Target}); err != nil {
//				return err
//			}
//			if err := op.Flush(ctx); err != nil {
//				return err
//			}
//		}
//		if blocked := h.EvictRest(ctx, req.Node); blocked != "" {
//			return consumers.Wait(10*time.Second, blocked) // a PodDisruptionBudget: check again
//		}
//		return nil
//	}
package consumers
