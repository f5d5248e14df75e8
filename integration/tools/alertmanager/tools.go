//go:build tools

package alertmanager

import _ "github.com/prometheus/alertmanager/cmd/alertmanager"
