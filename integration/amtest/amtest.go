// Package amtest runs the real Alertmanager (v0.28.1, built by `make
// alertmanager` into the test binaries folder) for the integration tests
// and the demo, and fires alerts through its API as Prometheus does.
package amtest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/drover-io/drover/integration/cluster"
)

// Binary is the path of the Alertmanager binary; if it is missing the
// error says how to build it.
func Binary() (string, error) {
	dir, err := cluster.ResolveBinDir("")
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, "alertmanager")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("the Alertmanager binary is missing (%v): run `make alertmanager`", err)
	}
	return p, nil
}

// Server is a running Alertmanager.
type Server struct {
	URL string
	// Log is the file Alertmanager logs to.
	Log  string
	stop func()
}

// Stop stops it and waits for it to exit.
func (s *Server) Stop() { s.stop() }

// Start runs Alertmanager with config (alertmanager.yml) in dir, on a free
// loopback port, without clustering, and waits until it is ready (30 s at
// most). It stops when ctx ends or Stop is called.
func Start(ctx context.Context, dir, config string) (*Server, error) {
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	cfg := filepath.Join(dir, "alertmanager.yml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := l.Addr().String()
	_ = l.Close()
	logf, err := os.Create(filepath.Join(dir, "alertmanager.log"))
	if err != nil {
		return nil, err
	}
	actx, cancel := context.WithCancel(ctx)
	cmd := exec.CommandContext(actx, bin, "--config.file="+cfg, "--storage.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr, "--cluster.listen-address=", "--log.level=debug")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		cancel()
		_ = logf.Close()
		return nil, fmt.Errorf("start alertmanager: %w", err)
	}
	s := &Server{URL: "http://" + addr, Log: logf.Name(), stop: func() { cancel(); _ = cmd.Wait(); _ = logf.Close() }}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(s.URL + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return s, nil
			}
		}
		if time.Now().After(deadline) {
			s.Stop()
			return nil, fmt.Errorf("alertmanager not ready within 30s (log %s): %v", s.Log, err)
		}
		select {
		case <-ctx.Done():
			s.Stop()
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// PostAlert fires an alert with these labels, starting now, through
// Alertmanager's v2 API.
func (s *Server) PostAlert(ctx context.Context, labels map[string]string) error {
	body, err := json.Marshal([]map[string]any{{"labels": labels, "startsAt": time.Now().UTC().Format(time.RFC3339Nano)}})
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.URL+"/api/v2/alerts", bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("post alert to %s: %s", s.URL, resp.Status)
	}
	return nil
}
