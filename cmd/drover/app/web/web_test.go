package web_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/cmd/drover/app/web"
	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/producers"
	"github.com/drover-io/drover/schemas"
)

// chromium finds the browser the tests drive: $DROVER_CHROMIUM, else
// Debian's /usr/bin/chromium. Missing, the test fails with what to do.
func chromium(t *testing.T) string {
	t.Helper()
	path := os.Getenv("DROVER_CHROMIUM")
	if path == "" {
		path = "/usr/bin/chromium"
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("headless Chromium is needed for the page test (%v): run `make chromium` (Debian's chromium package) or set DROVER_CHROMIUM", err)
	}
	return path
}

func browser(t *testing.T) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium(t)), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true), chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()))
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancel)
	ctx, cancel2 := chromedp.NewContext(actx)
	t.Cleanup(cancel2)
	ctx, cancel3 := context.WithTimeout(ctx, 2*time.Minute)
	t.Cleanup(cancel3)
	return ctx
}

// The page shows an operation's VMs moving while it runs, without a reload,
// and a dead letter with its reason.
func TestPageFollowsAnOperationLive(t *testing.T) {
	srv := natstest.Start(t)
	nc := natstest.Connect(t, srv.URL())
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	cfg := consumers.Config{AckWait: 3 * time.Second, StatusInterval: 50 * time.Millisecond, FetchWait: 200 * time.Millisecond,
		ShutdownGrace: time.Second, BackoffBase: 50 * time.Millisecond, BackoffMax: 100 * time.Millisecond}
	migrated, done := make(chan struct{}), make(chan struct{})
	handler := consumers.HandlerFunc(func(ctx context.Context, op *consumers.Operation, ev consumers.Event) error {
		if ev.Payload.(*schemas.MaintenanceRequested).RequestID == "doomed" {
			return consumers.Terminalf("node-2 has no room for db-9")
		}
		for _, vm := range []string{"ns/vm-a", "ns/vm-b"} {
			if err := op.Progress(ctx, vm, consumers.TargetProgress{Phase: "Migrating", Node: "node-2"}); err != nil {
				return err
			}
		}
		if err := op.Flush(ctx); err != nil {
			return err
		}
		for _, step := range []struct {
			gate chan struct{}
			vm   string
		}{{migrated, "ns/vm-a"}, {done, "ns/vm-b"}} {
			select {
			case <-step.gate:
			case <-ctx.Done():
				return ctx.Err()
			}
			if err := op.Progress(ctx, step.vm, consumers.TargetProgress{Phase: "Running", Node: "node-2"}); err != nil {
				return err
			}
		}
		return nil
	})
	rt, err := consumers.NewRuntime(natstest.Connect(t, srv.URL()), cfg, zerolog.New(zerolog.NewTestWriter(t)), nil,
		consumers.Workflow{Name: schemas.WorkflowMaintenance, Handler: handler})
	require.NoError(t, err)
	rctx, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- rt.Start(rctx) }()
	t.Cleanup(func() { stop(); <-stopped })
	require.Eventually(t, func() bool {
		_, err := js.Consumer(context.Background(), consumers.StreamRequests, schemas.WorkflowMaintenance)
		return err == nil
	}, 30*time.Second, 50*time.Millisecond)

	page := httptest.NewServer((&web.Server{NC: nc, JS: js, Log: zerolog.New(zerolog.NewTestWriter(t))}).Handler())
	t.Cleanup(page.Close)
	publish := func(id, req string) {
		e, err := schemas.New("test", id, &schemas.MaintenanceRequested{Node: "node-1", RequestID: req, Reason: "r", RequestedBy: "t"})
		require.NoError(t, err)
		_, err = (&producers.Publisher{JS: js}).Publish(context.Background(), e)
		require.NoError(t, err)
	}
	key := consumers.MaintenanceOperationKey("node-1", "live")
	vmPhase := func(vm, phase string) chromedp.CSS {
		return chromedp.CSS(`tr.vm[data-vm="` + vm + `"] td.phase[data-phase="` + phase + `"]`)
	}
	ctx := browser(t)
	require.NoError(t, chromedp.Do(ctx, chromedp.Navigate(page.URL), chromedp.WaitVisible(chromedp.CSS(`#connection.on`))))
	publish("live-1", "live")
	require.NoError(t, chromedp.Do(ctx,
		chromedp.WaitVisible(vmPhase("ns/vm-a", "Migrating")), chromedp.WaitVisible(vmPhase("ns/vm-b", "Migrating"))),
		"the page shows both VMs migrating")
	close(migrated)
	require.NoError(t, chromedp.Do(ctx, chromedp.WaitVisible(vmPhase("ns/vm-a", "Running")),
		chromedp.WaitVisible(vmPhase("ns/vm-b", "Migrating"))), "vm-a moved, vm-b still migrating")
	close(done)
	require.NoError(t, chromedp.Do(ctx,
		chromedp.WaitVisible(chromedp.CSS(`tr.op[data-op="`+key+`"] td.phase[data-phase="Succeeded"]`)),
		chromedp.WaitVisible(vmPhase("ns/vm-b", "Running"))), "the operation finishes on the page")
	counts, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(`tr.op[data-op="`+key+`"] td:nth-child(5)`)))
	require.NoError(t, err)
	require.Equal(t, "2/2", counts, "VMs done of total")

	publish("doomed-1", "doomed")
	require.NoError(t, chromedp.Do(ctx, chromedp.Reload(),
		chromedp.WaitVisible(`//table[@id="deadletters"]//td[contains(., "node-2 has no room for db-9")]`)),
		"the dead letter and its reason are listed")
}

// With tokens configured, the page and its API answer only with one.
func TestPageNeedsATokenWhenConfigured(t *testing.T) {
	srv := natstest.Start(t)
	nc := natstest.Connect(t, srv.URL())
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	h := (&web.Server{NC: nc, JS: js, Authorize: func(tok string) bool { return tok == "s3cret" }}).Handler()
	page := httptest.NewServer(h)
	t.Cleanup(page.Close)
	for path, want := range map[string]int{"/": 401, "/api/operations": 401, "/?token=s3cret": 200} {
		resp, err := http.Get(page.URL + path)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, want, resp.StatusCode, path)
	}
	req, _ := http.NewRequest(http.MethodGet, page.URL+"/api/deadletters", nil)
	req.Header.Set("Authorization", "Bearer s3cret")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.NotEqual(t, http.StatusUnauthorized, resp.StatusCode)
}
