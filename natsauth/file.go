package natsauth

import (
	"errors"
	"fmt"
	"os"
	"regexp"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"sigs.k8s.io/yaml"
)

// User is one entry of the auth file: a NATS nkey user and its role.
type User struct {
	// Name identifies the user in logs and in the server configuration.
	Name string `json:"name"`
	// NKey is the user's public nkey (U...); its seed stays with the user.
	NKey string `json:"nkey"`
	Role Role   `json:"role"`
}

// File is the auth file of `drover serve --nats-auth-file`.
type File struct {
	Users []User `json:"users"`
}

var validName = regexp.MustCompile(`^[A-Za-z0-9][-_.@A-Za-z0-9]{0,62}$`)

// LoadFile reads and checks an auth file. Errors name the file and the
// entry; a retry does not help until the file is fixed.
func LoadFile(path string) (*File, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("auth file: %w", err)
	}
	f, err := ParseFile(b)
	if err != nil {
		return nil, fmt.Errorf("auth file %s: %w", path, err)
	}
	return f, nil
}

// ParseFile parses an auth file's YAML and checks every entry: a name, a
// user public nkey and a known role each; names and keys unique. Unknown
// fields are errors.
func ParseFile(b []byte) (*File, error) {
	var f File
	if err := yaml.UnmarshalStrict(b, &f); err != nil {
		return nil, err
	}
	var errs []error
	names, keys := map[string]bool{}, map[string]bool{}
	for i, u := range f.Users {
		if err := u.check(); err != nil {
			errs = append(errs, fmt.Errorf("users[%d]: %w", i, err))
		}
		if names[u.Name] {
			errs = append(errs, fmt.Errorf("users[%d]: name %q appears twice", i, u.Name))
		}
		if keys[u.NKey] {
			errs = append(errs, fmt.Errorf("users[%d] (%s): nkey %s appears twice; a key has one role", i, u.Name, u.NKey))
		}
		names[u.Name], keys[u.NKey] = true, true
	}
	return &f, errors.Join(errs...)
}

func (u User) check() error {
	var errs []error
	if !validName.MatchString(u.Name) {
		errs = append(errs, fmt.Errorf("name %q: want 1-63 letters, digits and -_.@, starting with a letter or digit", u.Name))
	}
	if !nkeys.IsValidPublicUserKey(u.NKey) {
		errs = append(errs, fmt.Errorf("user %s: nkey %q is not a user public key (U..., as `drover auth new-user` prints)", u.Name, u.NKey))
	}
	if !u.Role.Valid() {
		errs = append(errs, fmt.Errorf("user %s: unknown role %q (want one of %v)", u.Name, u.Role, Roles()))
	}
	return errors.Join(errs...)
}

// Entry is the user's line under `users:` in the auth file.
func (u User) Entry() string {
	return fmt.Sprintf("- {name: %s, nkey: %s, role: %s}", u.Name, u.NKey, u.Role)
}

// Count returns how many users have each role.
func (f *File) Count() map[Role]int {
	n := map[Role]int{}
	for _, u := range f.Users {
		n[u.Role]++
	}
	return n
}

// NewUser makes a user with a fresh nkey pair and returns it with the seed,
// which only the user keeps.
func NewUser(name string, role Role) (User, []byte, error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return User{}, nil, fmt.Errorf("create nkey: %w", err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return User{}, nil, err
	}
	seed, err := kp.Seed()
	if err != nil {
		return User{}, nil, err
	}
	u := User{Name: name, NKey: pub, Role: role}
	return u, seed, u.check()
}

// SeedOptions are the connection options of the user whose nkey seed is in
// path: sign the server's challenge with it, and take replies on the user's
// own inbox (InboxPrefix), the only one its permissions let it read.
func SeedOptions(path string) ([]nats.Option, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("nkey seed: %w", err)
	}
	kp, err := nkeys.ParseDecoratedNKey(b)
	if err != nil {
		return nil, fmt.Errorf("nkey seed %s: %w", path, err)
	}
	defer kp.Wipe()
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("nkey seed %s: %w", path, err)
	}
	if !nkeys.IsValidPublicUserKey(pub) {
		return nil, fmt.Errorf("nkey seed %s: not a user seed (SU...)", path)
	}
	sign, err := nats.NkeyOptionFromSeed(path)
	if err != nil {
		return nil, fmt.Errorf("nkey seed %s: %w", path, err)
	}
	return []nats.Option{sign, nats.CustomInboxPrefix(InboxPrefix(pub))}, nil
}
