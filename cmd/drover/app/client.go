package app

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/pflag"

	"github.com/drover-io/drover/natsauth"
)

// ClientOptions say how to reach and authenticate to NATS.
type ClientOptions struct {
	URL   string `json:"url,omitempty"`
	Creds string `json:"creds,omitempty"`
	NKey  string `json:"nkey,omitempty"`
	CA    string `json:"ca,omitempty"`
	Cert  string `json:"cert,omitempty"`
	Key   string `json:"key,omitempty"`
	// denied, if set, hears of the first subject the server refuses.
	denied func(*natsauth.Denied)
}

// DefaultNATSURL is where the client commands look for drover's NATS.
const DefaultNATSURL = "nats://127.0.0.1:4222"

func (c *ClientOptions) register(fs *pflag.FlagSet, getenv func(string) string) {
	def := getenv("DROVER_NATS_URL")
	if def == "" {
		def = DefaultNATSURL
	}
	fs.StringVar(&c.URL, "nats-url", def, "NATS server URL(s) (env DROVER_NATS_URL)")
	fs.StringVar(&c.Creds, "nats-creds", getenv("DROVER_NATS_CREDS"), "NATS credentials file (env DROVER_NATS_CREDS)")
	fs.StringVar(&c.NKey, "nats-nkey", getenv("DROVER_NATS_NKEY"), "NATS nkey seed file, from drover auth new-user (env DROVER_NATS_NKEY)")
	fs.StringVar(&c.CA, "nats-ca", getenv("DROVER_NATS_CA"), "CA file to verify the NATS server (env DROVER_NATS_CA)")
	fs.StringVar(&c.Cert, "nats-cert", getenv("DROVER_NATS_CERT"), "client certificate file for NATS TLS (env DROVER_NATS_CERT)")
	fs.StringVar(&c.Key, "nats-key", getenv("DROVER_NATS_KEY"), "client key file for NATS TLS (env DROVER_NATS_KEY)")
}

func (c ClientOptions) natsOptions(name string) ([]nats.Option, error) {
	opts := []nats.Option{nats.Name(name), nats.Timeout(5 * time.Second)}
	if c.Creds != "" {
		opts = append(opts, nats.UserCredentials(c.Creds))
	}
	if c.NKey != "" {
		o, err := natsauth.SeedOptions(c.NKey)
		if err != nil {
			return nil, err
		}
		opts = append(opts, o...)
	}
	if c.denied != nil {
		opts = append(opts, natsauth.OnDenied(c.denied))
	}
	if c.CA != "" {
		opts = append(opts, nats.RootCAs(c.CA))
	}
	if c.Cert != "" || c.Key != "" {
		if c.Cert == "" || c.Key == "" {
			return nil, fmt.Errorf("NATS TLS needs both --nats-cert and --nats-key")
		}
		opts = append(opts, nats.ClientCert(c.Cert, c.Key))
	}
	return opts, nil
}

// connect dials NATS for a short-lived client command.
func (c ClientOptions) connect(ctx context.Context) (*nats.Conn, jetstream.JetStream, error) {
	opts, err := c.natsOptions("drover-cli")
	if err != nil {
		return nil, nil, err
	}
	nc, err := nats.Connect(c.URL, opts...)
	if errors.Is(err, nats.ErrAuthorization) {
		return nil, nil, fmt.Errorf("NATS at %s refused these credentials (%w): pass --nats-nkey with the seed of a user in the server's auth file (drover auth new-user)", c.URL, err)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("connect to NATS at %s (is `drover serve` running?): %w", c.URL, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	return nc, js, nil
}
