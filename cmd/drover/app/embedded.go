package app

import (
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/drover-io/drover/natsauth"
)

// startEmbedded runs a JetStream server inside the process, storing under
// dataDir and listening for clients on listen (host:port; port 0 picks one).
// With auth it accepts only auth's users, each with its role's permissions
// in drover's two accounts (natsauth.ServerConfig), and returns the options
// of the service's own, unrestricted, in-process connection; without auth it
// accepts anyone and so refuses to listen beyond loopback.
func startEmbedded(listen, dataDir string, auth *natsauth.File) (*server.Server, []nats.Option, error) {
	host, portStr, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, nil, fmt.Errorf("nats-listen %q: %w", listen, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return nil, nil, fmt.Errorf("nats-listen %q: bad port", listen)
	}
	if port == 0 {
		port = server.RANDOM_PORT
	}
	dir, err := filepath.Abs(dataDir)
	if err != nil {
		return nil, nil, err
	}
	opts := &server.Options{}
	var connect []nats.Option
	if auth == nil {
		if err := checkUnauthenticatedListen(listen); err != nil {
			return nil, nil, err
		}
	} else {
		// The service signs in with a key pair made now and kept in memory
		// only; its user, in the service account, has no permission limits.
		kp, err := nkeys.CreateUser()
		if err != nil {
			return nil, nil, fmt.Errorf("service nkey: %w", err)
		}
		pub, err := kp.PublicKey()
		if err != nil {
			return nil, nil, fmt.Errorf("service nkey: %w", err)
		}
		conf, err := auth.ServerConfig(pub)
		if err != nil {
			return nil, nil, err
		}
		if err := opts.ProcessConfigString(conf); err != nil {
			return nil, nil, fmt.Errorf("embedded NATS accounts: %w", err)
		}
		connect = append(connect, nats.Nkey(pub, kp.Sign))
	}
	opts.ServerName = "drover-embedded"
	opts.Host, opts.Port = host, port
	opts.JetStream, opts.StoreDir = true, filepath.Join(dir, "jetstream")
	opts.NoSigs, opts.NoLog = true, true
	// Requests are small; refuse anything that could not be an event.
	opts.MaxPayload = 1 << 20
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, nil, fmt.Errorf("embedded NATS: %w", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(15 * time.Second) {
		ns.Shutdown()
		return nil, nil, fmt.Errorf("embedded NATS did not start listening on %s within 15s (is the port in use?)", listen)
	}
	return ns, connect, nil
}

// checkUnauthenticatedListen refuses a listen address beyond loopback for a
// server that accepts anyone.
func checkUnauthenticatedListen(listen string) error {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return fmt.Errorf("nats-listen %q: %w", listen, err)
	}
	if ip := net.ParseIP(host); host == "localhost" || ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("refusing to listen on %s without --nats-auth-file: anyone who reaches the port could publish any request, node.fenced included; "+
		"listen on 127.0.0.1, or create users with `drover auth new-user` and pass --nats-auth-file", listen)
}
