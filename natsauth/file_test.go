package natsauth_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/natsauth"
)

func TestParseFile(t *testing.T) {
	chatbot, _, err := natsauth.NewUser("chatbot-1", natsauth.RoleChatbot)
	require.NoError(t, err)
	fencer, _, err := natsauth.NewUser("ipmi-fencer", natsauth.RoleFencer)
	require.NoError(t, err)
	tests := []struct {
		name    string
		yaml    string
		wantErr []string
	}{
		{name: "entries as new-user prints them", yaml: "users:\n" + chatbot.Entry() + "\n" + fencer.Entry() + "\n"},
		{name: "no users: only the service", yaml: "users: []\n"},
		{name: "unknown role", yaml: "users:\n- {name: a, nkey: " + chatbot.NKey + ", role: admin}\n", wantErr: []string{`users[0]`, `unknown role "admin"`}},
		{name: "seed instead of public key", yaml: "users:\n- {name: a, nkey: SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4, role: chatbot}\n", wantErr: []string{"not a user public key"}},
		{name: "same key twice", yaml: "users:\n" + chatbot.Entry() + "\n- {name: other, nkey: " + chatbot.NKey + ", role: observer}\n", wantErr: []string{"appears twice; a key has one role"}},
		{name: "same name twice", yaml: "users:\n" + chatbot.Entry() + "\n- {name: chatbot-1, nkey: " + fencer.NKey + ", role: fencer}\n", wantErr: []string{`name "chatbot-1" appears twice`}},
		{name: "unknown field", yaml: "users:\n- {name: a, nkey: " + chatbot.NKey + ", role: chatbot, roles: [x]}\n", wantErr: []string{"roles"}},
		{name: "bad name", yaml: "users:\n- {name: 'a b', nkey: " + chatbot.NKey + ", role: chatbot}\n", wantErr: []string{`name "a b"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := natsauth.ParseFile([]byte(tt.yaml))
			if len(tt.wantErr) == 0 {
				require.NoError(t, err)
				return
			}
			require.Error(t, err)
			for _, w := range tt.wantErr {
				require.ErrorContains(t, err, w)
			}
		})
	}
}

// TestServerConfig: nats-server reads the generated configuration into the
// users, accounts and permissions of the roles.
func TestServerConfig(t *testing.T) {
	f := &natsauth.File{}
	for _, role := range natsauth.Roles() {
		u, _, err := natsauth.NewUser("u-"+string(role), role)
		require.NoError(t, err)
		f.Users = append(f.Users, u)
	}
	var b bytes.Buffer
	require.NoError(t, natsauth.WriteServerConfig(&b, f, "auth.yaml"))
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "drover-auth.conf"), b.Bytes(), 0o600))
	conf := filepath.Join(dir, "server.conf")
	require.NoError(t, os.WriteFile(conf, []byte("port: -1\njetstream: {store_dir: \""+dir+"\"}\ninclude \"drover-auth.conf\"\n"), 0o600))
	opts, err := server.ProcessConfigFile(conf)
	require.NoError(t, err, "\n%s", b.String())
	got := map[string]*server.NkeyUser{}
	for _, u := range opts.Nkeys {
		got[u.Nkey] = u
	}
	require.Len(t, got, len(f.Users))
	for _, u := range f.Users {
		n := got[u.NKey]
		require.NotNil(t, n, u.Name)
		g, err := natsauth.For(u.Role, u.NKey)
		require.NoError(t, err)
		require.Equal(t, g.Permissions(), n.Permissions, u.Name)
		want := natsauth.AccountClients
		if u.Role == natsauth.RoleDrover {
			want = natsauth.AccountService
		}
		require.Equal(t, want, n.Account.Name, u.Name)
	}

	f.Users = f.Users[1:]
	require.Equal(t, natsauth.RoleOperator, f.Users[0].Role)
	require.ErrorContains(t, natsauth.WriteServerConfig(&b, f, "auth.yaml"), "no user has role drover")
}
