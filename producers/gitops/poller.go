package gitops

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/go-git/go-git/v5"
	gitconfig "github.com/go-git/go-git/v5/config"
	"github.com/go-git/go-git/v5/plumbing"
	"github.com/go-git/go-git/v5/plumbing/object"
	"github.com/go-git/go-git/v5/plumbing/transport"
	githttp "github.com/go-git/go-git/v5/plumbing/transport/http"
	gitssh "github.com/go-git/go-git/v5/plumbing/transport/ssh"
	"github.com/go-git/go-git/v5/storage/memory"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// Source is the CloudEvents source of what the Git producer publishes.
const Source = "drover/gitops"

// MetricsSource labels this producer's metrics (producers.Metrics).
const MetricsSource = "gitops"

// Bucket is the KV bucket that keeps the producer's state.
const Bucket = "drover-gitops"

// Config configures a Poller.
type Config struct {
	// URL of the repository: file://, https:// or ssh:// (or scp-like git@host:path).
	URL string
	// Branch to follow (default main).
	Branch string
	// Path is a glob of request files in the tree (default maintenance/*.yaml).
	Path string
	// Interval between polls (default 30s); the webhook polls at once.
	Interval time.Duration
	// TokenFile holds a token for HTTPS (sent as the password of basic auth).
	TokenFile string
	// CAFile holds PEM certificates to trust for an HTTPS server whose
	// certificate the system's roots do not sign (a private CA).
	CAFile string
	// SSHKeyFile is a private key for SSH; KnownHostsFile the known hosts.
	SSHKeyFile     string
	KnownHostsFile string
	// WebhookSecretFile holds the secret of POST /git/webhook (HMAC as
	// GitHub and Gitea sign, or GitLab's token header).
	WebhookSecretFile string
	// TrustedKeysFile is an armored OpenPGP keyring: only commits signed by
	// one of its keys are acted on.
	TrustedKeysFile string
	// Replicas of the KV bucket (default 1).
	Replicas int
	// Metrics count what the poller publishes (source "gitops"); nil: not counted.
	Metrics *producers.Metrics
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Poller polls a repository and publishes the requests found in it.
type Poller struct {
	cfg Config
	js  jetstream.JetStream
	pub *producers.Publisher
	// caBundle is CAFile's content (nil: the system's roots).
	caBundle []byte
	log      zerolog.Logger
	auth     transport.AuthMethod
	keyring  string
	secret   []byte

	kick chan struct{}

	mu       sync.Mutex
	repo     *git.Repository
	kv       jetstream.KeyValue
	reported map[string]bool // commit/path problems already reported by this process
}

// New checks the configuration and reads the files it names.
func New(cfg Config, js jetstream.JetStream, log zerolog.Logger) (*Poller, error) {
	if cfg.URL == "" {
		return nil, errors.New("gitops: a repository URL is required")
	}
	if cfg.Branch == "" {
		cfg.Branch = "main"
	}
	if cfg.Path == "" {
		cfg.Path = "maintenance/*.yaml"
	}
	if _, err := path.Match(cfg.Path, ""); err != nil {
		return nil, fmt.Errorf("gitops: path %q: %w", cfg.Path, err)
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 30 * time.Second
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	p := &Poller{cfg: cfg, js: js, pub: &producers.Publisher{JS: js, Metrics: cfg.Metrics, Source: MetricsSource}, log: log.With().Str("component", "gitops").Str("repo", cfg.URL).Logger(),
		kick: make(chan struct{}, 1), reported: map[string]bool{}}
	read := func(name, file string) ([]byte, error) {
		b, err := os.ReadFile(file)
		if err != nil {
			return nil, fmt.Errorf("gitops: %s: %w", name, err)
		}
		return b, nil
	}
	if cfg.CAFile != "" {
		b, err := read("CA file", cfg.CAFile)
		if err != nil {
			return nil, err
		}
		if !x509.NewCertPool().AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("gitops: CA file %s holds no PEM certificate", cfg.CAFile)
		}
		p.caBundle = b
	}
	switch {
	case cfg.TokenFile != "":
		b, err := read("token file", cfg.TokenFile)
		if err != nil {
			return nil, err
		}
		p.auth = &githttp.BasicAuth{Username: "drover", Password: strings.TrimSpace(string(b))}
	case cfg.SSHKeyFile != "":
		keys, err := gitssh.NewPublicKeysFromFile("git", cfg.SSHKeyFile, "")
		if err != nil {
			return nil, fmt.Errorf("gitops: ssh key: %w", err)
		}
		if cfg.KnownHostsFile != "" {
			cb, err := gitssh.NewKnownHostsCallback(cfg.KnownHostsFile)
			if err != nil {
				return nil, fmt.Errorf("gitops: known hosts: %w", err)
			}
			keys.HostKeyCallback = cb
		}
		p.auth = keys
	}
	if cfg.WebhookSecretFile != "" {
		b, err := read("webhook secret file", cfg.WebhookSecretFile)
		if err != nil {
			return nil, err
		}
		p.secret = []byte(strings.TrimSpace(string(b)))
	}
	if cfg.TrustedKeysFile != "" {
		b, err := read("trusted keys file", cfg.TrustedKeysFile)
		if err != nil {
			return nil, err
		}
		p.keyring = string(b)
	}
	return p, nil
}

// Kick asks for a poll now (the webhook calls it).
func (p *Poller) Kick() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// Start polls until ctx ends; a failed poll is logged and retried at the
// next tick.
func (p *Poller) Start(ctx context.Context) error {
	t := time.NewTicker(p.cfg.Interval)
	defer t.Stop()
	for {
		if err := p.Poll(ctx); err != nil && ctx.Err() == nil {
			p.log.Warn().Err(err).Msg("poll failed; trying again at the next tick")
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-p.kick:
		}
	}
}

// state is what the producer published, kept in KV under the repository's key.
type state struct {
	Commit string `json:"commit"`
	// Active maps a file path to the request it published as active.
	Active map[string]activeRequest `json:"active"`
}

type activeRequest struct {
	Node      string `json:"node"`
	RequestID string `json:"requestID"`
}

func (p *Poller) stateKey() string {
	return "repo." + schemas.DeterministicID(p.cfg.URL, p.cfg.Branch, p.cfg.Path)
}

// Poll fetches the branch, reads the requests of its head (or of its newest
// commit signed by a trusted key) and publishes what changed since the state
// in KV, then records the new state with compare-and-set.
func (p *Poller) Poll(ctx context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.open(ctx); err != nil {
		return err
	}
	head, err := p.fetch(ctx)
	if err != nil {
		return err
	}
	commit, err := p.trusted(ctx, head)
	if err != nil {
		return err
	}
	if commit == nil {
		return nil // nothing signed by a trusted key yet
	}
	files, err := p.requests(ctx, commit)
	if err != nil {
		return err
	}
	for attempt := 0; attempt < 10; attempt++ {
		prev, rev, err := p.readState(ctx)
		if err != nil {
			return err
		}
		next, err := p.publish(ctx, commit, files, prev)
		if err != nil {
			return err
		}
		b, _ := json.Marshal(next)
		if rev == 0 {
			_, err = p.kv.Create(ctx, p.stateKey(), b)
		} else {
			_, err = p.kv.Update(ctx, p.stateKey(), b, rev)
		}
		if err == nil {
			return nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) && !strings.Contains(err.Error(), "wrong last sequence") {
			return fmt.Errorf("gitops: record state: %w", err)
		}
		// Another replica recorded a state meanwhile: compare with it.
	}
	return errors.New("gitops: record state: too many concurrent writers")
}

func (p *Poller) open(ctx context.Context) error {
	if p.kv == nil {
		kv, err := p.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: Bucket, Replicas: p.cfg.Replicas,
			Description: "drover Git producer: what each repository's requests published", History: 5})
		if err != nil {
			return fmt.Errorf("gitops: bucket %s: %w", Bucket, err)
		}
		p.kv = kv
	}
	if p.repo == nil {
		repo, err := git.Init(memory.NewStorage(), nil)
		if err != nil {
			return err
		}
		if _, err := repo.CreateRemote(&gitconfig.RemoteConfig{Name: "origin", URLs: []string{p.cfg.URL}}); err != nil {
			return err
		}
		p.repo = repo
	}
	return nil
}

// fetch brings the branch's head (force: a rewritten history replaces the
// old one) and returns its commit.
func (p *Poller) fetch(ctx context.Context) (*object.Commit, error) {
	ref := plumbing.NewRemoteReferenceName("origin", p.cfg.Branch)
	err := p.repo.FetchContext(ctx, &git.FetchOptions{RemoteName: "origin", Auth: p.auth, Force: true, CABundle: p.caBundle,
		RefSpecs: []gitconfig.RefSpec{gitconfig.RefSpec("+refs/heads/" + p.cfg.Branch + ":" + ref.String())}})
	if err != nil && !errors.Is(err, git.NoErrAlreadyUpToDate) {
		return nil, fmt.Errorf("gitops: fetch %s of %s: %w", p.cfg.Branch, p.cfg.URL, err)
	}
	r, err := p.repo.Reference(ref, true)
	if err != nil {
		return nil, fmt.Errorf("gitops: branch %s of %s: %w", p.cfg.Branch, p.cfg.URL, err)
	}
	return p.repo.CommitObject(r.Hash())
}

// trusted returns head, or with a keyring the newest commit on head's
// first-parent line that a trusted key signed; commits it passes over are
// reported once.
func (p *Poller) trusted(ctx context.Context, head *object.Commit) (*object.Commit, error) {
	if p.keyring == "" {
		return head, nil
	}
	c := head
	for i := 0; c != nil && i < 1000; i++ {
		if _, err := c.Verify(p.keyring); err == nil {
			if i > 0 {
				p.log.Info().Str("commit", c.Hash.String()).Msg("acting on the newest commit signed by a trusted key")
			}
			return c, nil
		} else if c.PGPSignature != "" {
			p.report(ctx, c.Hash.String(), "", "", fmt.Errorf("commit %s is not signed by a trusted key (%v): skipped", c.Hash.String()[:12], err))
		} else {
			p.report(ctx, c.Hash.String(), "", "", fmt.Errorf("commit %s is not signed: skipped", c.Hash.String()[:12]))
		}
		if c.NumParents() == 0 {
			return nil, nil
		}
		parent, err := c.Parent(0)
		if err != nil {
			return nil, err
		}
		c = parent
	}
	return nil, nil
}

// file is one request file of a commit.
type file struct {
	path string
	req  *Request
	err  error
}

// requests reads every file of commit's tree that matches the path glob.
func (p *Poller) requests(ctx context.Context, commit *object.Commit) ([]file, error) {
	tree, err := commit.Tree()
	if err != nil {
		return nil, err
	}
	var out []file
	err = tree.Files().ForEach(func(f *object.File) error {
		if ok, _ := path.Match(p.cfg.Path, f.Name); !ok {
			return nil
		}
		r, err := f.Reader()
		if err != nil {
			return err
		}
		defer r.Close()
		b, err := io.ReadAll(io.LimitReader(r, 1<<20))
		if err != nil {
			return err
		}
		req, perr := Parse(b)
		out = append(out, file{path: f.Name, req: req, err: perr})
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].path < out[j].path })
	return out, err
}

func (p *Poller) readState(ctx context.Context) (state, uint64, error) {
	e, err := p.kv.Get(ctx, p.stateKey())
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return state{Active: map[string]activeRequest{}}, 0, nil
	}
	if err != nil {
		return state{}, 0, fmt.Errorf("gitops: read state: %w", err)
	}
	var st state
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		return state{}, 0, fmt.Errorf("gitops: decode state: %w", err)
	}
	if st.Active == nil {
		st.Active = map[string]activeRequest{}
	}
	return st, e.Revision(), nil
}

// publish compares the commit's requests with prev, publishes the requests
// that became active and the ends of those that stopped, and returns the
// new state. A file that does not parse or validate is reported and keeps
// whatever it had published before.
func (p *Poller) publish(ctx context.Context, commit *object.Commit, files []file, prev state) (state, error) {
	now := p.cfg.Now()
	hash := commit.Hash.String()
	next := state{Commit: hash, Active: map[string]activeRequest{}}
	seen := map[string]bool{}
	for _, f := range files {
		seen[f.path] = true
		if f.err != nil {
			p.report(ctx, hash, f.path, nodeOf(f.req), f.err)
			if a, ok := prev.Active[f.path]; ok {
				next.Active[f.path] = a
			}
			continue
		}
		old, wasActive := prev.Active[f.path]
		if !f.req.Active(now) {
			if wasActive {
				if err := p.end(ctx, hash, f.path, old); err != nil {
					return prev, err
				}
			}
			continue
		}
		cur := activeRequest{Node: f.req.Spec.Node, RequestID: f.req.RequestID()}
		if wasActive && old != cur {
			if err := p.end(ctx, hash, f.path, old); err != nil {
				return prev, err
			}
		}
		if !wasActive || old != cur {
			by := "gitops:" + f.path + "@" + hash[:12]
			if commit.Author.Email != "" {
				by = commit.Author.Email + " (" + by + ")"
			}
			ev := f.req.event(by)
			id := schemas.DeterministicID(Source, "requested", hash, f.path, cur.RequestID)
			if err := p.send(ctx, id, ev); err != nil {
				return prev, err
			}
			p.log.Info().Str("commit", hash).Str("path", f.path).Str("node", cur.Node).Str("request", cur.RequestID).Msg("maintenance requested")
		}
		next.Active[f.path] = cur
	}
	for fp, old := range prev.Active {
		if !seen[fp] {
			if err := p.end(ctx, hash, fp, old); err != nil {
				return prev, err
			}
		}
	}
	return next, nil
}

func (p *Poller) end(ctx context.Context, commit, fp string, a activeRequest) error {
	id := schemas.DeterministicID(Source, "ended", commit, fp, a.RequestID)
	if err := p.send(ctx, id, &schemas.MaintenanceEnded{Node: a.Node, RequestID: a.RequestID}); err != nil {
		return err
	}
	p.log.Info().Str("commit", commit).Str("path", fp).Str("node", a.Node).Str("request", a.RequestID).Msg("maintenance ended")
	return nil
}

func (p *Poller) send(ctx context.Context, id string, payload schemas.Payload) error {
	e, err := schemas.New(Source, id, payload)
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = p.pub.Publish(cctx, e)
	return err
}

func nodeOf(r *Request) string {
	if r == nil {
		return ""
	}
	return r.Spec.Node
}

// report logs a problem with a commit (and a path) and publishes it as a
// failed status event, once per commit, path and message in this process
// (the event's id is deterministic, so replicas' copies are dropped too).
func (p *Poller) report(ctx context.Context, commit, fp, node string, problem error) {
	key := commit + "\x00" + fp + "\x00" + problem.Error()
	if p.reported[key] {
		return
	}
	p.reported[key] = true
	p.log.Warn().Str("commit", commit).Str("path", fp).Err(problem).Msg("request not acted on")
	if node == "" || !validNode(node) {
		node = "gitops"
	}
	where := "commit " + commit[:min(12, len(commit))]
	if fp != "" {
		where += " path " + fp
	}
	st := &schemas.Status{Operation: "gitops/" + strings.TrimPrefix(where, "commit "), Workflow: schemas.WorkflowMaintenance,
		Node: node, Phase: schemas.PhaseFailed, Message: truncate(where+": "+problem.Error(), 4000)}
	e, err := schemas.NewStatus(Source, schemas.DeterministicID(Source, "problem", key), st)
	if err != nil {
		p.log.Warn().Err(err).Msg("could not build the status event")
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := p.pub.Publish(cctx, e); err != nil {
		p.log.Warn().Err(err).Msg("could not publish the status event")
		delete(p.reported, key)
	}
}

func validNode(n string) bool {
	return (&schemas.NodeReady{Node: n, Since: time.Unix(1, 0)}).Validate() == nil
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "")
}
