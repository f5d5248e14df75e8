//go:build tools

package producers

// The producers still to be written use these modules (the Git poller).
// Importing them under the "tools" build tag keeps their pinned versions
// (shared/DEPENDENCIES.md) in go.mod without compiling them into drover
// until then.
import (
	_ "github.com/go-git/go-git/v5"
)
