package cluster_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/integration/cluster"
)

// helperEnv makes the test binary start a cluster, print its pids and folder, and wait to be
// killed (see TestMain).
const helperEnv = "DROVER_CLUSTER_TEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(runHelper())
	}
	os.Exit(m.Run())
}

func runHelper() int {
	c, err := cluster.Start(context.Background(), cluster.Options{SkipCRDs: true})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	api, etcd := c.PIDs()
	fmt.Printf("%d %d %s\n", api, etcd, c.Dir)
	_, _ = io.Copy(io.Discard, os.Stdin) // until the parent kills us
	_ = c.Stop()
	return 0
}

// TestNoProcessLeftWhenTestBinaryDies kills (SIGKILL, so no cleanup runs) a test binary that
// started a cluster, and checks that its kube-apiserver and etcd die with it.
func TestNoProcessLeftWhenTestBinaryDies(t *testing.T) {
	_, err := exec.LookPath("setpriv")
	require.NoError(t, err, "setpriv (util-linux) must be on PATH: install util-linux")

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	defer stdin.Close()
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())

	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err, "helper did not report its cluster")
	var api, etcd int
	var dir string
	_, err = fmt.Sscanf(line, "%d %d %s", &api, &etcd, &dir)
	require.NoError(t, err, "helper output %q", line)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	require.True(t, alive(api) && alive(etcd), "helper's control plane runs")

	require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
	_ = cmd.Wait()

	require.Eventually(t, func() bool { return !alive(api) && !alive(etcd) }, 15*time.Second, 50*time.Millisecond,
		"kube-apiserver (pid %d) or etcd (pid %d) outlived the test binary that started them", api, etcd)
}
