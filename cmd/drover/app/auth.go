package app

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"

	"github.com/drover-io/drover/natsauth"
)

// auth manages the users of the embedded NATS server: new users and their
// seeds, and the equivalent configuration for an external nats-server.
func (c *cli) auth(args []string) error {
	if len(args) == 0 {
		return usagef("usage: drover auth new-user|server-config ...")
	}
	switch args[0] {
	case "new-user":
		return c.newUser(args[1:])
	case "server-config":
		return c.serverConfig(args[1:])
	default:
		return usagef("unknown auth command %q (want new-user or server-config)", args[0])
	}
}

const newUserUsage = "usage: drover auth new-user NAME --role ROLE --seed-file FILE"

// newUser writes a fresh nkey seed to a new file, readable by its owner
// only, and prints the user's line for the auth file.
func (c *cli) newUser(args []string) error {
	fs := flag.NewFlagSet("drover auth new-user", flag.ContinueOnError)
	role := fs.String("role", "", fmt.Sprintf("the user's role: one of %v (required)", natsauth.Roles()))
	seedFile := fs.String("seed-file", "", "file to write the user's secret nkey seed to; must not exist (required)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || *role == "" || *seedFile == "" {
		return usagef("%s", newUserUsage)
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

// serverConfig prints the nats-server authorization block that gives the
// auth file's users the roles the embedded server would give them.
func (c *cli) serverConfig(args []string) error {
	fs := flag.NewFlagSet("drover auth server-config", flag.ContinueOnError)
	file := fs.String("nats-auth-file", c.getenv("DROVER_NATS_AUTH_FILE"), "the auth file (env DROVER_NATS_AUTH_FILE)")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 || *file == "" {
		return usagef("usage: drover auth server-config --nats-auth-file FILE")
	}
	f, err := natsauth.LoadFile(*file)
	if err != nil {
		return usageError{err}
	}
	return natsauth.WriteServerConfig(c.out, f, *file)
}
