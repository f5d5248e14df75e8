package gitops_test

import (
	"crypto/subtle"
	"encoding/pem"
	"net/http"
	"net/http/cgi"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/integration/gitrepo"
	"github.com/drover-io/drover/producers/gitops"
)

// TestHTTPSWithToken: the poller fetches over HTTPS from a real Git smart-HTTP server (git
// http-backend, as GitLab, Gitea and cgit serve it) behind TLS and a token checked as basic
// auth's password. The server's certificate is trusted through --git-ca-file; a wrong token is
// a clear error and publishes nothing; the right one publishes the committed request.
func TestHTTPSWithToken(t *testing.T) {
	e := newEnv(t)
	gitBin, err := exec.LookPath("git")
	require.NoError(t, err, "git (the machine image has it) serves the repository over HTTP")
	const token = "s3cret-token"
	var refused atomic.Int32
	backend := &cgi.Handler{Path: gitBin, Args: []string{"http-backend"},
		Env: []string{"GIT_PROJECT_ROOT=" + filepath.Dir(e.remote.Dir), "GIT_HTTP_EXPORT_ALL=1"}}
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, pass, ok := r.BasicAuth()
		if !ok || subtle.ConstantTimeCompare([]byte(pass), []byte(token)) != 1 {
			refused.Add(1)
			w.Header().Set("WWW-Authenticate", `Basic realm="git"`)
			http.Error(w, "unauthorized", http.StatusUnauthorized)
			return
		}
		backend.ServeHTTP(w, r)
	}))
	defer srv.Close()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	require.NoError(t, os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o600))
	url := srv.URL + "/" + filepath.Base(e.remote.Dir)

	file := gitrepo.Request("a", "node-1", "bios", "")
	e.push(map[string]string{"maintenance/a.yaml": file})
	wrong := filepath.Join(dir, "wrong")
	require.NoError(t, os.WriteFile(wrong, []byte("not-it\n"), 0o600))
	p := e.poller(func(c *gitops.Config) { c.URL, c.TokenFile, c.CAFile = url, wrong, ca })
	err = p.Poll(t.Context())
	require.Error(t, err)
	require.Contains(t, err.Error(), "authentication")
	require.NotZero(t, refused.Load())
	require.Empty(t, e.published(), "nothing published without access")

	right := filepath.Join(dir, "token")
	require.NoError(t, os.WriteFile(right, []byte(token+"\n"), 0o600))
	p = e.poller(func(c *gitops.Config) { c.URL, c.TokenFile, c.CAFile = url, right, ca })
	e.poll(p)
	require.Equal(t, []string{"requested node-1 " + requestID(t, file)}, e.published())

	// Without the CA the server's certificate is not trusted.
	p = e.poller(func(c *gitops.Config) { c.URL, c.TokenFile = url, right })
	err = p.Poll(t.Context())
	require.Error(t, err)
	require.Contains(t, err.Error(), "certificate")
}
