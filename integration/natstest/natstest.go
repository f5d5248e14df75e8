// Package natstest starts real nats-server instances in-process for tests:
// a single JetStream server with its file store in a temporary directory, or
// a three-node JetStream cluster for failover tests.
package natstest

import (
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// Server is one running nats-server.
type Server struct {
	*server.Server
	Opts *server.Options
}

// URL is the client URL.
func (s *Server) URL() string { return s.ClientURL() }

// Start runs a JetStream-enabled nats-server on a random loopback port with
// its store in a fresh t.TempDir(), and shuts it down with the test.
func Start(t testing.TB) *Server {
	t.Helper()
	return StartDir(t, t.TempDir(), -1)
}

// StartDir runs a server storing under dir on port (-1: random). Restarting
// with the same dir and port brings the same streams back.
func StartDir(t testing.TB, dir string, port int) *Server {
	t.Helper()
	return StartWith(t, func(o *server.Options) { o.StoreDir, o.Port = dir, port })
}

// StartWith runs a server like Start after configure changed its options
// (users and permissions, say).
func StartWith(t testing.TB, configure func(*server.Options)) *Server {
	t.Helper()
	opts := &server.Options{
		ServerName: "drover-test",
		Host:       "127.0.0.1",
		Port:       -1,
		JetStream:  true,
		StoreDir:   t.TempDir(),
		NoLog:      true,
		NoSigs:     true,
	}
	configure(opts)
	s := run(t, opts)
	t.Cleanup(s.Shutdown)
	return s
}

func run(t testing.TB, opts *server.Options) *Server {
	t.Helper()
	ns, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("nats-server: %v", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		t.Fatalf("nats-server %s not ready within 10s", opts.ServerName)
	}
	return &Server{Server: ns, Opts: opts}
}

// Connect opens a client connection closed with the test.
func Connect(t testing.TB, url string, opts ...nats.Option) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatalf("connect %s: %v", url, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// Cluster is a three-node JetStream cluster.
type Cluster struct {
	Servers []*Server
}

// URLs is a comma-separated client URL list of every node.
func (c *Cluster) URLs() string {
	u := ""
	for i, s := range c.Servers {
		if i > 0 {
			u += ","
		}
		u += s.ClientURL()
	}
	return u
}

// StartCluster runs a three-node JetStream cluster on loopback and waits until
// it has a meta leader.
func StartCluster(t testing.TB) *Cluster {
	t.Helper()
	ports := freePorts(t, 3)
	routes := make([]string, len(ports))
	for i, p := range ports {
		routes[i] = fmt.Sprintf("nats-route://127.0.0.1:%d", p)
	}
	c := &Cluster{}
	base := t.TempDir()
	for i := range ports {
		opts := &server.Options{
			ServerName: fmt.Sprintf("drover-n%d", i+1),
			Host:       "127.0.0.1",
			Port:       -1,
			JetStream:  true,
			StoreDir:   filepath.Join(base, fmt.Sprintf("n%d", i+1)),
			NoLog:      true,
			NoSigs:     true,
			Cluster: server.ClusterOpts{
				Name: "drover-test", Host: "127.0.0.1", Port: ports[i],
			},
			Routes: server.RoutesFromStr(joinExcept(routes, i)),
		}
		s := run(t, opts)
		t.Cleanup(s.Shutdown)
		c.Servers = append(c.Servers, s)
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for _, s := range c.Servers {
			if s.JetStreamIsLeader() {
				return c
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("JetStream cluster elected no meta leader within 30s")
	return nil
}

func joinExcept(routes []string, skip int) string {
	out := ""
	for i, r := range routes {
		if i == skip {
			continue
		}
		if out != "" {
			out += ","
		}
		out += r
	}
	return out
}

func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ports []int
	var ls []net.Listener
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("free port: %v", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		_ = l.Close()
	}
	return ports
}
