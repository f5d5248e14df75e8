package app

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// `serve --ingress-tokens-file` answers POST /events on the HTTP listener:
// a bot's request lands in the stream and `drover status` shows it handled.
func TestServeIngress(t *testing.T) {
	sum := sha256.Sum256([]byte("bot-token"))
	tokens := writeFile(t, "tokens:\n- {name: chatbot, sha256: "+hex.EncodeToString(sum[:])+", types: [io.drover.maintenance.requested.v1]}\n")
	info := serveWith(t, func(o *Options) { o.IngressTokensFile = tokens })
	body := `{"node":"node-1","requestID":"CHG-9","reason":"firmware","requestedBy":"chatbot","mode":"LiveMigrate"}`
	post := func(token string) int {
		req, err := http.NewRequest(http.MethodPost, "http://"+info.HTTPAddr+"/events", strings.NewReader(body))
		require.NoError(t, err)
		for k, v := range map[string]string{"ce-specversion": "1.0", "ce-id": "chat-1", "ce-source": "chat/ops",
			"ce-type": "io.drover.maintenance.requested.v1", "Content-Type": "application/json", "Authorization": "Bearer " + token} {
			req.Header.Set(k, v)
		}
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		return resp.StatusCode
	}
	require.Equal(t, http.StatusUnauthorized, post("wrong"))
	require.Equal(t, http.StatusAccepted, post("bot-token"))
	require.Eventually(t, func() bool {
		code, out, _ := drover(t, info.NATSURL, "status")
		return code == 0 && strings.Contains(out, "maintenance.node-1.CHG-9") && strings.Contains(out, "succeeded")
	}, 30*time.Second, 100*time.Millisecond, "the request the bot posted is handled")
}

// A token file that does not parse stops serve at start with a usage error.
func TestServeRefusesABrokenTokenFile(t *testing.T) {
	o := DefaultOptions()
	o.NATSListen, o.HTTPListen, o.DataDir = "127.0.0.1:0", "127.0.0.1:0", t.TempDir()
	o.IngressTokensFile = writeFile(t, "tokens: [{name: x, sha256: nothex, types: ['*']}]")
	err := Serve(t.Context(), o, zerolog.New(zerolog.NewTestWriter(t)), nil)
	require.ErrorContains(t, err, "tokens[0] (x).sha256")
	var u usageError
	require.ErrorAs(t, err, &u)
}
