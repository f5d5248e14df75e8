package app

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/spf13/cobra"

	"github.com/drover-io/drover/natsauth"
)

// authCommand manages the users of the embedded NATS server: new users and
// their seeds, and the equivalent configuration for an external nats-server.
func (c *cli) authCommand() *cobra.Command {
	return group("auth", "manage the NATS users of drover's roles", c.newUserCommand(), c.serverConfigCommand())
}

// newUserCommand writes a fresh nkey seed to a new file, readable by its
// owner only, and prints the user's line for the auth file.
func (c *cli) newUserCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "new-user NAME --role ROLE --seed-file FILE",
		Short: "make a NATS user: write its secret nkey seed and print its line for the auth file",
		Args:  exactArgs(1),
	}
	role := cmd.Flags().String("role", "", fmt.Sprintf("the user's role: one of %v (required)", natsauth.Roles()))
	seedFile := cmd.Flags().String("seed-file", "", "file to write the user's secret nkey seed to; must not exist (required)")
	return c.leaf(cmd, nil, func(pos []string) error {
		if *role == "" || *seedFile == "" {
			return usagef("usage: %s", cmd.UseLine())
		}
		if !natsauth.Role(*role).Valid() {
			return usagef("unknown role %q (want one of %v)", *role, natsauth.Roles())
		}
		u, seed, err := natsauth.NewUser(pos[0], natsauth.Role(*role))
		if err != nil {
			return usageError{err}
		}
		if err := writeSeed(*seedFile, u, seed); err != nil {
			return err
		}
		fmt.Fprintln(c.out, u.Entry())
		fmt.Fprintf(c.errOut, "wrote the seed of %s to %s (keep it secret; the user passes it with --nats-nkey).\n"+
			"Append the line above under users: in the file given to drover serve --nats-auth-file, and restart drover serve.\n", u.Name, *seedFile)
		return nil
	})
}

// writeSeed creates path with mode 0600 and writes the seed, refusing to
// overwrite a file: another user's seed cannot be recovered.
func writeSeed(path string, u natsauth.User, seed []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("seed file %s exists: refusing to overwrite it (a seed cannot be recovered); choose another file", path)
	}
	if err != nil {
		return fmt.Errorf("seed file: %w", err)
	}
	_, err = fmt.Fprintf(f, "# NATS nkey seed of drover user %s (role %s), public key %s.\n"+
		"# Secret: whoever has it acts as %s. Use it with drover --nats-nkey FILE.\n%s\n", u.Name, u.Role, u.NKey, u.Name, seed)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("write seed file %s: %w", path, err)
	}
	return nil
}

// serverConfigCommand prints the nats-server authorization block that
// gives the auth file's users the roles the embedded server would give them.
func (c *cli) serverConfigCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "server-config --nats-auth-file FILE",
		Short: "print the nats-server authorization block for an external NATS with the auth file's users",
		Args:  noArgs,
	}
	file := cmd.Flags().String("nats-auth-file", c.getenv("DROVER_NATS_AUTH_FILE"), "the auth file (env DROVER_NATS_AUTH_FILE)")
	return c.leaf(cmd, nil, func([]string) error {
		if *file == "" {
			return usagef("usage: %s", cmd.UseLine())
		}
		f, err := natsauth.LoadFile(*file)
		if err != nil {
			return usageError{err}
		}
		return natsauth.WriteServerConfig(c.out, f, *file)
	})
}
