// Command gen writes drover's Grafana dashboard, built from Go in
// deploy/monitoring, to dashboard.json and, for Grafana's dashboard sidecar,
// to dashboard-configmap.yaml in the directory -dir (make dashboard; make
// verify fails when the committed files differ from a fresh generation).
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/drover-io/drover/deploy/monitoring"
)

func main() {
	dir := flag.String("dir", "deploy/monitoring", "directory to write dashboard.json and dashboard-configmap.yaml into")
	flag.Parse()
	if err := run(*dir); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}

func run(dir string) error {
	js, err := monitoring.DashboardJSON()
	if err != nil {
		return err
	}
	cm, err := monitoring.DashboardConfigMap(js)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, monitoring.DashboardFile), js, 0o644); err != nil {
		return fmt.Errorf("write the dashboard: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, monitoring.DashboardConfigMapFile), cm, 0o644); err != nil {
		return fmt.Errorf("write the dashboard ConfigMap: %w", err)
	}
	return nil
}
