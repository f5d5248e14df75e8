package consumers

import (
	"context"
	"sort"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/drover-io/drover/schemas"
)

var phaseOf = map[State]string{
	StatePending: schemas.PhasePending, StateRunning: schemas.PhaseRunning, StateWaiting: schemas.PhaseWaiting,
	StateSuspended: schemas.PhaseSuspended, StateSucceeded: schemas.PhaseSucceeded,
	StateFailed: schemas.PhaseFailed, StateCancelled: schemas.PhaseCancelled,
}

// statusBudget bounds the VM deltas of one status event well inside the
// event size limit; a larger batch is split over several events.
const statusBudget = schemas.MaxEventBytes / 2

// statusPublisher turns operation records and progress deltas into status
// events. Progress and phase changes are published asynchronously; the
// final phase of an operation is published and confirmed before the message
// is settled, so it always arrives and always fits (a summary, no snapshot).
type statusPublisher struct {
	js     jetstream.JetStream
	source string
	log    zerolog.Logger
}

// publish sends the status of rec: its phase, the given VM deltas (split in
// as many events as their size needs) and the summary. It returns the
// futures of the publishes so that a caller can wait for the final one.
func (p *statusPublisher) publish(rec Record, phase, note string, seq func() int, deltas []schemas.VMProgress) []jetstream.PubAckFuture {
	base := schemas.Status{Operation: rec.Key, Workflow: rec.Workflow, Phase: phase,
		Message: truncate(oneLine(note), 4096), Generation: max(rec.Generation, 1), Attempt: rec.Attempts}
	if ns, name, ok := strings.Cut(rec.Target, "/"); ok {
		base.VM = ns + "/" + name
	} else {
		base.Node = rec.Target
	}
	if len(rec.Summary) > 0 {
		base.Summary = &schemas.Summary{Total: rec.Total(), Phases: rec.Summary}
	}
	var futs []jetstream.PubAckFuture
	chunks := chunkDeltas(deltas)
	if len(chunks) == 0 {
		chunks = [][]schemas.VMProgress{nil}
	}
	for i, c := range chunks {
		st := base
		st.VMs = c
		if i < len(chunks)-1 && phase != schemas.PhaseRunning {
			// Readers stop at an operation's final phase: it goes last.
			st.Phase = schemas.PhaseRunning
		}
		id := schemas.DeterministicID(rec.Key, strconv.Itoa(st.Generation), strconv.Itoa(st.Attempt), st.Phase, strconv.Itoa(seq()))
		msg, err := schemas.NewStatusMsg(p.source, id, &st)
		if err == nil {
			var fut jetstream.PubAckFuture
			fut, err = p.js.PublishMsgAsync(msg)
			if err == nil {
				futs = append(futs, fut)
			}
		}
		if err != nil {
			p.log.Warn().Err(err).Str("op", rec.Key).Str("phase", phase).Msg("could not publish status")
		}
	}
	return futs
}

// wait waits for the futures of a final status, bounded by ctx.
func (p *statusPublisher) wait(ctx context.Context, key string, futs []jetstream.PubAckFuture) {
	for _, f := range futs {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			p.log.Warn().Err(err).Str("op", key).Msg("final status not stored")
		case <-ctx.Done():
			p.log.Warn().Err(ctx.Err()).Str("op", key).Msg("final status not confirmed")
			return
		}
	}
}

// chunkDeltas splits VM deltas so that each event stays within statusBudget.
func chunkDeltas(vms []schemas.VMProgress) [][]schemas.VMProgress {
	var out [][]schemas.VMProgress
	var cur []schemas.VMProgress
	size := 0
	for _, v := range vms {
		n := len(v.Namespace) + len(v.Name) + len(v.Phase) + len(v.Node) + len(v.Message) + 64
		if size+n > statusBudget && len(cur) > 0 {
			out = append(out, cur)
			cur, size = nil, 0
		}
		cur = append(cur, v)
		size += n
	}
	if len(cur) > 0 {
		out = append(out, cur)
	}
	return out
}

// vmDeltas turns changed targets into status entries; targets that are not
// namespace/name are left out of the list (they still count in the summary).
func vmDeltas(o *Operation, targets []string) []schemas.VMProgress {
	out := make([]schemas.VMProgress, 0, len(targets))
	for _, t := range targets {
		ns, name, ok := strings.Cut(t, "/")
		if !ok {
			continue
		}
		p, _ := o.progress.get(t)
		phase := p.Phase
		if phase == "" {
			phase = "Unknown"
		}
		out = append(out, schemas.VMProgress{Namespace: ns, Name: name, Phase: truncate(phase, 4096), Node: p.Node, Message: truncate(p.Message, 4096)})
	}
	return out
}

func oneLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

// truncate cuts s to at most n bytes without splitting a character.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "")
}

// statusNote is what the status event says about a record.
func statusNote(rec Record, note string) string {
	switch {
	case note != "":
		return note
	case rec.State == StateWaiting || rec.State == StateSuspended:
		return rec.WaitReason
	case rec.LastError != "":
		return rec.LastError
	default:
		return rec.Message
	}
}

// donePhases are the target phases that mean a target's work is done: the
// VM runs where it should, or is in the state its strategy asked for.
var donePhases = map[string]bool{"Running": true, "Succeeded": true, "Done": true, "Completed": true,
	"Migrated": true, "Restarted": true, "Stopped": true, "ShutDown": true, "Skipped": true,
	"Stayed": true, "Home": true, "Started": true}

// TargetDone reports whether a target's phase means its work is done, for
// readers that count progress (the CLI, the page, NodeMaintenance status).
func TargetDone(phase string) bool { return donePhases[phase] }

// DonePhases lists the phases TargetDone accepts, sorted.
func DonePhases() []string {
	out := make([]string, 0, len(donePhases))
	for p := range donePhases {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}
