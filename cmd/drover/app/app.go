package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/drover-io/drover/natsauth"
)

// Exit codes.
const (
	ExitOK    = 0
	ExitError = 1 // the command failed; see the message
	ExitUsage = 2 // bad arguments: nothing was sent or changed
)

const usage = `drover keeps KubeVirt virtual machines running through node maintenance and node failure.

usage:
  drover serve [--config FILE] [--nats-url URL] [--nats-listen HOST:PORT] [--nats-auth-file FILE] [--data-dir DIR]
               [--kubeconfig FILE] [--http-listen HOST:PORT] ...
  drover maintenance start NODE --reason TEXT [--request-id ID] [--mode LiveMigrate|Evict]
               [--force] [--return-home] [--dry-run] [--wait]
  drover maintenance end NODE [--request-id ID] [--wait]
  drover vm migrate NAMESPACE/NAME [--node-selector k=v[,k=v]] [--request-id ID] [--wait]
  drover vm cancel NAMESPACE/NAME [--wait]
  drover node fenced NODE --method TEXT
  drover recovery pause [--reason TEXT] | resume | status
  drover status [--watch] [-o table|json]
  drover dlq list [-o table|json]
  drover dlq replay SEQ
  drover op retry OPERATION
  drover auth new-user NAME --role ROLE --seed-file FILE
  drover auth server-config --nats-auth-file FILE
  drover version

--wait follows the operation's status until it ends, printing per-VM progress, and exits 0
when it completed, 1 when it failed, was rejected or cancelled (with the reason), 2 on bad
arguments. --dry-run prints the plan and changes nothing.
Client commands take --nats-url (default nats://127.0.0.1:4222, env DROVER_NATS_URL),
--nats-creds, --nats-nkey (a seed file from 'drover auth new-user'), --nats-ca, --nats-cert, --nats-key.
Run 'drover COMMAND --help' for a command's flags.
`

// Main runs the drover command line and returns its exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return run(ctx, args, stdout, stderr, os.Getenv)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return ExitUsage
	}
	// A subject the server refuses ends the command at once, with the
	// refusal as the error (natsauth.OnDenied): not a timeout later.
	ctx, deny := context.WithCancelCause(ctx)
	defer deny(nil)
	c := &cli{ctx: ctx, out: stdout, errOut: stderr, getenv: getenv, denied: func(d *natsauth.Denied) { deny(d) }}
	var err error
	switch args[0] {
	case "serve":
		err = c.serve(args[1:])
	case "maintenance":
		err = c.maintenance(args[1:])
	case "vm":
		err = c.vm(args[1:])
	case "node":
		err = c.node(args[1:])
	case "recovery":
		err = c.recovery(args[1:])
	case "status":
		err = c.status(args[1:])
	case "dlq":
		err = c.dlq(args[1:])
	case "op":
		err = c.op(args[1:])
	case "auth":
		err = c.auth(args[1:])
	case "version", "--version":
		fmt.Fprintln(stdout, "drover", Version)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		err = usagef("unknown command %q", args[0])
	}
	if d := (*natsauth.Denied)(nil); errors.As(context.Cause(ctx), &d) {
		err = d
	}
	var u usageError
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &u):
		fmt.Fprintf(stderr, "drover: %v\n", err)
		if !strings.Contains(err.Error(), "usage:") {
			fmt.Fprintln(stderr, "run 'drover help' for usage")
		}
		return ExitUsage
	case errors.Is(err, context.Canceled):
		return ExitOK
	default:
		fmt.Fprintf(stderr, "drover: %v\n", err)
		return ExitError
	}
}

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

type cli struct {
	ctx    context.Context
	out    io.Writer
	errOut io.Writer
	getenv func(string) string
	denied func(*natsauth.Denied)
}

func (c *cli) serve(args []string) error {
	o, err := LoadOptions(args, c.getenv)
	if err != nil {
		return err
	}
	log, err := NewLogger(c.errOut, o.LogLevel, o.LogFormat)
	if err != nil {
		return err
	}
	return Serve(c.ctx, o, log, nil)
}
