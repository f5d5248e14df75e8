package app

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"sigs.k8s.io/yaml"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestOptionsPrecedence(t *testing.T) {
	file := filepath.Join(t.TempDir(), "drover.yaml")
	require.NoError(t, os.WriteFile(file, []byte("nats-listen: 127.0.0.1:1111\nack-wait: 40s\nconcurrency: 2\nlog-level: debug\n"), 0o600))
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		check   func(t *testing.T, o Options)
		wantErr string
	}{
		{name: "defaults", check: func(t *testing.T, o Options) { require.Equal(t, DefaultOptions(), o) }},
		{name: "file over default", args: []string{"--config", file}, check: func(t *testing.T, o Options) {
			require.Equal(t, "127.0.0.1:1111", o.NATSListen)
			require.Equal(t, 40*time.Second, o.AckWait)
			require.Equal(t, 2, o.Concurrency)
			require.Equal(t, "./drover-data", o.DataDir)
		}},
		{name: "env over file", args: []string{"--config", file}, env: map[string]string{"DROVER_NATS_LISTEN": "127.0.0.1:2222", "DROVER_CONCURRENCY": "3"},
			check: func(t *testing.T, o Options) {
				require.Equal(t, "127.0.0.1:2222", o.NATSListen)
				require.Equal(t, 3, o.Concurrency)
				require.Equal(t, 40*time.Second, o.AckWait, "file value kept where env is silent")
			}},
		{name: "flag over env", args: []string{"--config", file, "--nats-listen", "127.0.0.1:3333"}, env: map[string]string{"DROVER_NATS_LISTEN": "127.0.0.1:2222"},
			check: func(t *testing.T, o Options) { require.Equal(t, "127.0.0.1:3333", o.NATSListen) }},
		{name: "per-workflow concurrency", args: []string{"--concurrency", "3", "--recovery-concurrency", "8"},
			check: func(t *testing.T, o Options) {
				require.Equal(t, 8, o.WorkflowConcurrency("recovery"))
				require.Equal(t, 3, o.WorkflowConcurrency("maintenance"))
			}},
		{name: "config file from env", env: map[string]string{"DROVER_CONFIG": file},
			check: func(t *testing.T, o Options) { require.Equal(t, "127.0.0.1:1111", o.NATSListen) }},
		{name: "bad duration in env", env: map[string]string{"DROVER_ACK_WAIT": "soon"}, wantErr: "DROVER_ACK_WAIT: not a duration"},
		{name: "unknown key in file", args: []string{"--config", writeFile(t, "nats-lisen: x\n")}, wantErr: `unknown key "nats-lisen"`},
		{name: "broken yaml", args: []string{"--config", writeFile(t, "nats-listen: [\n")}, wantErr: "config"},
		{name: "embedded with replicas 3", args: []string{"--replicas", "3"}, wantErr: "embedded NATS server holds one replica"},
		{name: "unknown flag", args: []string{"--nats-lisen", "x"}, wantErr: "nats-lisen"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := LoadOptions(tt.args, env(tt.env))
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				var u usageError
				require.ErrorAs(t, err, &u, "configuration errors are usage errors (exit 2)")
				return
			}
			require.NoError(t, err)
			tt.check(t, o)
		})
	}
}

func writeFile(t *testing.T, content string) string {
	p := filepath.Join(t.TempDir(), "c.yaml")
	require.NoError(t, os.WriteFile(p, []byte(content), 0o600))
	return p
}

// served runs `drover serve` in-process on the embedded default and returns its addresses.
func served(t *testing.T) Info { t.Helper(); return serveWith(t, nil) }

// serveWith runs `drover serve` in-process with the options change made
// (nil: the embedded default) and returns its addresses.
func serveWith(t *testing.T, change func(*Options)) Info {
	t.Helper()
	o := DefaultOptions()
	o.NATSListen, o.HTTPListen, o.DataDir = "127.0.0.1:0", "127.0.0.1:0", t.TempDir()
	o.AckWait, o.ShutdownGrace = 2*time.Second, time.Second
	if change != nil {
		change(&o)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan Info, 1)
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, o, zerolog.New(zerolog.NewTestWriter(t)), func(i Info) { ready <- i }) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			require.NoError(t, err)
		case <-time.After(15 * time.Second):
			t.Errorf("serve did not stop within 15s")
		}
	})
	select {
	case i := <-ready:
		return i
	case err := <-done:
		t.Fatalf("serve exited: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatalf("serve not ready within 30s")
	}
	return Info{}
}

// drover runs the CLI and returns exit code, stdout and stderr.
func drover(t *testing.T, url string, args ...string) (int, string, string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(context.Background(), args, &out, &errOut, env(map[string]string{"DROVER_NATS_URL": url}))
	return code, out.String(), errOut.String()
}

func TestCLIAgainstServe(t *testing.T) {
	info := served(t)
	nc, err := nats.Connect(info.NATSURL)
	require.NoError(t, err)
	defer nc.Close()
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	requests := func() uint64 {
		s, err := js.Stream(context.Background(), consumers.StreamRequests)
		require.NoError(t, err)
		i, err := s.Info(context.Background())
		require.NoError(t, err)
		return i.State.LastSeq
	}

	t.Run("publish reports id, subject and duplicates", func(t *testing.T) {
		code, out, errOut := drover(t, info.NATSURL, "maintenance", "start", "worker-1.example.com", "--reason", "firmware", "--request-id", "r1")
		require.Equal(t, ExitOK, code, errOut)
		require.Contains(t, out, "subject:   drover.req.maintenance-requested.worker-1_example_com")
		require.Contains(t, out, "duplicate: no")
		code, out, _ = drover(t, info.NATSURL, "maintenance", "start", "worker-1.example.com", "--reason", "firmware", "--request-id", "r1")
		require.Equal(t, ExitOK, code)
		require.Contains(t, out, "duplicate: yes")
	})

	t.Run("invalid arguments exit 2 and send nothing", func(t *testing.T) {
		before := requests()
		for _, args := range [][]string{
			{"maintenance", "start", "node-1"},                                    // no reason
			{"maintenance", "start", "Bad_Node", "--reason", "x"},                 // invalid name
			{"maintenance", "start", "node-1", "--reason", "x", "--mode", "Yolo"}, // bad mode
			{"vm", "migrate", "no-slash"},
			{"vm", "migrate", "ns/vm", "--node-selector", "novalue"},
			{"node", "fenced", "node-1"}, // no method
			{"dlq", "replay", "abc"},
			{"status", "-o", "xml"},
			{"frobnicate"},
			{"maintenance", "start", "node-1", "--reason", "x", "--bogus"}, // unknown flag
			{"maintenance", "start", "node-1", "node-2", "--reason", "x"},  // one node
			{"vm", "cancel", "ns/vm", "--wiat"},
			{"node", "fenced", "node-1", "--method", "ipmi", "-x"},
			{"maintenance"},
		} {
			code, _, errOut := drover(t, info.NATSURL, args...)
			require.Equal(t, ExitUsage, code, "%v: %s", args, errOut)
			require.NotEmpty(t, errOut, "%v must say what is wrong", args)
		}
		require.Equal(t, before, requests(), "nothing may be published for invalid arguments")
	})

	t.Run("status shows the operation", func(t *testing.T) {
		require.Eventually(t, func() bool {
			code, out, _ := drover(t, info.NATSURL, "status", "-o", "json")
			var recs []consumers.Record
			if code != ExitOK || json.Unmarshal([]byte(out), &recs) != nil {
				return false
			}
			for _, r := range recs {
				if r.Key == consumers.MaintenanceOperationKey("worker-1.example.com", "r1") && r.State == consumers.StateSucceeded {
					return true
				}
			}
			return false
		}, 20*time.Second, 50*time.Millisecond)
		code, out, _ := drover(t, info.NATSURL, "status")
		require.Equal(t, ExitOK, code)
		require.Equal(t, []string{"OPERATION", "WORKFLOW", "TARGET", "PHASE", "VMS", "AGE", "MESSAGE"}, strings.Fields(strings.SplitN(out, "\n", 2)[0]))
		require.Contains(t, out, "worker-1.example.com")
		code, out, _ = drover(t, info.NATSURL, "status", "-o", "yaml")
		require.Equal(t, ExitOK, code)
		var recs []consumers.Record
		require.NoError(t, yaml.Unmarshal([]byte(out), &recs), out)
		require.True(t, slices.ContainsFunc(recs, func(r consumers.Record) bool {
			return r.Key == consumers.MaintenanceOperationKey("worker-1.example.com", "r1") && r.State == consumers.StateSucceeded
		}), out)
	})

	t.Run("maintenance end finds the request", func(t *testing.T) {
		code, out, errOut := drover(t, info.NATSURL, "maintenance", "end", "worker-1.example.com")
		require.Equal(t, ExitOK, code, errOut)
		require.Contains(t, out, schemas.TypeMaintenanceEnded)
		require.Eventually(t, func() bool {
			code, _, errOut = drover(t, info.NATSURL, "maintenance", "end", "worker-1.example.com")
			return code == ExitUsage && strings.Contains(errOut, "no maintenance that was not ended")
		}, 20*time.Second, 50*time.Millisecond)
	})

	t.Run("dead letters can be listed and replayed", func(t *testing.T) {
		subject, err := schemas.RequestSubject(schemas.KindNodeFenced, "node-9")
		require.NoError(t, err)
		_, err = js.Publish(context.Background(), subject, []byte("not an event"))
		require.NoError(t, err)
		var first []map[string]any
		require.Eventually(t, func() bool {
			code, out, _ := drover(t, info.NATSURL, "dlq", "list", "-o", "json")
			return code == ExitOK && json.Unmarshal([]byte(out), &first) == nil && len(first) == 1
		}, 20*time.Second, 50*time.Millisecond)
		require.Contains(t, first[0]["reason"], "not a valid CloudEvent")
		require.Equal(t, subject, first[0]["subject"])
		seq := first[0]["seq"].(float64)

		code, out, errOut := drover(t, info.NATSURL, "dlq", "replay", strings.TrimSuffix(jsonNum(seq), ".0"))
		require.Equal(t, ExitOK, code, errOut)
		require.Contains(t, out, "replayed dead letter")
		// Still poison: it comes back as a new dead letter, the old one is gone.
		require.Eventually(t, func() bool {
			var again []map[string]any
			code, out, _ := drover(t, info.NATSURL, "dlq", "list", "-o", "json")
			return code == ExitOK && json.Unmarshal([]byte(out), &again) == nil && len(again) == 1 && again[0]["seq"].(float64) > seq
		}, 20*time.Second, 50*time.Millisecond)
	})

	t.Run("metrics", func(t *testing.T) {
		resp, err := http.Get("http://" + info.HTTPAddr + "/metrics")
		require.NoError(t, err)
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		require.Contains(t, string(b), `drover_messages_total{result="acked",workflow="maintenance"}`)
		require.Contains(t, string(b), `drover_dead_letters_total{cause="invalid",workflow="recovery"}`)
	})

	t.Run("status --watch prints new status events", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		pr, pw := io.Pipe()
		done := make(chan int, 1)
		go func() {
			done <- run(ctx, []string{"status", "--watch", "--nats-url", info.NATSURL}, pw, io.Discard, env(nil))
			_ = pw.Close()
		}()
		lines := make(chan string, 100)
		go func() {
			b := make([]byte, 64*1024)
			var acc string
			for {
				n, err := pr.Read(b)
				acc += string(b[:n])
				for {
					i := strings.IndexByte(acc, '\n')
					if i < 0 {
						break
					}
					lines <- acc[:i]
					acc = acc[i+1:]
				}
				if err != nil {
					close(lines)
					return
				}
			}
		}()
		// The table of existing operations comes first; then publish.
		require.Eventually(t, func() bool {
			select {
			case l := <-lines:
				return strings.HasPrefix(l, "OPERATION")
			default:
				return false
			}
		}, 10*time.Second, 10*time.Millisecond)
		code, _, errOut := drover(t, info.NATSURL, "node", "fenced", "node-7", "--method", "ipmi")
		require.Equal(t, ExitOK, code, errOut)
		deadline := time.After(20 * time.Second)
		for found := false; !found; {
			select {
			case l := <-lines:
				found = strings.Contains(l, "recovery") && strings.Contains(l, "node-7") && strings.Contains(l, "Succeeded")
			case <-deadline:
				t.Fatal("no Succeeded status line for node-7 within 20s")
			}
		}
		cancel()
		require.Equal(t, ExitOK, <-done)
	})

	t.Run("version", func(t *testing.T) {
		code, out, _ := drover(t, info.NATSURL, "version")
		require.Equal(t, ExitOK, code)
		require.Contains(t, out, "drover ")
	})
}

func jsonNum(f float64) string { b, _ := json.Marshal(f); return string(b) }

func TestServeUnreachableKubernetes(t *testing.T) {
	// One server refuses connections, the other accepts and never answers.
	refused, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	refusedAddr := refused.Addr().String()
	require.NoError(t, refused.Close())
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer silent.Close()
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	for _, addr := range []string{refusedAddr, silent.Addr().String()} {
		t.Run(addr, func(t *testing.T) {
			kc := writeFile(t, `apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://`+addr+`", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: x}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
`)
			var out, errOut bytes.Buffer
			start := time.Now()
			code := run(context.Background(), []string{"serve", "--kubeconfig", kc, "--data-dir", t.TempDir(),
				"--nats-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"}, &out, &errOut, env(nil))
			elapsed := time.Since(start)
			require.Equal(t, ExitError, code)
			require.Contains(t, errOut.String(), "cannot reach the Kubernetes API server at https://"+addr)
			require.Less(t, elapsed, 15*time.Second, "must give up within 15s")
		})
	}
}
