package recovery_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/recovery"
	"github.com/drover-io/drover/integration/amtest"
	"github.com/drover-io/drover/integration/sim"
)

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startAlertmanager runs the real Alertmanager with the shipped receiver
// configuration pointing at drover, authenticated with the token file,
// repeating every two seconds.
func startAlertmanager(t *testing.T, droverAddr, tokenFile string) *amtest.Server {
	t.Helper()
	b, err := os.ReadFile("../../deploy/alertmanager/receiver.yaml")
	require.NoError(t, err)
	cfg := strings.NewReplacer("http://drover.drover.svc:9090", "http://"+droverAddr,
		"/etc/alertmanager/secrets/drover/token", tokenFile,
		"group_interval: 1m", "group_interval: 1s", "repeat_interval: 4h", "repeat_interval: 2s").Replace(string(b))
	for _, want := range []string{droverAddr, tokenFile, "group_interval: 1s", "repeat_interval: 2s"} {
		require.Contains(t, cfg, want, "the example changed: adapt the test")
	}
	am, err := amtest.Start(context.Background(), t.TempDir(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() {
		am.Stop()
		if t.Failed() {
			b, _ := os.ReadFile(am.Log)
			t.Logf("alertmanager log:\n%s", b)
		}
	})
	return am
}

func postAlert(t *testing.T, am *amtest.Server, name, node string) {
	t.Helper()
	require.NoError(t, am.PostAlert(context.Background(), map[string]string{"alertname": name, "node": node, "severity": "warning"}))
}

// scrape returns the sum of the samples of a metric whose labels contain
// every one of match.
func scrape(t *testing.T, url, name string, match ...string) float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	sum := 0.0
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(line, name) || strings.HasPrefix(line, "#") {
			continue
		}
		ok := true
		for _, m := range match {
			ok = ok && strings.Contains(line, m)
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

// TestAlertmanager: the real Alertmanager, with a webhook receiver pointing
// at drover, triggers the recovery of a dead node; its repeated
// notifications trigger no second recovery; a wrong token gets 401; with
// drover down Alertmanager retries, and the alert still acts once drover is
// back.
func TestAlertmanager(t *testing.T) {
	e := newEnv(t, envOptions{})
	e.controlPlane()
	for _, n := range []string{"n1", "n2", "n3"} {
		e.node(n, sim.NodeOptions{}, false)
	}
	e.vmOn("a", "n1", sim.VMOptions{})
	e.vmOn("b", "n2", sim.VMOptions{})
	token := filepath.Join(t.TempDir(), "token")
	require.NoError(t, os.WriteFile(token, []byte("s3cret-token\n"), 0o600))
	o := e.droverOptions()
	o.NodeWatch = false // Alertmanager is the only producer here
	o.Fencing = recovery.FencingNone
	o.AlertmanagerTokenFile = token
	o.StormMaxUnhealthy = "2" // n1 stays down while n2 fails
	o.HTTPListen = fmt.Sprintf("127.0.0.1:%d", freePort(t))
	info := e.serve(o)
	hook := "http://" + info.HTTPAddr + "/alertmanager"
	metrics := "http://" + info.HTTPAddr + "/metrics"

	t.Run("refused without the right token, malformed payloads, unlabelled alerts", func(t *testing.T) {
		post := func(auth, body string) (int, string) {
			req, err := http.NewRequest(http.MethodPost, hook, strings.NewReader(body))
			require.NoError(t, err)
			if auth != "" {
				req.Header.Set("Authorization", auth)
			}
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return resp.StatusCode, string(b)
		}
		code, _ := post("Bearer wrong", `{"version":"4","alerts":[]}`)
		require.Equal(t, http.StatusUnauthorized, code)
		code, _ = post("", `{"version":"4","alerts":[]}`)
		require.Equal(t, http.StatusUnauthorized, code)
		code, body := post("Bearer s3cret-token", `{"version":"4","alerts":[`)
		require.Equal(t, http.StatusBadRequest, code)
		require.Contains(t, body, "malformed payload")
		code, body = post("Bearer s3cret-token", `{"version":"3","alerts":[]}`)
		require.Equal(t, http.StatusBadRequest, code)
		require.Contains(t, body, "version 4")
		code, body = post("Bearer s3cret-token", `{"version":"4","status":"firing","alerts":[{"status":"firing","labels":{"alertname":"KubeNodeNotReady","instance":"10.0.0.1"},"startsAt":"2026-11-29T10:00:00Z","fingerprint":"abc"}]}`)
		require.Equal(t, http.StatusOK, code)
		require.Contains(t, body, `no \"node\" label naming the node; drover does not guess it`)
	})

	am := startAlertmanager(t, info.HTTPAddr, token)
	t.Run("an alert triggers the recovery, once", func(t *testing.T) {
		e.fault("n1", sim.FaultDown)
		e.eventually(30*time.Second, "n1 gone", func() (bool, string) { return e.leaseAge("n1") > o.NodeLeaseTimeout, "" })
		postAlert(t, am, "KubeNodeNotReady", "n1")
		rec := e.recoveryOf("n1", 60*time.Second, "succeeded", succeeded)
		require.NotEqual(t, "n1", e.runningElsewhere("a", "n1", 30*time.Second).Status.NodeName)
		// Alertmanager goes on notifying (repeat_interval 2s): JetStream drops
		// the same event id, the finished recovery is not run again.
		e.eventually(30*time.Second, "repeated notifications", func() (bool, string) {
			d := scrape(t, metrics, "drover_events_duplicate_total", `source="alertmanager"`)
			return d >= 2, fmt.Sprint(d)
		})
		recs := e.ops(consumers.RecoveryOperationFilter("n1"))
		require.Len(t, recs, 1)
		require.Equal(t, rec.Key, recs[0].Key)
		require.Equal(t, 1, recs[0].Attempts, "ran once")
	})

	t.Run("drover down: Alertmanager retries, the alert acts once drover is back", func(t *testing.T) {
		e.stopDrovers()
		e.fault("n2", sim.FaultDown)
		e.eventually(30*time.Second, "n2 gone", func() (bool, string) { return e.leaseAge("n2") > o.NodeLeaseTimeout, "" })
		before := scrape(t, am.URL+"/metrics", "alertmanager_notifications_failed_total", `integration="webhook"`)
		postAlert(t, am, "KubeNodeNotReady", "n2")
		e.eventually(30*time.Second, "Alertmanager failing to notify", func() (bool, string) {
			n := scrape(t, am.URL+"/metrics", "alertmanager_notifications_failed_total", `integration="webhook"`)
			return n >= before+2, fmt.Sprint(n)
		})
		require.Empty(t, e.ops(consumers.RecoveryOperationFilter("n2")))
		e.serve(o) // same address
		e.recoveryOf("n2", 60*time.Second, "succeeded", succeeded)
		require.NotEqual(t, "n2", e.runningElsewhere("b", "n2", 30*time.Second).Status.NodeName)
	})
	e.noViolations()
}

// leaseAge is how long ago node's kubelet last renewed its Lease.
func (e *env) leaseAge(node string) time.Duration {
	l, err := e.s.Kube.CoordinationV1().Leases("kube-node-lease").Get(e.ctx, node, metav1.GetOptions{})
	if err != nil || l.Spec.RenewTime == nil {
		return 0
	}
	return time.Since(l.Spec.RenewTime.Time)
}
