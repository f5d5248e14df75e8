package sim

import (
	"context"
	"fmt"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// Start builds a simulator against cfg, runs it and returns once it is Ready (its caches synced,
// its controllers started), with stop, which ends Run and returns its error. It fails with Run's
// error if Run ends first, or with ctx's when ctx ends first (the simulator is stopped then).
// ctx only bounds the start: the simulator runs until stop.
func Start(ctx context.Context, cfg *rest.Config, opts Options) (*Simulator, func() error, error) {
	s, err := New(cfg, opts)
	if err != nil {
		return nil, nil, err
	}
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan error, 1)
	go func() { done <- s.Run(rctx) }()
	stop := func() error { cancel(); return <-done }
	select {
	case <-s.Ready():
		return s, stop, nil
	case err := <-done:
		cancel()
		return nil, nil, fmt.Errorf("simulator: %w", err)
	case <-ctx.Done():
		_ = stop()
		return nil, nil, fmt.Errorf("simulator not ready: %w", ctx.Err())
	}
}

// StartT is Start for a test: ready within 60 s or the test fails, stopped (within 30 s, and
// without error) when the test ends.
func StartT(t testing.TB, cfg *rest.Config, opts Options) *Simulator {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, stop, err := Start(ctx, cfg, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		stopped := make(chan error, 1)
		go func() { stopped <- stop() }()
		select {
		case err := <-stopped:
			if err != nil {
				t.Errorf("simulator: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("simulator did not stop within 30s of its context ending")
		}
	})
	return s
}
