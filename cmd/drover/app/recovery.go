package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/recovery"
)

// recoveryCommand pauses, resumes and shows the recovery workflow cluster-wide.
func (c *cli) recoveryCommand() *cobra.Command {
	var pc, rc, sc ClientOptions
	pause := &cobra.Command{Use: "pause", Short: "pause new recoveries cluster-wide (those past their fencing gate finish)", Args: noArgs}
	reason := pause.Flags().String("reason", "", "why recoveries are paused")
	pauseBy := pause.Flags().String("by", whoami(), "who pauses them")
	resume := &cobra.Command{Use: "resume", Short: "resume recoveries", Args: noArgs}
	resumeBy := resume.Flags().String("by", whoami(), "who resumes them")
	status := &cobra.Command{Use: "status", Short: "show whether recoveries are paused, the failover capacity and the recoveries", Args: noArgs}
	return group("recovery", "pause, resume and show node-failure recoveries",
		c.leaf(pause, &pc, func([]string) error {
			resp, err := c.recoveryControl(pc, subjectRecoveryPause, recovery.Pause{By: *pauseBy, Reason: *reason})
			if err != nil {
				return err
			}
			fmt.Fprintf(c.out, "recoveries paused cluster-wide by %s: new recoveries wait before their fencing gate; those past it finish\n", resp.Pause.By)
			return nil
		}),
		c.leaf(resume, &rc, func([]string) error {
			resp, err := c.recoveryControl(rc, subjectRecoveryResume, recovery.Pause{By: *resumeBy})
			if err != nil {
				return err
			}
			fmt.Fprintf(c.out, "recoveries resumed by %s\n", resp.Pause.By)
			return nil
		}),
		c.leaf(status, &sc, func([]string) error { return c.recoveryStatus(sc) }),
	)
}

// recoveryControl asks drover serve, which keeps the recovery switches.
func (c *cli) recoveryControl(client ClientOptions, subject string, req recovery.Pause) (recoveryControl, error) {
	var resp recoveryControl
	nc, _, err := client.connect(c.ctx)
	if err != nil {
		return resp, err
	}
	defer nc.Close()
	b, _ := json.Marshal(req)
	ctx, cancel := context.WithTimeout(c.ctx, 10*time.Second)
	defer cancel()
	m, err := nc.RequestWithContext(ctx, subject, b)
	if errors.Is(err, nats.ErrNoResponders) {
		return resp, fmt.Errorf("%s: no drover serve answers on this NATS (is it running?)", subject)
	}
	if err != nil {
		return resp, fmt.Errorf("%s: %w", subject, err)
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return resp, fmt.Errorf("%s: malformed answer: %w", subject, err)
	}
	if resp.Error != "" {
		return resp, fmt.Errorf("%s: %s", subject, resp.Error)
	}
	return resp, nil
}

func (c *cli) recoveryStatus(client ClientOptions) error {
	resp, err := c.recoveryControl(client, subjectRecoveryStatus, recovery.Pause{})
	if err != nil {
		return err
	}
	if p := resp.Pause; p.Paused {
		fmt.Fprintf(c.out, "recoveries: PAUSED by %s since %s (%s)\n", p.By, p.Since.Local().Format(time.DateTime), p.Reason)
	} else {
		fmt.Fprintln(c.out, "recoveries: active")
	}
	if cr := resp.Capacity; cr != nil {
		warn := ""
		if cr.Nodes == 0 {
			warn = " (WARNING: a failure of the largest node would leave VMs without room)"
		}
		fmt.Fprintf(c.out, "failover capacity: %d of the largest nodes could fail with every restartable VM still fitting elsewhere%s (computed %s)\n",
			cr.Nodes, warn, cr.At.Local().Format(time.DateTime))
	}
	nc, js, err := client.connect(c.ctx)
	if err != nil {
		return err
	}
	defer nc.Close()
	recs, err := listOperations(c.ctx, js, "recovery.>")
	if err != nil {
		return err
	}
	tw := tabwriter.NewWriter(c.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "OPERATION\tNODE\tSTATE\tVMS\tUPDATED\tMESSAGE")
	for _, r := range recs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.Key, r.Target, r.State, vmCounts(r), r.Updated.Local().Format("15:04:05"), summary(r))
	}
	return tw.Flush()
}

// listOperations reads the operation records matching filter.
func listOperations(ctx context.Context, js jetstream.JetStream, filter string) ([]consumers.Record, error) {
	ops, err := consumers.OpenOpStore(ctx, js)
	if err != nil {
		return nil, fmt.Errorf("%w (has drover serve run against this NATS?)", err)
	}
	return ops.List(ctx, filter)
}
