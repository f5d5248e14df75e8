package gitops_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/gitrepo"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/producers/gitops"
	"github.com/drover-io/drover/schemas"
)

type env struct {
	t      *testing.T
	js     jetstream.JetStream
	remote *gitrepo.Remote
	clone  *gitrepo.Clone
	seen   uint64 // request stream sequence read so far
	status uint64
	clock  *clock
}

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func newEnv(t *testing.T) *env {
	t.Helper()
	ns := natstest.Start(t)
	nc := natstest.Connect(t, ns.URL())
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	_, err = consumers.Setup(context.Background(), js, consumers.Config{}, schemas.Workflows()...)
	require.NoError(t, err)
	remote, err := gitrepo.NewRemote(t.TempDir())
	require.NoError(t, err)
	clone, err := remote.NewClone(t.TempDir())
	require.NoError(t, err)
	return &env{t: t, js: js, remote: remote, clone: clone, clock: &clock{now: time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC)}}
}

func (e *env) poller(edit ...func(*gitops.Config)) *gitops.Poller {
	e.t.Helper()
	cfg := gitops.Config{URL: e.remote.URL, Now: e.clock.Now}
	for _, f := range edit {
		f(&cfg)
	}
	p, err := gitops.New(cfg, e.js, zerolog.New(zerolog.NewTestWriter(e.t)))
	require.NoError(e.t, err)
	return p
}

func (e *env) push(files map[string]string, remove ...string) string {
	e.t.Helper()
	h, err := e.clone.CommitAndPush(files, remove, "change")
	require.NoError(e.t, err)
	return h
}

func (e *env) poll(p *gitops.Poller) {
	e.t.Helper()
	require.NoError(e.t, p.Poll(context.Background()))
}

// published returns the request events published since the last call.
func (e *env) published() []string {
	return e.read(consumers.StreamRequests, &e.seen)
}

// statuses returns the status messages published since the last call.
func (e *env) statuses() []string {
	return e.read(consumers.StreamStatus, &e.status)
}

func (e *env) read(stream string, seen *uint64) []string {
	e.t.Helper()
	ctx := context.Background()
	s, err := e.js.Stream(ctx, stream)
	require.NoError(e.t, err)
	info, err := s.Info(ctx)
	require.NoError(e.t, err)
	var out []string
	for seq := *seen + 1; seq <= info.State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			continue
		}
		ev, err := schemas.FromHeaders(m.Header, m.Data)
		require.NoError(e.t, err)
		p, err := schemas.Decode(ev)
		require.NoError(e.t, err)
		switch d := p.(type) {
		case *schemas.MaintenanceRequested:
			out = append(out, fmt.Sprintf("requested %s %s", d.Node, d.RequestID))
		case *schemas.MaintenanceEnded:
			out = append(out, fmt.Sprintf("ended %s %s", d.Node, d.RequestID))
		case *schemas.Status:
			out = append(out, fmt.Sprintf("status %s %s %s", d.Node, d.Phase, d.Message))
		}
	}
	*seen = info.State.LastSeq
	return out
}

func requestID(t *testing.T, file string) string {
	r, err := gitops.Parse([]byte(file))
	require.NoError(t, err)
	return r.RequestID()
}

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		file    string
		wantErr string
	}{
		{name: "minimal", file: gitrepo.Request("w3", "worker-3", "bios", "")},
		{name: "everything", file: gitrepo.Request("w3", "worker-3", "bios", "\n  mode: Evict\n  force: true\n  returnHome: true\n  window: {start: \"2026-11-22T01:00:00Z\", end: \"2026-11-22T03:00:00Z\"}\n  state: Active")},
		{name: "unknown field", file: gitrepo.Request("w3", "worker-3", "bios", "\n  color: blue"), wantErr: "color"},
		{name: "bad node", file: gitrepo.Request("w3", "Worker_3", "bios", ""), wantErr: "spec.node"},
		{name: "bad mode", file: gitrepo.Request("w3", "worker-3", "bios", "\n  mode: Teleport"), wantErr: "spec.mode"},
		{name: "bad state", file: gitrepo.Request("w3", "worker-3", "bios", "\n  state: Maybe"), wantErr: "spec.state"},
		{name: "window end before start", file: gitrepo.Request("w3", "worker-3", "bios", "\n  window: {start: \"2026-11-22T03:00:00Z\", end: \"2026-11-22T01:00:00Z\"}"), wantErr: "window.end"},
		{name: "wrong kind", file: strings.Replace(gitrepo.Request("w3", "worker-3", "bios", ""), "MaintenanceRequest", "Pizza", 1), wantErr: "kind"},
		{name: "not yaml", file: "spec: [", wantErr: "parse"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := gitops.Parse([]byte(tt.file))
			if tt.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tt.wantErr)
		})
	}
	a := requestID(t, gitrepo.Request("w3", "worker-3", "bios", ""))
	require.Equal(t, a, requestID(t, gitrepo.Request("w3", "worker-3", "BIOS v2", "")), "editing the reason keeps the request")
	require.NotEqual(t, a, requestID(t, gitrepo.Request("w3", "worker-3", "bios", "\n  mode: Evict")), "changing the mode is a new request")
}

// A commit adds a request: published once, however often it is polled and by
// how many replicas; removing the file ends it.
func TestAddThenRemove(t *testing.T) {
	e := newEnv(t)
	file := gitrepo.Request("w3", "worker-3", "bios", "")
	id := requestID(t, file)
	e.push(map[string]string{"maintenance/w3.yaml": file, "README.md": "not a request"})
	p1, p2 := e.poller(), e.poller()
	e.poll(p1)
	e.poll(p1)
	e.poll(p2)
	require.Equal(t, []string{"requested worker-3 " + id}, e.published())
	e.push(nil, "maintenance/w3.yaml")
	e.poll(p2)
	e.poll(p1)
	require.Equal(t, []string{"ended worker-3 " + id}, e.published())
}

// A restarted producer (a new Poller, same KV) publishes nothing it published before.
func TestRestartPublishesNothingNew(t *testing.T) {
	e := newEnv(t)
	e.push(map[string]string{"maintenance/a.yaml": gitrepo.Request("a", "node-a", "x", "")})
	e.poll(e.poller())
	require.Len(t, e.published(), 1)
	e.poll(e.poller())
	require.Empty(t, e.published())
}

// A bad file beside a good one in one commit: the good one is published, the
// bad one reported with the commit, the path and the error.
func TestBadFileBesideGoodOne(t *testing.T) {
	e := newEnv(t)
	good := gitrepo.Request("good", "node-a", "x", "")
	h := e.push(map[string]string{
		"maintenance/good.yaml": good,
		"maintenance/bad.yaml":  gitrepo.Request("bad", "node-b", "x", "\n  mode: Sideways"),
	})
	p := e.poller()
	e.poll(p)
	require.Equal(t, []string{"requested node-a " + requestID(t, good)}, e.published())
	st := e.statuses()
	require.Len(t, st, 1)
	require.Contains(t, st[0], "status node-b Failed")
	require.Contains(t, st[0], h[:12])
	require.Contains(t, st[0], "maintenance/bad.yaml")
	require.Contains(t, st[0], "spec.mode")
	e.poll(p)
	require.Empty(t, e.statuses(), "reported once")
}

// Changing a request's mode ends the old request and starts the new one;
// marking it Done ends it.
func TestChangeAndDone(t *testing.T) {
	e := newEnv(t)
	v1 := gitrepo.Request("w3", "worker-3", "bios", "")
	v2 := gitrepo.Request("w3", "worker-3", "bios", "\n  mode: Evict")
	done := gitrepo.Request("w3", "worker-3", "bios", "\n  mode: Evict\n  state: Done")
	p := e.poller()
	e.push(map[string]string{"maintenance/w3.yaml": v1})
	e.poll(p)
	e.push(map[string]string{"maintenance/w3.yaml": v2})
	e.poll(p)
	e.push(map[string]string{"maintenance/w3.yaml": done})
	e.poll(p)
	require.Equal(t, []string{
		"requested worker-3 " + requestID(t, v1),
		"ended worker-3 " + requestID(t, v1),
		"requested worker-3 " + requestID(t, v2),
		"ended worker-3 " + requestID(t, v2),
	}, e.published())
}

// A force-push that rewrites history: compared by tree, the request of the
// lost history ends and the new one starts.
func TestForcePush(t *testing.T) {
	e := newEnv(t)
	r1 := gitrepo.Request("r1", "node-a", "x", "")
	r2 := gitrepo.Request("r2", "node-b", "y", "")
	e.push(map[string]string{"maintenance/r1.yaml": r1})
	p := e.poller()
	e.poll(p)
	other, err := e.remote.NewClone(t.TempDir())
	require.NoError(t, err)
	_, err = other.Commit(map[string]string{"maintenance/r2.yaml": r2}, nil, "rewritten")
	require.NoError(t, err)
	require.Error(t, other.Push(false), "not a fast-forward")
	require.NoError(t, other.Push(true))
	e.poll(p)
	require.Equal(t, []string{
		"requested node-a " + requestID(t, r1),
		"requested node-b " + requestID(t, r2),
		"ended node-a " + requestID(t, r1),
	}, e.published())
}

// With a trusted keyring only signed commits are acted on: an unsigned one
// is reported and skipped (its request is not published).
func TestTrustedKeys(t *testing.T) {
	e := newEnv(t)
	key, ring, err := gitrepo.NewKey("Alice", "alice@example.com")
	require.NoError(t, err)
	mallory, _, err := gitrepo.NewKey("Mallory", "mallory@example.com")
	require.NoError(t, err)
	keyFile := filepath.Join(t.TempDir(), "trusted.asc")
	require.NoError(t, os.WriteFile(keyFile, []byte(ring), 0o600))
	p := e.poller(func(c *gitops.Config) { c.TrustedKeysFile = keyFile })

	signed := gitrepo.Request("signed", "node-a", "x", "")
	e.clone.Key = key
	e.push(map[string]string{"maintenance/signed.yaml": signed})
	e.poll(p)
	require.Equal(t, []string{"requested node-a " + requestID(t, signed)}, e.published())

	e.clone.Key = nil
	unsigned := e.push(map[string]string{"maintenance/unsigned.yaml": gitrepo.Request("unsigned", "node-b", "x", "")})
	e.poll(p)
	require.Empty(t, e.published(), "an unsigned commit is not acted on")
	st := e.statuses()
	require.Len(t, st, 1)
	require.Contains(t, st[0], unsigned[:12])
	require.Contains(t, st[0], "not signed")

	e.clone.Key = mallory
	e.push(map[string]string{"maintenance/mallory.yaml": gitrepo.Request("mallory", "node-c", "x", "")})
	e.poll(p)
	require.Empty(t, e.published(), "a commit signed by an untrusted key is not acted on")
	require.Contains(t, strings.Join(e.statuses(), "\n"), "not signed by a trusted key")

	e.clone.Key = key
	e.push(map[string]string{"README.md": "signed again"})
	e.poll(p)
	require.ElementsMatch(t, []string{
		"requested node-b " + requestID(t, gitrepo.Request("unsigned", "node-b", "x", "")),
		"requested node-c " + requestID(t, gitrepo.Request("mallory", "node-c", "x", "")),
	}, e.published(), "a signed commit on top vouches for the tree it carries")
}

// A window that opens later is published when it opens; a closed window
// ends the maintenance.
func TestWindow(t *testing.T) {
	e := newEnv(t)
	file := gitrepo.Request("w", "node-a", "x", "\n  window: {start: \"2026-11-22T01:00:00Z\", end: \"2026-11-22T03:00:00Z\"}")
	e.push(map[string]string{"maintenance/w.yaml": file})
	p := e.poller()
	e.poll(p)
	require.Empty(t, e.published(), "the window has not opened")
	e.clock.add(90 * time.Minute)
	e.poll(p)
	require.Equal(t, []string{"requested node-a " + requestID(t, file)}, e.published())
	e.clock.add(2 * time.Hour)
	e.poll(p)
	require.Equal(t, []string{"ended node-a " + requestID(t, file)}, e.published())
}

// The webhook checks GitHub's and Gitea's HMAC signatures and GitLab's token,
// and makes the poller fetch at once.
func TestWebhook(t *testing.T) {
	e := newEnv(t)
	secretFile := filepath.Join(t.TempDir(), "secret")
	require.NoError(t, os.WriteFile(secretFile, []byte("s3cret\n"), 0o600))
	p := e.poller(func(c *gitops.Config) { c.WebhookSecretFile = secretFile; c.Interval = time.Hour })
	srv := httptest.NewServer(p)
	defer srv.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Start(ctx) }()
	defer func() { cancel(); <-done }()

	body := `{"ref":"refs/heads/main"}`
	mac := hmac.New(sha256.New, []byte("s3cret"))
	mac.Write([]byte(body))
	sig := hex.EncodeToString(mac.Sum(nil))
	post := func(h map[string]string) int {
		req, err := http.NewRequest(http.MethodPost, srv.URL+gitops.WebhookPath, strings.NewReader(body))
		require.NoError(t, err)
		for k, v := range h {
			req.Header.Set(k, v)
		}
		res, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		res.Body.Close()
		return res.StatusCode
	}
	require.Equal(t, http.StatusUnauthorized, post(nil))
	require.Equal(t, http.StatusUnauthorized, post(map[string]string{"X-Hub-Signature-256": "sha256=" + strings.Repeat("0", 64)}))
	require.Equal(t, http.StatusUnauthorized, post(map[string]string{"X-Gitlab-Token": "guess"}))

	file := gitrepo.Request("hook", "node-a", "x", "")
	e.push(map[string]string{"maintenance/hook.yaml": file})
	require.Equal(t, http.StatusAccepted, post(map[string]string{"X-Hub-Signature-256": "sha256=" + sig}))
	require.Eventually(t, func() bool { return len(e.published()) > 0 }, 10*time.Second, 20*time.Millisecond, "the webhook made it fetch")
	require.Equal(t, http.StatusAccepted, post(map[string]string{"X-Gitea-Signature": sig}))
	require.Equal(t, http.StatusAccepted, post(map[string]string{"X-Gitlab-Token": "s3cret"}))
}
