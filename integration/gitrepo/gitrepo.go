// Package gitrepo keeps real Git repositories for tests and the demo: a
// bare "remote" that drover polls over file://, and working clones that
// commit (signed or not) and push to it, force-pushes included.
package gitrepo

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/ProtonMail/go-crypto/openpgp"
	"github.com/ProtonMail/go-crypto/openpgp/armor"
	"github.com/go-git/go-git/v5"
	gitconfig "github.com/go-git/go-git/v5/config"
	"github.com/go-git/go-git/v5/plumbing"
	"github.com/go-git/go-git/v5/plumbing/object"
)

// Remote is a bare repository with branch main, reachable at URL.
type Remote struct {
	Dir string
	URL string
}

// NewRemote creates an empty bare repository under dir.
func NewRemote(dir string) (*Remote, error) {
	path := filepath.Join(dir, "remote.git")
	if _, err := git.PlainInitWithOptions(path, &git.PlainInitOptions{Bare: true,
		InitOptions: git.InitOptions{DefaultBranch: plumbing.Main}}); err != nil {
		return nil, err
	}
	return &Remote{Dir: path, URL: "file://" + path}, nil
}

// Clone is a working repository that pushes to a Remote.
type Clone struct {
	Dir    string
	repo   *git.Repository
	remote *Remote
	// Author signs the commits when Key is set.
	Author string
	Email  string
	Key    *openpgp.Entity
}

// NewClone starts a working repository in dir with a fresh history (its
// first push to a branch with other history must force).
func (r *Remote) NewClone(dir string) (*Clone, error) {
	repo, err := git.PlainInitWithOptions(dir, &git.PlainInitOptions{InitOptions: git.InitOptions{DefaultBranch: plumbing.Main}})
	if err != nil {
		return nil, err
	}
	if _, err := repo.CreateRemote(&gitconfig.RemoteConfig{Name: "origin", URLs: []string{r.URL}}); err != nil {
		return nil, err
	}
	return &Clone{Dir: dir, repo: repo, remote: r, Author: "Alice", Email: "alice@example.com"}, nil
}

// Commit writes files (path -> content), removes the paths in remove,
// commits with msg (signed when c.Key is set) and returns the commit hash.
func (c *Clone) Commit(files map[string]string, remove []string, msg string) (string, error) {
	w, err := c.repo.Worktree()
	if err != nil {
		return "", err
	}
	for p, content := range files {
		full := filepath.Join(c.Dir, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			return "", err
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			return "", err
		}
		if _, err := w.Add(p); err != nil {
			return "", err
		}
	}
	for _, p := range remove {
		if _, err := w.Remove(p); err != nil {
			return "", fmt.Errorf("remove %s: %w", p, err)
		}
	}
	h, err := w.Commit(msg, &git.CommitOptions{AllowEmptyCommits: true, SignKey: c.Key,
		Author: &object.Signature{Name: c.Author, Email: c.Email, When: time.Now()}})
	if err != nil {
		return "", err
	}
	return h.String(), nil
}

// Push pushes main to the remote; force replaces a history it does not extend.
func (c *Clone) Push(force bool) error {
	spec := gitconfig.RefSpec("refs/heads/main:refs/heads/main")
	if force {
		spec = "+" + spec
	}
	err := c.repo.Push(&git.PushOptions{RemoteName: "origin", RefSpecs: []gitconfig.RefSpec{spec}, Force: force})
	if errors.Is(err, git.NoErrAlreadyUpToDate) {
		return nil
	}
	return err
}

// CommitAndPush is Commit then Push(false).
func (c *Clone) CommitAndPush(files map[string]string, remove []string, msg string) (string, error) {
	h, err := c.Commit(files, remove, msg)
	if err != nil {
		return "", err
	}
	return h, c.Push(false)
}

// NewKey makes an OpenPGP key and returns it with its armored public keyring.
func NewKey(name, email string) (*openpgp.Entity, string, error) {
	e, err := openpgp.NewEntity(name, "", email, nil)
	if err != nil {
		return nil, "", err
	}
	var b bytes.Buffer
	w, err := armor.Encode(&b, openpgp.PublicKeyType, nil)
	if err != nil {
		return nil, "", err
	}
	if err := e.Serialize(w); err != nil {
		return nil, "", err
	}
	if err := w.Close(); err != nil {
		return nil, "", err
	}
	return e, b.String(), nil
}

// Request renders a maintenance request file.
func Request(name, node, reason string, extra string) string {
	return fmt.Sprintf(`apiVersion: drover.io/v1
kind: MaintenanceRequest
metadata:
  name: %s
spec:
  node: %s
  reason: %s
  requestedBy: alice%s
`, name, node, reason, extra)
}
