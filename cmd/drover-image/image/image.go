// Package image builds drover's container image from a static binary with
// go-containerregistry: no daemon, no base image to pull. The image holds
// /drover, an /etc/passwd and /etc/group naming the non-root user 65532
// (as distroless' "nonroot"), runs as that user and starts `drover serve`.
package image

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// NonRoot is the user and group the image runs as.
const NonRoot = 65532

// Options describe the image.
type Options struct {
	Binary  string // path of a static linux binary
	Tag     string // reference recorded in the tarball
	Version string
	Arch    string
}

// Build returns the image. The binary must be a statically linked ELF
// executable: the image has no libc.
func Build(o Options) (v1.Image, error) {
	bin, err := os.ReadFile(o.Binary)
	if err != nil {
		return nil, fmt.Errorf("read binary: %w", err)
	}
	if err := checkStatic(bin); err != nil {
		return nil, fmt.Errorf("%s: %w", o.Binary, err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(rootfs(bin))), nil
	})
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", o.Arch
	if cf.Architecture == "" {
		cf.Architecture = "amd64"
	}
	cf.Config.User = fmt.Sprintf("%d:%d", NonRoot, NonRoot)
	cf.Config.Entrypoint = []string{"/drover"}
	cf.Config.Cmd = []string{"serve"}
	cf.Config.WorkingDir = "/"
	cf.Config.Env = []string{"HOME=/home/nonroot"}
	cf.Config.ExposedPorts = map[string]struct{}{"9090/tcp": {}, "4222/tcp": {}}
	cf.Config.Labels = map[string]string{
		"org.opencontainers.image.title":   "drover",
		"org.opencontainers.image.version": o.Version,
		"org.opencontainers.image.source":  "https://github.com/drover-io/drover",
	}
	return mutate.ConfigFile(img, cf)
}

// Write builds the image and writes it as a tarball; it returns the digest.
func Write(ctx context.Context, o Options, out string) (v1.Hash, error) {
	img, err := Build(o)
	if err != nil {
		return v1.Hash{}, err
	}
	ref, err := name.ParseReference(o.Tag)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("tag %q: %w", o.Tag, err)
	}
	if err := ctx.Err(); err != nil {
		return v1.Hash{}, err
	}
	if err := tarball.WriteToFile(out, ref, img); err != nil {
		return v1.Hash{}, fmt.Errorf("write %s: %w", out, err)
	}
	return img.Digest()
}

// checkStatic refuses a binary that needs a dynamic loader.
func checkStatic(bin []byte) error {
	f, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		return fmt.Errorf("not an ELF executable: %w", err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return errors.New("dynamically linked (build with CGO_ENABLED=0): the image has no libc")
		}
	}
	return nil
}

// rootfs is the layer: the binary and the non-root user, owned by root and
// not writable by the user, with a fixed time so that the same binary gives
// the same digest.
func rootfs(bin []byte) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	dir := func(name string, uid int, mode int64) {
		_ = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, Uid: uid, Gid: uid, ModTime: epoch})
	}
	file := func(name string, mode int64, data []byte) {
		_ = tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(data)), ModTime: epoch})
		_, _ = tw.Write(data)
	}
	dir("etc/", 0, 0o755)
	file("etc/passwd", 0o644, []byte(fmt.Sprintf("root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:%d:%d:nonroot:/home/nonroot:/sbin/nologin\n", NonRoot, NonRoot)))
	file("etc/group", 0o644, []byte(fmt.Sprintf("root:x:0:\nnonroot:x:%d:\n", NonRoot)))
	dir("home/", 0, 0o755)
	dir("home/nonroot/", NonRoot, 0o700)
	dir("tmp/", 0, 0o1777)
	file("drover", 0o755, bin)
	_ = tw.Close()
	return buf.Bytes()
}
