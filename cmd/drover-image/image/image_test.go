package image_test

import (
	"archive/tar"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/cmd/drover-image/image"
)

// The image runs the static drover binary as a non-root user, is the same
// for the same binary, and reads back from its tarball.
func TestImage(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "drover")
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-X github.com/drover-io/drover/cmd/drover/app.Version=v9.9.9-test", "-o", bin, "github.com/drover-io/drover/cmd/drover")
	// The flags of `make build`, so that CI's build has warmed the cache.
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	out, err := build.CombinedOutput()
	require.NoError(t, err, string(out))

	o := image.Options{Binary: bin, Tag: "drover:v9.9.9-test", Version: "v9.9.9-test", Arch: "amd64"}
	tarPath := filepath.Join(dir, "image.tar")
	digest, err := image.Write(context.Background(), o, tarPath)
	require.NoError(t, err)
	again, err := image.Build(o)
	require.NoError(t, err)
	d2, err := again.Digest()
	require.NoError(t, err)
	require.Equal(t, digest, d2, "the same binary gives the same image")

	img, err := tarball.ImageFromPath(tarPath, nil)
	require.NoError(t, err)
	cf, err := img.ConfigFile()
	require.NoError(t, err)
	require.Equal(t, "65532:65532", cf.Config.User, "runs as non-root")
	require.Equal(t, []string{"/drover"}, cf.Config.Entrypoint)
	require.Equal(t, []string{"serve"}, cf.Config.Cmd)
	require.Equal(t, "linux", cf.OS)
	require.Equal(t, "v9.9.9-test", cf.Config.Labels["org.opencontainers.image.version"])

	layers, err := img.Layers()
	require.NoError(t, err)
	require.Len(t, layers, 1)
	rc, err := layers[0].Uncompressed()
	require.NoError(t, err)
	defer rc.Close()
	tr := tar.NewReader(rc)
	files := map[string]*tar.Header{}
	extracted := filepath.Join(dir, "from-image")
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
		files[h.Name] = h
		if h.Name == "drover" {
			f, err := os.OpenFile(extracted, os.O_CREATE|os.O_WRONLY, 0o755)
			require.NoError(t, err)
			_, err = io.Copy(f, tr)
			require.NoError(t, err)
			require.NoError(t, f.Close())
		}
	}
	require.Contains(t, files, "drover")
	require.Equal(t, int64(0o755), files["drover"].Mode, "executable, not writable by the user")
	require.Equal(t, 0, files["drover"].Uid, "owned by root")
	require.Contains(t, files, "etc/passwd")
	version, err := exec.Command(extracted, "version").CombinedOutput()
	require.NoError(t, err, string(version))
	require.Equal(t, "drover v9.9.9-test", strings.TrimSpace(string(version)), "the binary in the image runs")
}

// A binary that needs a dynamic loader cannot run in an image without libc.
func TestImageRefusesADynamicBinary(t *testing.T) {
	_, err := image.Build(image.Options{Binary: "/bin/ls", Tag: "x:y"})
	require.ErrorContains(t, err, "dynamically linked")
}
