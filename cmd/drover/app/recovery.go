package app

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/recovery"
)

// recovery pauses, resumes and shows the recovery workflow cluster-wide.
func (c *cli) recovery(args []string) error {
	if len(args) == 0 {
		return usagef("usage: drover recovery pause|resume|status")
	}
	switch args[0] {
	case "pause":
		cmd := c.command("drover recovery pause [--reason TEXT]")
		reason := cmd.fs.String("reason", "", "why recoveries are paused")
		by := cmd.fs.String("by", whoami(), "who pauses them")
		if _, err := cmd.parse(args[1:], 0); err != nil {
			return err
		}
		return c.setPause(cmd, recovery.Pause{Paused: true, By: *by, Reason: *reason, Since: time.Now().UTC()})
	case "resume":
		cmd := c.command("drover recovery resume")
		by := cmd.fs.String("by", whoami(), "who resumes them")
		if _, err := cmd.parse(args[1:], 0); err != nil {
			return err
		}
		return c.setPause(cmd, recovery.Pause{Paused: false, By: *by, Since: time.Now().UTC()})
	case "status":
		cmd := c.command("drover recovery status")
		if _, err := cmd.parse(args[1:], 0); err != nil {
			return err
		}
		return c.recoveryStatus(cmd)
	default:
		return usagef("unknown recovery command %q (want pause, resume or status)", args[0])
	}
}

func (c *cli) setPause(cmd *command, p recovery.Pause) error {
	nc, js, err := cmd.client.connect(c.ctx)
	if err != nil {
		return err
	}
	defer nc.Close()
	kv, err := openSettings(c.ctx, js)
	if err != nil {
		return err
	}
	if err := putJSON(c.ctx, kv, keyRecoveryPause, p); err != nil {
		return err
	}
	if p.Paused {
		fmt.Fprintf(c.out, "recoveries paused cluster-wide by %s: new recoveries wait before their fencing gate; those past it finish\n", p.By)
	} else {
		fmt.Fprintf(c.out, "recoveries resumed by %s\n", p.By)
	}
	return nil
}

func (c *cli) recoveryStatus(cmd *command) error {
	nc, js, err := cmd.client.connect(c.ctx)
	if err != nil {
		return err
	}
	defer nc.Close()
	kv, err := openSettings(c.ctx, js)
	if err != nil {
		return err
	}
	p, err := readPause(c.ctx, kv)
	if err != nil {
		return err
	}
	if p.Paused {
		fmt.Fprintf(c.out, "recoveries: PAUSED by %s since %s (%s)\n", p.By, p.Since.Local().Format(time.DateTime), p.Reason)
	} else {
		fmt.Fprintln(c.out, "recoveries: active")
	}
	var capReport capacityReport
	if ok, err := getJSON(c.ctx, kv, keyFailoverCapacity, &capReport); err != nil {
		return err
	} else if ok {
		warn := ""
		if capReport.Nodes == 0 {
			warn = " (WARNING: a failure of the largest node would leave VMs without room)"
		}
		fmt.Fprintf(c.out, "failover capacity: %d of the largest nodes could fail with every restartable VM still fitting elsewhere%s (computed %s)\n",
			capReport.Nodes, warn, capReport.At.Local().Format(time.DateTime))
	}
	okv, err := js.KeyValue(c.ctx, consumers.BucketOps)
	if err != nil {
		return fmt.Errorf("open %s: %w", consumers.BucketOps, err)
	}
	recs, err := consumers.NewOpStore(okv).List(c.ctx, "recovery.>")
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
