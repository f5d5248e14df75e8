package cluster

import (
	"context"
	"testing"
	"time"
)

// StartT starts a cluster for a test with default options and stops it when the test ends. A
// missing prerequisite (such as the control-plane binaries) fails the test with the command that
// fixes it; it never skips.
func StartT(t testing.TB) *Cluster {
	return StartWithOptionsT(t, Options{})
}

// StartWithOptionsT is StartT with options.
func StartWithOptionsT(t testing.TB, opts Options) *Cluster {
	t.Helper()
	// Start cleans up after itself when it fails; the cleanup below covers a successful start.
	c, err := Start(context.Background(), opts)
	if err != nil {
		t.Fatalf("start test cluster: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Stop(); err != nil {
			t.Errorf("stop test cluster: %v", err)
		}
	})
	t.Logf("test cluster up in %s (kubeconfig %s)", c.StartupTime.Round(10*time.Millisecond), c.Kubeconfig)
	return c
}
