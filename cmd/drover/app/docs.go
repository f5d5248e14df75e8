package app

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// ConfigReferencePath is where the generated configuration reference is
// committed, relative to the repository root.
const ConfigReferencePath = "docs/configuration.md"

// docsCommand generates documentation from the code (hidden: for make docs).
func (c *cli) docsCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "print the configuration reference of drover serve (Markdown), generated from its options",
		Args:  noArgs,
	}
	out := cmd.Flags().String("out", "", "write it to this file instead of standard output")
	g := group("docs", "generate documentation from the code", c.leaf(cmd, nil, func([]string) error {
		if *out == "" {
			return WriteConfigReference(c.out)
		}
		var b strings.Builder
		if err := WriteConfigReference(&b); err != nil {
			return err
		}
		if err := os.WriteFile(*out, []byte(b.String()), 0o644); err != nil {
			return fmt.Errorf("write %s: %w", *out, err)
		}
		return nil
	}))
	g.Hidden = true
	return g
}

// WriteConfigReference writes docs/configuration.md: every option of drover
// serve with its flag, environment variable, configuration-file key,
// default and help text, from the same table LoadOptions reads (fields), and
// the NATS client flags of the client commands.
func WriteConfigReference(w io.Writer) error {
	var b strings.Builder
	b.WriteString(`# Configuration reference

<!-- Generated from cmd/drover/app/options.go by ` + "`make docs`" + ` (go run ./cmd/drover docs config --out docs/configuration.md).
     Do not edit: make verify fails when this file differs from a fresh generation. -->

` + "`drover serve`" + ` takes each option from, in order of precedence: its flag, its ` + "`DROVER_*`" + ` environment
variable, its key in the YAML file named by ` + "`--config`" + ` (or ` + "`DROVER_CONFIG`" + `), its default. The file's keys are
the flag names; an unknown key is an error, not ignored. Durations are Go durations (` + "`40s`, `5m`" + `); booleans are
` + "`true` or `false`" + ` (a boolean flag alone, ` + "`--nodewatch`" + `, means true).

` + "```yaml" + `
# drover.yaml
nats-url: nats://nats.drover.svc:4222
replicas: 3
ack-wait: 40s
fencing: watchdog
recovery:
  policies:
  - nodeSelector: {node-role.example.com/storage: "true"}
    fencing: taint
` + "```" + `

## drover serve

| Flag | Environment variable | Config key | Type | Default | Description |
|---|---|---|---|---|---|
| ` + "`--config`" + ` | ` + "`DROVER_CONFIG`" + ` | | string | | YAML configuration file; its keys are the flag names |
`)
	d := DefaultOptions()
	for _, f := range d.fields() {
		fmt.Fprintf(&b, "| `--%s` | `%s` | `%s` | %s | %s | %s |\n", f.flag, f.env, f.flag, f.kind, mdDefault(f.value()), mdCell(f.usage))
	}
	b.WriteString(`
The file alone also takes ` + "`recovery.policies`" + `: recovery policies by node selector, each
` + "`{nodeSelector, fencing, watchdogTimeout, watchdogMargin}`" + `; a node takes the first policy whose selector
matches its labels, else the default policy of ` + "`--fencing`, `--watchdog-timeout` and `--watchdog-margin`" + `.

## Client commands

Every command that talks to drover (` + "`maintenance`, `vm`, `node`, `recovery`, `status`, `dlq`, `op`" + `) takes these
flags; each defaults to its environment variable.

| Flag | Environment variable | Description |
|---|---|---|
`)
	fs := pflag.NewFlagSet("client", pflag.ContinueOnError)
	var client ClientOptions
	client.register(fs, func(string) string { return "" })
	fs.VisitAll(func(f *pflag.Flag) {
		usage, env := f.Usage, ""
		if i := strings.LastIndex(usage, " (env "); i >= 0 {
			usage, env = usage[:i], strings.TrimSuffix(usage[i+len(" (env "):], ")")
		}
		if f.DefValue != "" {
			usage += " (default `" + f.DefValue + "`)"
		}
		fmt.Fprintf(&b, "| `--%s` | `%s` | %s |\n", f.Name, env, mdCell(usage))
	})
	_, err := io.WriteString(w, b.String())
	return err
}

func mdDefault(v string) string {
	if v == "" {
		return ""
	}
	return "`" + v + "`"
}

// mdCell escapes text for a Markdown table cell.
func mdCell(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "|", `\|`), "\n", " ")
}
