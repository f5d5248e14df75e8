package app

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"sigs.k8s.io/yaml"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// offline runs the CLI with no NATS anywhere: commands that would connect
// fail, so a test sees whether anything was attempted.
func offline(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	return drover(t, "nats://127.0.0.1:1", args...)
}

func TestCompletion(t *testing.T) {
	for shell, marker := range map[string]string{"bash": "__start_drover", "zsh": "#compdef drover", "fish": "complete -c drover"} {
		code, out, errOut := offline(t, "completion", shell)
		require.Equal(t, ExitOK, code, errOut)
		require.Contains(t, out, marker, shell)
	}
	// The scripts ask drover itself (__complete) for candidates: the
	// subcommands and flags are offered from the command tree.
	code, out, _ := offline(t, "__complete", "")
	require.Equal(t, ExitOK, code)
	for _, sub := range []string{"serve", "maintenance", "vm", "node", "recovery", "status", "dlq", "op", "auth", "version"} {
		require.Contains(t, out, sub+"\t", "completion offers %s", sub)
	}
	require.NotContains(t, out, "docs\t", "the hidden docs command is not offered")
	code, out, _ = offline(t, "__complete", "maintenance", "")
	require.Equal(t, ExitOK, code)
	require.Contains(t, out, "start\t")
	require.Contains(t, out, "end\t")
	code, out, _ = offline(t, "__complete", "maintenance", "start", "node-1", "--re")
	require.Equal(t, ExitOK, code)
	require.Contains(t, out, "--reason")
	require.Contains(t, out, "--request-id")
	require.Contains(t, out, "--return-home")
	// -o offers its formats, not file names.
	code, out, _ = offline(t, "__complete", "status", "-o", "")
	require.Equal(t, ExitOK, code)
	for _, f := range []string{"table", "json", "yaml"} {
		require.Contains(t, out, f+"\n")
	}
	require.Contains(t, out, ":4\n", "no file completion")
	code, _, _ = offline(t, "completion", "tcsh")
	require.Equal(t, ExitUsage, code)
}

func TestHelp(t *testing.T) {
	for _, tt := range []struct {
		args  []string
		flags []string
	}{
		{[]string{"maintenance", "start", "--help"}, []string{"--reason", "--mode", "--request-id", "--force", "--return-home", "--dry-run", "--wait", "--nats-url", "--nats-nkey"}},
		{[]string{"help", "maintenance", "end"}, []string{"--request-id", "--wait", "--nats-url"}},
		{[]string{"vm", "migrate", "-h"}, []string{"--node-selector", "--request-id", "--wait"}},
		{[]string{"status", "--help"}, []string{"--watch", "-o, --output", "OPERATION"}},
		{[]string{"dlq", "show", "--help"}, []string{"SEQ", "--output"}},
		{[]string{"auth", "new-user", "--help"}, []string{"--role", "--seed-file"}},
		{[]string{"--help"}, []string{"maintenance", "status", "completion", "Exit codes"}},
	} {
		code, out, errOut := offline(t, tt.args...)
		require.Equal(t, ExitOK, code, "%v: %s", tt.args, errOut)
		for _, f := range tt.flags {
			require.Contains(t, out, f, "%v lists %s", tt.args, f)
		}
	}
	// drover serve --help lists every option LoadOptions reads.
	code, out, _ := offline(t, "serve", "--help")
	require.Equal(t, ExitOK, code)
	require.Contains(t, out, "--config")
	d := DefaultOptions()
	for _, f := range d.fields() {
		require.Contains(t, out, "--"+f.flag+" ", "serve --help lists --%s", f.flag)
		require.Contains(t, out, f.env)
	}
	require.Contains(t, out, `--ack-wait duration`)
	require.Contains(t, out, `(default 30s)`)

	code, _, errOut := offline(t)
	require.Equal(t, ExitUsage, code, "drover alone is a usage error")
	require.Contains(t, errOut, "Available Commands")
}

// Bad arguments exit 2 before anything connects: with no NATS anywhere, a
// command that tried would exit 1.
func TestBadArgumentsExitBeforeConnecting(t *testing.T) {
	for _, args := range [][]string{
		{"maintenance", "start", "node-1", "--reason", "x", "--bogus"},
		{"maintenance", "start", "--reason", "x"},
		{"maintenance", "start", "a", "b", "--reason", "x"},
		{"maintenance"},
		{"maintenance", "frob"},
		{"vm", "migrate", "ns/vm", "--frob"},
		{"status", "a", "b"},
		{"status", "-o", "xml"},
		{"dlq", "show"},
		{"dlq", "show", "0"},
		{"op", "retry"},
		{"serve", "--nats-lisen", "x"},
		{"serve", "extra"},
		{"serve", "--ack-wait", "soon"},
		{"recovery", "pause", "now"},
	} {
		code, out, errOut := offline(t, args...)
		require.Equal(t, ExitUsage, code, "%v: %s", args, errOut)
		require.Contains(t, errOut, "drover: ", "%v says what is wrong", args)
		require.Empty(t, out, "%v", args)
	}
	code, _, errOut := offline(t, "dlq", "list")
	require.Equal(t, ExitError, code, "a command that runs and cannot reach NATS exits 1")
	require.Contains(t, errOut, "connect to NATS")
}

func TestServeFlagsThroughPflag(t *testing.T) {
	o, err := LoadOptions([]string{"--reconfigure", "--nodewatch=false", "--ack-wait=45s", "--max-deliver", "3"}, env(nil))
	require.NoError(t, err)
	require.True(t, o.Reconfigure, "a boolean flag alone is true")
	require.False(t, o.NodeWatch)
	require.Equal(t, 45*time.Second, o.AckWait)
	require.Equal(t, 3, o.MaxAttempts)
	_, err = LoadOptions([]string{"--nodewatch=maybe"}, env(nil))
	require.ErrorContains(t, err, "--nodewatch: not true or false")
}

// The committed configuration reference is what the options generate now
// (make verify checks the same).
func TestConfigReferenceUpToDate(t *testing.T) {
	var b bytes.Buffer
	require.NoError(t, WriteConfigReference(&b))
	committed, err := os.ReadFile(filepath.Join("..", "..", "..", ConfigReferencePath))
	require.NoError(t, err)
	require.Equal(t, string(committed), b.String(), "%s is out of date: run make docs", ConfigReferencePath)
	d := DefaultOptions()
	for _, f := range d.fields() {
		require.Contains(t, b.String(), "| `--"+f.flag+"` | `"+f.env+"` |")
	}
	code, out, _ := offline(t, "docs", "config")
	require.Equal(t, ExitOK, code)
	require.Equal(t, b.String(), out)
}

// An operation with VMs, followed through status and status OPERATION, and
// a dead letter shown with dlq show.
func TestStatusOperationAndDeadLetter(t *testing.T) {
	srv := natstest.Start(t)
	nc := natstest.Connect(t, srv.URL())
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	cfg := consumers.Config{AckWait: 3 * time.Second, StatusInterval: 50 * time.Millisecond, FetchWait: 200 * time.Millisecond,
		ShutdownGrace: time.Second, BackoffBase: 50 * time.Millisecond, BackoffMax: 100 * time.Millisecond}
	release := make(chan struct{})
	handler := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		if ev.Payload.(*schemas.MaintenanceRequested).RequestID == "doomed" {
			return consumers.Terminalf("node-2 has no room for db-9")
		}
		for vm, p := range map[string]consumers.TargetProgress{
			"ns/vm-a": {Phase: "Running", Node: "node-2", Message: "migrated in 3s"},
			"ns/vm-b": {Phase: "Migrating", Node: "node-3"},
			"ns/vm-c": {Phase: "Pending", Message: "waiting for a migration slot"},
		} {
			if err := op.Progress(ctx, vm, p); err != nil {
				return err
			}
		}
		if err := op.Flush(ctx); err != nil {
			return err
		}
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})
	rt, err := consumers.NewRuntime(natstest.Connect(t, srv.URL()), cfg, zerolog.New(zerolog.NewTestWriter(t)), nil,
		consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: handler})
	require.NoError(t, err)
	rctx, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- rt.Start(rctx) }()
	t.Cleanup(func() { stop(); <-stopped })
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	require.Eventually(t, func() bool {
		_, err := js.Consumer(context.Background(), consumers.StreamRequests, schemas.WorkflowMaintenance)
		return err == nil
	}, 30*time.Second, 50*time.Millisecond)
	publish := func(id, req string) {
		e, err := schemas.New("test", id, &schemas.MaintenanceRequested{Node: "node-1", RequestID: req, Reason: "r", RequestedBy: "t"})
		require.NoError(t, err)
		_, err = (&producers.Publisher{JS: js}).Publish(context.Background(), e)
		require.NoError(t, err)
	}
	key := consumers.MaintenanceOperationKey("node-1", "live")
	publish("live-1", "live")

	// The table: the columns, the operation with 1 of 3 VMs done.
	require.Eventually(t, func() bool {
		code, out, _ := drover(t, srv.URL(), "status")
		return code == ExitOK && strings.Contains(out, key) && strings.Contains(out, "1/3")
	}, 20*time.Second, 50*time.Millisecond)
	code, out, _ := drover(t, srv.URL(), "status")
	require.Equal(t, ExitOK, code)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Equal(t, []string{"OPERATION", "WORKFLOW", "TARGET", "PHASE", "VMS", "AGE", "MESSAGE"}, strings.Fields(lines[0]))
	var row []string
	for _, l := range lines[1:] {
		if f := strings.Fields(l); len(f) > 0 && f[0] == key {
			row = f
		}
	}
	require.NotNil(t, row, out)
	require.Equal(t, []string{key, schemas.WorkflowMaintenance, "node-1"}, row[:3])
	require.True(t, strings.HasPrefix(row[3], string(consumers.StateRunning)), "phase %q", row[3])
	require.Equal(t, "1/3", row[4])
	require.Regexp(t, `^\d+s$`, row[5], "age")

	// -o yaml parses back into the records.
	code, out, _ = drover(t, srv.URL(), "status", "-o", "yaml")
	require.Equal(t, ExitOK, code)
	var recs []consumers.Record
	require.NoError(t, yaml.Unmarshal([]byte(out), &recs), out)
	require.Len(t, recs, 1)
	require.Equal(t, key, recs[0].Key)
	require.Equal(t, 3, recs[0].Total())

	// status OPERATION: every VM with its phase, node and message.
	code, out, errOut := drover(t, srv.URL(), "status", key)
	require.Equal(t, ExitOK, code, errOut)
	require.Contains(t, out, "Operation:")
	require.Contains(t, out, key)
	require.Contains(t, out, "1/3 done")
	vmRows := map[string][]string{}
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) >= 3 && strings.HasPrefix(f[0], "ns/") {
			vmRows[f[0]] = f
		}
	}
	require.Len(t, vmRows, 3, out)
	require.Equal(t, []string{"ns/vm-a", "Running", "node-2"}, vmRows["ns/vm-a"][:3])
	require.Equal(t, []string{"ns/vm-b", "Migrating", "node-3"}, vmRows["ns/vm-b"][:3])
	require.Equal(t, []string{"ns/vm-c", "Pending", "-"}, vmRows["ns/vm-c"][:3])
	require.Contains(t, out, "migrated in 3s")
	require.Contains(t, out, "waiting for a migration slot")
	code, out, _ = drover(t, srv.URL(), "status", key, "-o", "json")
	require.Equal(t, ExitOK, code)
	var view OperationView
	require.NoError(t, json.Unmarshal([]byte(out), &view))
	require.Equal(t, key, view.Key)
	require.Len(t, view.VMs, 3)
	require.Equal(t, "ns/vm-b", view.VMs[1].Target)
	require.Equal(t, "node-3", view.VMs[1].Node)
	code, _, errOut = drover(t, srv.URL(), "status", "maintenance.no-such-op")
	require.Equal(t, ExitError, code)
	require.Contains(t, errOut, "does not exist")
	close(release)

	// A dead letter: dlq show prints why, the headers, the deliveries and the event.
	publish("doomed-1", "doomed")
	var dls []map[string]any
	require.Eventually(t, func() bool {
		code, out, _ := drover(t, srv.URL(), "dlq", "list", "-o", "json")
		return code == ExitOK && json.Unmarshal([]byte(out), &dls) == nil && len(dls) == 1
	}, 20*time.Second, 50*time.Millisecond)
	seq := strconv.FormatUint(uint64(dls[0]["seq"].(float64)), 10)
	code, out, errOut = drover(t, srv.URL(), "dlq", "show", seq)
	require.Equal(t, ExitOK, code, errOut)
	require.Contains(t, out, "Reason:")
	require.Contains(t, out, "node-2 has no room for db-9")
	require.Regexp(t, `Deliveries:\s+`+jsonNum(dls[0]["deliveries"].(float64))+`\n`, out)
	require.Contains(t, out, "Headers:")
	require.Contains(t, out, consumers.HeaderDLQReason+":")
	require.Contains(t, out, "ce-type: "+schemas.TypeMaintenanceRequested)
	require.Contains(t, out, `"requestID": "doomed"`, "the event's data, pretty-printed")
	require.Contains(t, out, `"type": "`+schemas.TypeMaintenanceRequested+`"`)
	code, out, _ = drover(t, srv.URL(), "dlq", "show", seq, "-o", "yaml")
	require.Equal(t, ExitOK, code)
	var dl DeadLetterView
	require.NoError(t, yaml.Unmarshal([]byte(out), &dl))
	require.Contains(t, dl.Reason, "node-2 has no room for db-9")
	require.Equal(t, consumers.MaintenanceOperationKey("node-1", "doomed"), dl.Operation)
	var ev map[string]any
	require.NoError(t, json.Unmarshal(dl.Event, &ev))
	require.Equal(t, "doomed-1", ev["id"])
	code, _, errOut = drover(t, srv.URL(), "dlq", "show", "999")
	require.Equal(t, ExitError, code)
	require.Contains(t, errOut, "dead letter 999 does not exist")
}
