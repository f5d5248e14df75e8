package deploy_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/drover-io/drover/integration/deploy"
	"github.com/drover-io/drover/natsauth"
)

// TestNATSClusterIsAuthenticated: the nats-cluster overlay runs NATS with drover's accounts and
// roles. The servers read nats.conf with auth/drover-auth.conf beside it (one projected volume of
// the ConfigMap and the Secret nats-auth); the real nats-server, at the version go.mod pins,
// accepts that configuration with a file `drover auth server-config` wrote, and refuses to start
// without it (no open NATS when the Secret is missing). drover authenticates with the nkey seed of
// the Secret drover-nats.
func TestNATSClusterIsAuthenticated(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	b, err := deploy.Render(ctx, "overlays/nats-cluster")
	require.NoError(t, err)
	objs, err := deploy.Objects(b)
	require.NoError(t, err)

	sts := convert[appsv1.StatefulSet](t, find(t, objs, "StatefulSet", "nats"))
	c := sts.Spec.Template.Spec.Containers[0]
	require.Equal(t, []string{"--config", "/etc/nats/nats.conf"}, c.Args)
	var mount *corev1.VolumeMount
	for i := range c.VolumeMounts {
		if c.VolumeMounts[i].MountPath == "/etc/nats" {
			mount = &c.VolumeMounts[i]
		}
	}
	require.NotNil(t, mount, "nothing mounted at /etc/nats")
	var vol *corev1.Volume
	for i := range sts.Spec.Template.Spec.Volumes {
		if sts.Spec.Template.Spec.Volumes[i].Name == mount.Name {
			vol = &sts.Spec.Template.Spec.Volumes[i]
		}
	}
	require.NotNil(t, vol)
	require.NotNil(t, vol.Projected, "nats.conf and its include must share one folder")
	var sawConfig, sawAuth bool
	for _, src := range vol.Projected.Sources {
		if src.ConfigMap != nil && src.ConfigMap.Name == "nats-config" {
			sawConfig = true
		}
		if src.Secret != nil && src.Secret.Name == "nats-auth" {
			require.Equal(t, []corev1.KeyToPath{{Key: "drover-auth.conf", Path: "auth/drover-auth.conf"}}, src.Secret.Items)
			require.True(t, src.Secret.Optional == nil || !*src.Secret.Optional, "the auth Secret must not be optional")
			sawAuth = true
		}
	}
	require.True(t, sawConfig && sawAuth, "projected volume: %+v", vol.Projected.Sources)

	cm := convert[corev1.ConfigMap](t, find(t, objs, "ConfigMap", "nats-config"))
	conf := cm.Data["nats.conf"]
	require.Contains(t, conf, "include ./auth/drover-auth.conf")

	// drover's side: the nkey from the Secret drover-nats.
	dep := convert[appsv1.Deployment](t, find(t, objs, "Deployment", "drover"))
	dc := dep.Spec.Template.Spec.Containers[0]
	var seed string
	for _, e := range dc.Env {
		if e.Name == "DROVER_NATS_NKEY" {
			seed = e.Value
		}
	}
	require.NotEmpty(t, seed, "drover has no DROVER_NATS_NKEY")
	var seedMounted bool
	for _, m := range dc.VolumeMounts {
		if filepath.Dir(seed) == m.MountPath {
			for _, v := range dep.Spec.Template.Spec.Volumes {
				if v.Name == m.Name && v.Secret != nil && v.Secret.SecretName == "drover-nats" {
					seedMounted = true
				}
			}
		}
	}
	require.True(t, seedMounted, "%s is not in a mount of the Secret drover-nats", seed)
	// The kubelet writes Secret files root-owned, group fsGroup, with defaultMode: the non-root
	// process reads the seed through its group.
	psc := dep.Spec.Template.Spec.SecurityContext
	require.NotNil(t, psc.RunAsUser)
	require.NotZero(t, *psc.RunAsUser, "drover runs as non-root")
	require.NotNil(t, psc.FSGroup, "without fsGroup the non-root process cannot read a 0440 Secret")
	require.NotNil(t, psc.RunAsGroup)
	require.Equal(t, *psc.RunAsGroup, *psc.FSGroup)
	for _, v := range dep.Spec.Template.Spec.Volumes {
		if v.Secret != nil {
			mode := int32(0o644)
			if v.Secret.DefaultMode != nil {
				mode = *v.Secret.DefaultMode
			}
			require.NotZero(t, mode&0o040, "Secret %s is not group-readable (mode %o)", v.Secret.SecretName, mode)
			require.Zero(t, mode&0o007, "Secret %s is readable by others (mode %o)", v.Secret.SecretName, mode)
		}
	}
	require.NotNil(t, find(t, objs, "NetworkPolicy", "nats"))

	// The real server with the rendered configuration: a folder laid out as the pod sees it.
	dir := t.TempDir()
	conf = strings.NewReplacer("/data", filepath.Join(dir, "data"), "/var/run/nats", dir).Replace(conf)
	require.NoError(t, os.WriteFile(filepath.Join(dir, "nats.conf"), []byte(conf), 0o600))
	check := func() ([]byte, error) {
		cmd := exec.CommandContext(ctx, natsServer(t), "-t", "-c", filepath.Join(dir, "nats.conf"))
		cmd.Env = append(os.Environ(), "SERVER_NAME=nats-0")
		return cmd.CombinedOutput()
	}
	out, err := check()
	require.Error(t, err, "nats-server accepted the configuration without its auth file: %s", out)
	require.Contains(t, string(out), "drover-auth.conf")

	users := &natsauth.File{}
	for _, u := range []struct {
		name string
		role natsauth.Role
	}{{"drover", natsauth.RoleDrover}, {"chatbot", natsauth.RoleChatbot}} {
		user, _, err := natsauth.NewUser(u.name, u.role)
		require.NoError(t, err)
		users.Users = append(users.Users, user)
	}
	ub, err := yaml.Marshal(users)
	require.NoError(t, err)
	usersFile := filepath.Join(t.TempDir(), "users.yaml")
	require.NoError(t, os.WriteFile(usersFile, ub, 0o600))
	loaded, err := natsauth.LoadFile(usersFile)
	require.NoError(t, err)
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "auth"), 0o700))
	f, err := os.Create(filepath.Join(dir, "auth", "drover-auth.conf"))
	require.NoError(t, err)
	require.NoError(t, natsauth.WriteServerConfig(f, loaded, usersFile))
	require.NoError(t, f.Close())
	out, err = check()
	require.NoError(t, err, "nats-server refused the rendered configuration: %s", out)
}

// natsServer is the nats-server that `make nats-server` builds from the module go.mod pins.
func natsServer(t *testing.T) string {
	t.Helper()
	dir, err := deploy.Dir("base")
	require.NoError(t, err)
	bin := filepath.Join(dir, "..", "..", ".cache", "bin", "nats-server")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("nats-server missing (%v): `make nats-server` builds it from the pinned module", err)
	}
	return bin
}
