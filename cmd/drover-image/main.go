// Command drover-image builds drover's OCI image without a Docker daemon:
// one layer with the static drover binary and a non-root user, written as a
// tarball that `docker load`, `podman load`, `crane push` and kind accept.
// It is what the Dockerfile describes, for machines that have no daemon.
//
//	go run ./cmd/drover-image --binary bin/drover-linux-amd64 --tag drover:v1 --out bin/drover-image.tar
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/drover-io/drover/cmd/drover-image/image"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var o image.Options
	flag.StringVar(&o.Binary, "binary", "", "static linux drover binary to put in the image (required)")
	flag.StringVar(&o.Tag, "tag", "drover:dev", "image reference written into the tarball")
	flag.StringVar(&o.Version, "version", "dev", "version label")
	flag.StringVar(&o.Arch, "arch", "amd64", "image architecture")
	out := flag.String("out", "drover-image.tar", "tarball to write")
	flag.Parse()
	if o.Binary == "" {
		fmt.Fprintln(os.Stderr, "drover-image: --binary is required")
		os.Exit(2)
	}
	digest, err := image.Write(ctx, o, *out)
	if err != nil {
		fmt.Fprintln(os.Stderr, "drover-image:", err)
		os.Exit(1)
	}
	fmt.Printf("wrote %s (%s, %s)\n", *out, o.Tag, digest)
}
