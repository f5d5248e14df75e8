package nodemaintenance_test

import (
	"os"
	"testing"

	"github.com/drover-io/drover/integration/deploy"
)

// TestMain runs the tests, then reports which of deploy/base's permissions the NodeMaintenance
// watcher used as drover's ServiceAccount.
func TestMain(m *testing.M) {
	code := m.Run()
	deploy.WriteReport("nodemaintenance")
	os.Exit(code)
}
