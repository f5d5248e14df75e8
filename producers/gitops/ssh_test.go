package gitops_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/knownhosts"

	"github.com/drover-io/drover/integration/gitrepo"
	"github.com/drover-io/drover/producers/gitops"
)

// sshGitServer serves git-upload-pack over a real SSH server (as GitHub, GitLab and Gitea do for
// ssh:// URLs): one authorized client key, the repository root under root.
type sshGitServer struct {
	addr    string
	hostKey ssh.PublicKey
}

func startSSHGitServer(t *testing.T, root string, authorized ssh.PublicKey) *sshGitServer {
	t.Helper()
	_, hostPriv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	signer, err := ssh.NewSignerFromKey(hostPriv)
	require.NoError(t, err)
	cfg := &ssh.ServerConfig{PublicKeyCallback: func(_ ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
		if string(key.Marshal()) == string(authorized.Marshal()) {
			return nil, nil
		}
		return nil, errors.New("key not authorized")
	}}
	cfg.AddHostKey(signer)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); serveSSHGit(c, cfg, root) }()
		}
	}()
	return &sshGitServer{addr: ln.Addr().String(), hostKey: signer.PublicKey()}
}

// serveSSHGit runs `git-upload-pack <repo>` for an exec request on one connection.
func serveSSHGit(c net.Conn, cfg *ssh.ServerConfig, root string) {
	defer c.Close()
	_, chans, reqs, err := ssh.NewServerConn(c, cfg)
	if err != nil {
		return
	}
	go ssh.DiscardRequests(reqs)
	for nc := range chans {
		if nc.ChannelType() != "session" {
			_ = nc.Reject(ssh.UnknownChannelType, "session only")
			continue
		}
		ch, in, err := nc.Accept()
		if err != nil {
			return
		}
		go func() {
			defer ch.Close()
			for req := range in {
				if req.Type != "exec" || len(req.Payload) < 4 {
					_ = req.Reply(false, nil)
					continue
				}
				n := binary.BigEndian.Uint32(req.Payload)
				fields := strings.Fields(string(req.Payload[4 : 4+n]))
				if len(fields) != 2 || fields[0] != "git-upload-pack" {
					_ = req.Reply(false, nil)
					continue
				}
				_ = req.Reply(true, nil)
				repo := filepath.Join(root, filepath.Base(strings.Trim(fields[1], "'")))
				cmd := exec.Command("git-upload-pack", repo)
				cmd.Stdin, cmd.Stdout, cmd.Stderr = ch, ch, ch.Stderr()
				status := uint32(0)
				if err := cmd.Run(); err != nil {
					status = 1
				}
				_, _ = ch.SendRequest("exit-status", false, binary.BigEndian.AppendUint32(nil, status))
				return
			}
		}()
	}
}

// TestSSHWithKey: the poller fetches over ssh:// with its private key from a real SSH server
// running git-upload-pack, checking the server against --git-known-hosts. A host key that is
// not the known one is refused (and nothing is published); the right one publishes the request.
func TestSSHWithKey(t *testing.T) {
	e := newEnv(t)
	_, err := exec.LookPath("git-upload-pack")
	require.NoError(t, err, "git (the machine image has it) serves the repository over SSH")
	dir := t.TempDir()
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	block, err := ssh.MarshalPrivateKey(priv, "drover")
	require.NoError(t, err)
	keyFile := filepath.Join(dir, "id_ed25519")
	require.NoError(t, os.WriteFile(keyFile, pem.EncodeToMemory(block), 0o600))
	clientKey, err := ssh.NewPublicKey(pub)
	require.NoError(t, err)
	srv := startSSHGitServer(t, filepath.Dir(e.remote.Dir), clientKey)
	url := "ssh://git@" + srv.addr + "/" + filepath.Base(e.remote.Dir)

	file := gitrepo.Request("b", "node-2", "psu", "")
	e.push(map[string]string{"maintenance/b.yaml": file})

	// known_hosts naming another key for this server: refused.
	_, otherPriv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	other, err := ssh.NewSignerFromKey(otherPriv)
	require.NoError(t, err)
	host := knownhosts.Normalize(srv.addr)
	wrongHosts := filepath.Join(dir, "known_hosts_wrong")
	require.NoError(t, os.WriteFile(wrongHosts, []byte(knownhosts.Line([]string{host}, other.PublicKey())+"\n"), 0o600))
	p := e.poller(func(c *gitops.Config) { c.URL, c.SSHKeyFile, c.KnownHostsFile = url, keyFile, wrongHosts })
	err = p.Poll(t.Context())
	require.Error(t, err)
	require.Contains(t, err.Error(), "key mismatch")
	require.Empty(t, e.published())

	hosts := filepath.Join(dir, "known_hosts")
	require.NoError(t, os.WriteFile(hosts, []byte(knownhosts.Line([]string{host}, srv.hostKey)+"\n"), 0o600))
	p = e.poller(func(c *gitops.Config) { c.URL, c.SSHKeyFile, c.KnownHostsFile = url, keyFile, hosts })
	e.poll(p)
	require.Equal(t, []string{"requested node-2 " + requestID(t, file)}, e.published())
}
