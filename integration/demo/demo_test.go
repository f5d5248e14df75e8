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
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
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
	require.Contains(t, s, "Summary of this run")
}
