package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/cmd/drover/app"
	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/gitrepo"
	"github.com/drover-io/drover/producers/gitops"
)

// TestGitOpsMaintenance: a commit adding a request for a node with 8 mixed
// VMs cordons it and moves every VM as its strategies say; the request is
// acknowledged only after that; removing the file gives the node back.
func TestGitOpsMaintenance(t *testing.T) {
	t.Parallel()
	remote, err := gitrepo.NewRemote(t.TempDir())
	require.NoError(t, err)
	clone, err := remote.NewClone(t.TempDir())
	require.NoError(t, err)
	_, err = clone.CommitAndPush(map[string]string{"README.md": "maintenance requests live in maintenance/"}, nil, "init")
	require.NoError(t, err)
	e := StartT(t, Options{Scenario: mixedScene, Serve: func(o *app.Options) {
		o.Git.URL, o.Git.Interval = remote.URL, time.Second
	}})
	ctx := ctxT(t, 5*time.Minute)

	file := gitrepo.Request("node-1-bios", "node-1", "BIOS update", "")
	parsed, err := gitops.Parse([]byte(file))
	require.NoError(t, err)
	key := consumers.MaintenanceOperationKey("node-1", parsed.RequestID())
	s := startSampler(t, e, func(ctx context.Context) string {
		rec, ok := e.Op(ctx, key)
		if !ok || rec.State.Terminal() {
			return ""
		}
		on := 0
		for _, name := range []string{"web-1", "web-2", "db-1", "ext-1", "app-1", "batch-1"} {
			if v := e.VMI(ctx, "default", name); v == nil || v.Status.NodeName == "node-1" || v.Status.Phase != kvv1.Running {
				on++
			}
		}
		if on > 0 && requestsInStream(ctx, e, "drover.req.maintenance-requested.>") == 0 {
			return fmt.Sprintf("request acknowledged while %d VMs were not yet running elsewhere", on)
		}
		return ""
	})
	_, err = clone.CommitAndPush(map[string]string{"maintenance/node-1-bios.yaml": file}, nil, "service node-1")
	require.NoError(t, err)
	rec := waitOp(t, e, key, 3*time.Minute, consumers.StateSucceeded, consumers.StateFailed)
	s.Stop()
	require.Equal(t, consumers.StateSucceeded, rec.State, rec.Message+rec.LastError)
	require.Empty(t, s.broken)
	require.Zero(t, requestsInStream(ctx, e, "drover.req.maintenance-requested.>"), "acknowledged once completed")
	require.True(t, e.Node(ctx, "node-1").Spec.Unschedulable)
	require.Empty(t, e.VMIsOn(ctx, "node-1"))

	_, err = clone.CommitAndPush(nil, []string{"maintenance/node-1-bios.yaml"}, "node-1 done")
	require.NoError(t, err)
	waitOp(t, e, consumers.MaintenanceEndOperationKey("node-1", parsed.RequestID()), 2*time.Minute, consumers.StateSucceeded)
	require.False(t, e.Node(ctx, "node-1").Spec.Unschedulable, "removing the file uncordons")
	require.Empty(t, e.Sim.Violations())
}
