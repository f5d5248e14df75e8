package demo

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

// TestDemo runs `make demo` end to end, so that the newcomer's first command
// keeps working: real control plane, simulator, drover, kubectl drain.
func TestDemo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	var out bytes.Buffer
	sum, err := Run(ctx, Options{Out: &out, LogDir: t.TempDir()})
	t.Log("\n" + out.String())
	require.NoError(t, err)
	require.Empty(t, sum.Violations)
	require.Equal(t, consumers.StateSucceeded, sum.Events[schemas.TypeMaintenanceRequested])
	s := out.String()
	require.Contains(t, s, "duplicate: yes", "the repeated request is reported as a duplicate")
	require.Contains(t, s, "does not exist", "the unknown VM is dead-lettered with a reason")
	require.Contains(t, s, "drained", "kubectl drain completes through the simulator's eviction webhook")
	require.Len(t, sum.Recoveries, 2, "the node watcher's and Alertmanager's recoveries")
	for _, msg := range sum.Recoveries {
		require.Contains(t, msg, "VMs Running elsewhere")
		require.Regexp(t, `gate opened \+.* \(taint\), cleaned up \+.*, all Running \+`, msg)
	}
	require.Contains(t, s, "waiting for the out-of-service taint on the node or a node.fenced event", "the gate's wait is shown")
	require.Contains(t, s, "drover's taints removed")
	require.Contains(t, s, "Summary of this run")
}
