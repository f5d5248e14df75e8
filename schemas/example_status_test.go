package schemas_test

import (
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/schemas"
)

// lineWriter hands every Write to the test as one string: the example's callback runs on the NATS
// client's goroutine.
type lineWriter chan string

func (w lineWriter) Write(p []byte) (int, error) {
	w <- string(p)
	return len(p), nil
}

// startNATS runs a real in-process nats-server (core NATS is all the example needs; status events
// are plain publishes that DROVER_STATUS also stores) and returns its client URL.
func startNATS(t *testing.T) string {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true})
	require.NoError(t, err)
	go s.Start()
	t.Cleanup(s.Shutdown)
	require.True(t, s.ReadyForConnections(10*time.Second), "nats-server not ready")
	return s.ClientURL()
}

// TestExampleFollowStatus runs the README's bot example ("For bot authors: the event contract")
// against a real nats-server: a status published as drover's consumers publish it
// (schemas.NewStatusMsg, binary mode) and one a plain client sends in structured mode both reach
// the callback decoded, and a message that is not a CloudEvent is reported, not dropped.
func TestExampleFollowStatus(t *testing.T) {
	url := startNATS(t)

	// README:begin
	follow := func(url string, out io.Writer) (*nats.Conn, error) {
		nc, err := nats.Connect(url) // with --nats-auth-file: also the option nats.NkeyOptionFromSeed(seedFile) returns
		if err != nil {
			return nil, err
		}
		_, err = nc.Subscribe(schemas.StatusSubjects, func(m *nats.Msg) { // "drover.status.>"
			e, err := schemas.FromMsg(m) // ce- headers (binary) or application/cloudevents+json
			if err != nil {
				fmt.Fprintln(out, "skipped:", err)
				return
			}
			p, _ := schemas.Decode(e) // FromMsg checked it against its JSON Schema and subject
			if st, ok := p.(*schemas.Status); ok {
				fmt.Fprintf(out, "%s %s %s %s: %s\n", st.Workflow, st.Target(), st.Operation, st.Phase, st.Message)
			}
		})
		return nc, err
	}
	// README:end

	lines := make(lineWriter, 16)
	nc, err := follow(url, lines)
	require.NoError(t, err)
	t.Cleanup(nc.Close)
	require.NoError(t, nc.Flush(), "the subscription is registered with the server before anything is published")

	pub, err := nats.Connect(url)
	require.NoError(t, err)
	t.Cleanup(pub.Close)
	next := func(what string) string {
		t.Helper()
		select {
		case l := <-lines:
			return l
		case <-time.After(10 * time.Second):
			t.Fatalf("the example printed nothing for %s within 10s", what)
			return ""
		}
	}

	// Binary mode, as drover's runtime publishes it.
	st := &schemas.Status{
		Operation: "maintenance.worker-1_example_com.CHG-1234", Workflow: schemas.WorkflowMaintenance,
		Node: "worker-1.example.com", Phase: schemas.PhaseRunning, Message: "2/3 VMs moved",
		VMs:     []schemas.VMProgress{{Namespace: "prod", Name: "db-0", Phase: "Migrated", Node: "worker-2"}},
		Summary: &schemas.Summary{Total: 3, Phases: map[string]int{"Migrated": 2, "Migrating": 1}},
	}
	m, err := schemas.NewStatusMsg("drover/test", "status-1", st)
	require.NoError(t, err)
	require.Equal(t, "drover.status.maintenance.worker-1_example_com", m.Subject, "the target is one encoded token")
	require.NoError(t, pub.PublishMsg(m))
	require.Equal(t, "maintenance worker-1.example.com maintenance.worker-1_example_com.CHG-1234 Running: 2/3 VMs moved\n", next("a binary-mode status"))

	// Structured mode, from a client that knows nothing of ce- headers.
	structured := `{"specversion":"1.0","type":"io.drover.status.v1","source":"x","id":"s2","datacontenttype":"application/json",` +
		`"subject":"prod/db-0","data":{"operation":"migration.prod.db-0.r1","workflow":"migration","vm":"prod/db-0","phase":"Succeeded","message":"migrated to worker-2"}}`
	require.NoError(t, pub.PublishMsg(&nats.Msg{Subject: "drover.status.migration.prod/db-0",
		Header: nats.Header{"Content-Type": {"application/cloudevents+json"}}, Data: []byte(structured)}))
	require.Equal(t, "migration prod/db-0 migration.prod.db-0.r1 Succeeded: migrated to worker-2\n", next("a structured-mode status"))

	// Not a CloudEvent: reported with the reason.
	require.NoError(t, pub.PublishMsg(&nats.Msg{Subject: "drover.status.recovery.node-1", Header: nats.Header{"ce-type": {"x"}}, Data: []byte("{}")}))
	require.Contains(t, next("a malformed message"), "skipped: ")
}

// TestReadmeHasStatusExample keeps the README's copy of the example identical to the tested code
// between the README:begin and README:end markers above (indentation removed).
func TestReadmeHasStatusExample(t *testing.T) {
	src, err := os.ReadFile("example_status_test.go")
	require.NoError(t, err)
	_, rest, ok := strings.Cut(string(src), "// README:begin\n")
	require.True(t, ok, "README:begin marker")
	body, _, ok := strings.Cut(rest, "\t// README:end\n")
	require.True(t, ok, "README:end marker")
	var snippet strings.Builder
	for _, l := range strings.Split(strings.TrimSuffix(body, "\n"), "\n") {
		snippet.WriteString(strings.TrimPrefix(l, "\t") + "\n")
	}
	require.GreaterOrEqual(t, strings.Count(snippet.String(), "\n"), 10, "the snippet is the example, not an empty block")

	readme, err := os.ReadFile("../README.md")
	require.NoError(t, err)
	require.Contains(t, string(readme), "```go\n"+snippet.String()+"```\n",
		"README.md must contain the example of %s verbatim in a go code block; copy it from there", t.Name())
}
