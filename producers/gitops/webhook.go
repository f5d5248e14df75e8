package gitops

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"io"
	"net/http"
	"strings"
)

// WebhookPath is where the HTTP listener serves the webhook.
const WebhookPath = "/git/webhook"

// ServeHTTP is POST /git/webhook: a push notification from GitHub, Gitea
// or GitLab. With a secret configured the request must carry a valid
// signature (X-Hub-Signature-256 "sha256=<hmac>" as GitHub sends it,
// X-Gitea-Signature "<hmac>" as Gitea does, both HMAC-SHA256 of the body)
// or GitLab's X-Gitlab-Token. The body is not trusted for anything: the
// webhook only makes the poller fetch at once.
func (p *Poller) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 25<<20))
	if err != nil {
		http.Error(w, "read body: "+err.Error(), http.StatusBadRequest)
		return
	}
	if len(p.secret) > 0 && !p.authentic(r, body) {
		p.log.Warn().Str("remote", r.RemoteAddr).Msg("git webhook without a valid signature refused")
		http.Error(w, "invalid or missing signature", http.StatusUnauthorized)
		return
	}
	p.Kick()
	w.WriteHeader(http.StatusAccepted)
	_, _ = io.WriteString(w, "fetching\n")
}

func (p *Poller) authentic(r *http.Request, body []byte) bool {
	mac := hmac.New(sha256.New, p.secret)
	mac.Write(body)
	want := mac.Sum(nil)
	check := func(sig string) bool {
		got, err := hex.DecodeString(strings.TrimSpace(sig))
		return err == nil && hmac.Equal(got, want)
	}
	if sig := r.Header.Get("X-Hub-Signature-256"); sig != "" {
		return check(strings.TrimPrefix(sig, "sha256="))
	}
	if sig := r.Header.Get("X-Gitea-Signature"); sig != "" {
		return check(sig)
	}
	if tok := r.Header.Get("X-Gitlab-Token"); tok != "" {
		return subtle.ConstantTimeCompare([]byte(tok), p.secret) == 1
	}
	return false
}
