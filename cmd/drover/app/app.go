package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/drover-io/drover/natsauth"
)

// Exit codes.
const (
	ExitOK    = 0
	ExitError = 1 // the command failed; see the message
	ExitUsage = 2 // bad arguments: nothing was sent or changed
)

// overview is the root command's help text.
const overview = `drover keeps KubeVirt virtual machines running through node maintenance and node failure.

--wait follows the operation's status until it ends, printing per-VM progress, and exits 0
when it completed, 1 when it failed, was rejected or cancelled (with the reason), 2 on bad
arguments (nothing was sent). --dry-run prints the plan and changes nothing.
Client commands take --nats-url (default nats://127.0.0.1:4222, env DROVER_NATS_URL),
--nats-creds, --nats-nkey (a seed file from 'drover auth new-user'), --nats-ca, --nats-cert, --nats-key.
Exit codes: 0 done, 1 the command or the operation failed, 2 bad arguments.`

// Main runs the drover command line and returns its exit code.
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return run(ctx, args, stdout, stderr, os.Getenv)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	// A subject the server refuses ends the command at once, with the
	// refusal as the error (natsauth.OnDenied): not a timeout later.
	ctx, deny := context.WithCancelCause(ctx)
	defer deny(nil)
	c := &cli{ctx: ctx, out: stdout, errOut: stderr, getenv: getenv, denied: func(d *natsauth.Denied) { deny(d) }}
	root := c.rootCommand()
	if args == nil {
		args = []string{} // cobra reads os.Args for nil
	}
	root.SetArgs(args)
	cmd, err := root.ExecuteContextC(ctx)
	if d := (*natsauth.Denied)(nil); errors.As(context.Cause(ctx), &d) {
		err = d
	}
	if err != nil && !c.ran {
		// Cobra refused the arguments (unknown command or flag, wrong
		// number of arguments) before the command ran: nothing was done.
		err = usageError{err}
	}
	var u usageError
	switch {
	case err == nil:
		return ExitOK
	case errors.Is(err, errUsageShown):
		return ExitUsage
	case errors.As(err, &u):
		fmt.Fprintf(stderr, "drover: %v\n", err)
		if !strings.Contains(err.Error(), "usage:") && cmd != nil {
			fmt.Fprintf(stderr, "run '%s --help' for usage\n", cmd.CommandPath())
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

// errUsageShown: the usage was printed already; exit 2.
var errUsageShown = usageError{errors.New("usage shown")}

type cli struct {
	ctx    context.Context
	out    io.Writer
	errOut io.Writer
	getenv func(string) string
	denied func(*natsauth.Denied)
	// ran is set once a command's arguments were accepted and it runs:
	// errors before are usage errors (exit 2).
	ran bool
}

// rootCommand builds the command tree; it is built afresh for each run.
func (c *cli) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "drover",
		Short:         "keep KubeVirt VMs running through node maintenance and node failure",
		Long:          overview,
		Version:       Version,
		SilenceErrors: true,
		SilenceUsage:  true,
		// drover alone prints its usage and exits 2, as before.
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprint(c.errOut, cmd.UsageString())
			return errUsageShown
		},
	}
	root.SetOut(c.out)
	root.SetErr(c.errOut)
	root.SetIn(strings.NewReader(""))
	root.SetVersionTemplate("drover {{.Version}}\n")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(
		c.serveCommand(),
		c.maintenanceCommand(),
		c.vmCommand(),
		c.nodeCommand(),
		c.recoveryCommand(),
		c.statusCommand(),
		c.dlqCommand(),
		c.opCommand(),
		c.authCommand(),
		c.docsCommand(),
		&cobra.Command{
			Use: "version", Short: "print drover's version", Args: noArgs,
			RunE: func(*cobra.Command, []string) error { fmt.Fprintln(c.out, "drover", Version); return nil },
		},
	)
	// drover completion bash|zsh|fish|powershell (cobra's): an unknown
	// shell is a usage error like an unknown subcommand elsewhere.
	root.InitDefaultCompletionCmd()
	if comp, _, err := root.Find([]string{"completion"}); err == nil && comp != root {
		comp.Args, comp.RunE = cobra.ArbitraryArgs, groupRun
	}
	return root
}

// leaf is a command that does something: run gets the positional arguments
// once cobra accepted them. With client set, the NATS client flags are
// registered on it.
func (c *cli) leaf(cmd *cobra.Command, client *ClientOptions, run func(args []string) error) *cobra.Command {
	if client != nil {
		client.register(cmd.Flags(), c.getenv)
		client.denied = c.denied
	}
	cmd.RunE = func(_ *cobra.Command, args []string) error {
		c.ran = true
		return run(args)
	}
	return cmd
}

// group is a command that only holds subcommands: alone or with an unknown
// subcommand it is a usage error (exit 2), not help with exit 0.
func group(use, short string, subs ...*cobra.Command) *cobra.Command {
	g := &cobra.Command{Use: use, Short: short, Args: cobra.ArbitraryArgs, RunE: groupRun}
	g.AddCommand(subs...)
	return g
}

// groupRun is the RunE of a command that only holds subcommands.
func groupRun(cmd *cobra.Command, args []string) error {
	{
		var names []string
		for _, s := range cmd.Commands() {
			if s.IsAvailableCommand() {
				names = append(names, s.Name())
			}
		}
		if len(args) == 0 {
			return usagef("usage: %s %s ... (run '%s --help')", cmd.CommandPath(), strings.Join(names, "|"), cmd.CommandPath())
		}
		return usagef("unknown %s command %q (want %s)", cmd.Name(), args[0], strings.Join(names, ", "))
	}
}

// exactArgs accepts n positional arguments; otherwise it is a usage error
// that shows the command's usage line.
func exactArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usagef("usage: %s", cmd.UseLine())
		}
		return nil
	}
}

var noArgs = exactArgs(0)

func (c *cli) serveCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "run drover: NATS (embedded or joined), the workflows, the producers and the HTTP listener",
		Long: `serve runs drover. Every option is set by a flag, a DROVER_* environment variable or a key of the
YAML file given with --config (the keys are the flag names); precedence is flag > environment >
file > default. docs/configuration.md lists every option.`,
		Args: noArgs,
	}
	sf := registerServeFlags(cmd.Flags())
	return c.leaf(cmd, nil, func([]string) error {
		o, err := sf.load(c.getenv)
		if err != nil {
			return err
		}
		log, err := NewLogger(c.errOut, o.LogLevel, o.LogFormat)
		if err != nil {
			return err
		}
		return Serve(c.ctx, o, log, nil)
	})
}
