package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"

	"github.com/drover-io/drover/consumers"
)

// buildDrover builds the drover binary once per test binary.
var buildDrover = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "drover-e2e-bin-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "drover")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/drover-io/drover/cmd/drover").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
})

// serveProcess runs `drover serve` as a process of its own against the Env.
func serveProcess(t *testing.T, e *Env, name string) *exec.Cmd {
	t.Helper()
	bin, err := buildDrover()
	require.NoError(t, err)
	cmd := exec.Command(bin, "serve", "--nats-url", e.NATSURL, "--kubeconfig", e.DroverKubeconfig,
		"--http-listen", "127.0.0.1:0", "--ack-wait", "3s", "--shutdown-grace", "1s", "--log-level", "debug")
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("%s logs:\n%s", name, logs.String())
		}
	})
	return cmd
}

// TestMaintenanceSurvivesSIGKILL: `drover serve` is killed in the middle of
// an evacuation; a second one resumes it from the operation's checkpoint and
// finishes it, finding the migrations the first created instead of
// creating twins.
func TestMaintenanceSurvivesSIGKILL(t *testing.T) {
	t.Parallel()
	e := StartT(t, Options{NoServe: true, Scenario: `
nodes:
- {name: node-1}
- {name: node-2}
kubevirtPods: {virtAPI: [node-2, node-2], virtController: [node-2, node-2]}
vms:
- {name: vm-1, memory: 2Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-2, memory: 2Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-3, memory: 2Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
- {name: vm-4, memory: 2Gi, disk: {accessMode: ReadWriteMany}, node: node-1}
`})
	ctx := ctxT(t, 5*time.Minute)
	// One at a time, each 2Gi guest about 32 s at 64Mi/s (3.2 s at time x10).
	setMigrationConfig(t, e, func(m *kvv1.MigrationConfiguration) {
		m.ParallelOutboundMigrationsPerNode = ptr.To(uint32(1))
		m.BandwidthPerMigration = ptr.To(resource.MustParse("64Mi"))
	})
	s := startSampler(t, e, nil)
	first := serveProcess(t, e, "first drover serve")
	key := consumers.MaintenanceOperationKey("node-1", "r1")
	eventually(t, e, time.Minute, "drover serve declared its streams", func() (bool, string) {
		_, err := e.JS.Stream(ctx, consumers.StreamRequests)
		return err == nil, fmt.Sprint(err)
	})
	code, out := e.Drover(ctx, "maintenance", "start", "node-1", "--reason", "psu", "--request-id", "r1")
	require.Equal(t, 0, code, out)
	waitMidEvacuation(t, e, "node-1", "vm-1", "vm-2", "vm-3", "vm-4")
	require.NoError(t, first.Process.Signal(syscall.SIGKILL))
	_ = first.Wait()
	rec, _ := e.Op(ctx, key)
	require.Equal(t, consumers.StateRunning, rec.State, "killed while running")

	serveProcess(t, e, "second drover serve")
	rec = waitOp(t, e, key, 3*time.Minute, consumers.StateSucceeded)
	require.GreaterOrEqual(t, rec.Attempts, 2, "the second process ran it again")
	s.Stop()
	require.Empty(t, e.VMIsOn(ctx, "node-1"))
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := 1; i <= 4; i++ {
		name := fmt.Sprintf("default/vm-%d", i)
		require.Len(t, s.created[name], 1, "one migration object for %s: %v", name, s.created[name])
	}
	require.LessOrEqual(t, s.maxOut["node-1"], 1)
	require.Empty(t, e.Sim.Violations())
}
