package e2e

import (
	"os"
	"testing"

	"github.com/drover-io/drover/integration/deploy"
)

// TestMain runs the tests, then reports which of deploy/base's permissions drover used as its
// ServiceAccount and which none of the tests that ran did (StartT fails a test whose drover was
// refused one).
func TestMain(m *testing.M) {
	code := m.Run()
	deploy.WriteReport("e2e")
	os.Exit(code)
}
