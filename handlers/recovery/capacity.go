package recovery

import (
	"context"
	"time"

	"github.com/rs/zerolog"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
)

// Capacity reports the failover capacity (FailoverCapacity) of the live
// cluster: the largest nodes are the ones with the most allocatable memory,
// the room is what their pods' requests leave, and the VMs that count are
// those whose run policy restarts them.
type Capacity struct {
	Kube         kubernetes.Interface
	Dynamic      dynamic.Interface
	LeaseTimeout time.Duration
	Metrics      *Metrics
	// Report, if set, receives each computed value (the status line).
	Report func(ctx context.Context, nodes int, at time.Time)
	// Interval between computations (default 30s).
	Interval time.Duration
	Log      zerolog.Logger
}

// Compute returns the failover capacity now.
func (c *Capacity) Compute(ctx context.Context) (int, error) {
	timeout := c.LeaseTimeout
	if timeout <= 0 {
		timeout = DefaultLeaseTimeout
	}
	cl := cluster{kube: c.Kube, dyn: c.Dynamic}
	v, err := cl.view(ctx, true)
	if err != nil {
		return 0, err
	}
	vms, err := cl.vms(ctx, v.pods, "")
	if err != nil {
		return 0, err
	}
	loads := v.rooms(time.Now(), timeout, "")
	for i := range loads {
		for _, vm := range vms[loads[i].Room.Name] {
			if vm.Restarts {
				loads[i].VMs = append(loads[i].VMs, vm)
			}
		}
	}
	return FailoverCapacity(loads), nil
}

// Start computes the capacity every Interval until ctx ends.
func (c *Capacity) Start(ctx context.Context) error {
	interval := c.Interval
	if interval <= 0 {
		interval = 30 * time.Second
	}
	last := -1
	for {
		n, err := c.Compute(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			c.Log.Warn().Err(err).Msg("could not compute the failover capacity")
		case err == nil:
			if c.Metrics != nil {
				c.Metrics.FailoverCapacity.Set(float64(n))
			}
			if c.Report != nil {
				c.Report(ctx, n, time.Now())
			}
			if n != last {
				ev := c.Log.Info()
				if n == 0 {
					ev = c.Log.Warn()
				}
				ev.Int("nodes", n).Msg("failover capacity: this many of the largest nodes could fail with every restartable VM still fitting elsewhere")
				last = n
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
	}
}
