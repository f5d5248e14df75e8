package consumers_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

// A dry run of a maintenance request is its own operation and takes no
// lease: it changes nothing, must not wait behind a running evacuation of
// the node, and must not make the real request with the same id a duplicate.
func TestRouteMaintenanceDryRun(t *testing.T) {
	real := &schemas.MaintenanceRequested{Node: "node-1", RequestID: "chg-1", Reason: "r", RequestedBy: "b"}
	dry := *real
	dry.DryRun = true
	tests := []struct {
		name      string
		p         schemas.Payload
		wantOp    string
		wantLocks int
	}{
		{name: "real request", p: real, wantOp: consumers.MaintenanceOperationKey("node-1", "chg-1"), wantLocks: 1},
		{name: "dry run", p: &dry, wantOp: consumers.MaintenancePlanOperationKey("node-1", "chg-1"), wantLocks: 0},
		{name: "cancel of a migration", p: &schemas.VMMigrateCancelled{Namespace: "ns", Name: "vm"},
			wantOp: consumers.MigrationCancelOperationKey("ns", "vm", "ev-1"), wantLocks: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keys, err := consumers.Route(tt.p, "ev-1")
			require.NoError(t, err)
			require.Equal(t, tt.wantOp, keys.Operation)
			require.Len(t, keys.Locks, tt.wantLocks)
		})
	}
	require.NotEqual(t, consumers.MaintenanceOperationKey("node-1", "chg-1"), consumers.MaintenancePlanOperationKey("node-1", "chg-1"))
}
