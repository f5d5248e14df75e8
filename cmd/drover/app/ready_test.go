package app

import (
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/integration/natstest"
)

// /readyz says ready only while NATS is connected and the consumers are
// bound: it flips when the NATS server goes away and back when it returns.
func TestReadinessFollowsNATS(t *testing.T) {
	dir := t.TempDir()
	ns := natstest.StartDir(t, dir, -1)
	port := ns.Addr().(*net.TCPAddr).Port
	info := serveWith(t, func(o *Options) { o.NATSURL = ns.ClientURL() })
	ready := func() int {
		resp, err := http.Get("http://" + info.HTTPAddr + "/readyz")
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	require.Equal(t, http.StatusOK, ready())
	ns.Shutdown()
	ns.WaitForShutdown()
	require.Eventually(t, func() bool { return ready() == http.StatusServiceUnavailable }, 10*time.Second, 20*time.Millisecond,
		"not ready without NATS")
	natstest.StartDir(t, dir, port)
	require.Eventually(t, func() bool { return ready() == http.StatusOK }, 30*time.Second, 50*time.Millisecond,
		"ready again once NATS is back")
}

// Watching NodeMaintenance resources needs a cluster: without one serve
// refuses at start instead of running a watcher that can only fail.
func TestServeNodeMaintenanceNeedsACluster(t *testing.T) {
	o := DefaultOptions()
	o.NATSListen, o.HTTPListen, o.DataDir = "127.0.0.1:0", "127.0.0.1:0", t.TempDir()
	o.NodeMaintenanceCRD = true
	err := Serve(t.Context(), o, zerolog.New(zerolog.NewTestWriter(t)), nil)
	var u usageError
	require.ErrorAs(t, err, &u)
	require.ErrorContains(t, err, "nodemaintenance-crd needs a Kubernetes cluster")
}
