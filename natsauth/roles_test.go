package natsauth_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/stretchr/testify/require"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/integration/natstest"
	"github.com/drover-io/drover/natsauth"
	"github.com/drover-io/drover/schemas"
)

// cred is one user's key pair.
type cred struct {
	kp  nkeys.KeyPair
	pub string
}

func newCred(t *testing.T) cred {
	t.Helper()
	kp, err := nkeys.CreateUser()
	require.NoError(t, err)
	pub, err := kp.PublicKey()
	require.NoError(t, err)
	return cred{kp, pub}
}

// rig is a server with drover's streams and buckets, a full-rights service
// connection and one user per role.
type rig struct {
	url   string
	svc   jetstream.JetStream
	users map[natsauth.Role]cred
}

func startRig(t *testing.T) *rig { t.Helper(); return startRigAccounts(t, true) }

// startRigAccounts starts the rig with drover's two accounts, or with every
// user in one account, permissions alone (to show what they do not stop).
func startRigAccounts(t *testing.T, accounts bool) *rig {
	t.Helper()
	r := &rig{users: map[natsauth.Role]cred{}}
	f := &natsauth.File{}
	for _, role := range natsauth.Roles() {
		c := newCred(t)
		r.users[role] = c
		f.Users = append(f.Users, natsauth.User{Name: "u-" + string(role), NKey: c.pub, Role: role})
	}
	svc := newCred(t)
	conf, err := f.ServerConfig(svc.pub)
	require.NoError(t, err)
	s := natstest.StartWith(t, func(o *server.Options) {
		if accounts {
			require.NoError(t, o.ProcessConfigString(conf))
			return
		}
		o.Nkeys = []*server.NkeyUser{{Nkey: svc.pub}}
		for _, u := range f.Users {
			g, err := natsauth.For(u.Role, u.NKey)
			require.NoError(t, err)
			o.Nkeys = append(o.Nkeys, &server.NkeyUser{Nkey: u.NKey, Permissions: g.Permissions()})
		}
	})
	r.url = s.ClientURL()
	nc := natstest.Connect(t, r.url, nats.Nkey(svc.pub, svc.kp.Sign))
	r.svc, err = jetstream.New(nc)
	require.NoError(t, err)
	_, err = consumers.Setup(context.Background(), r.svc, consumers.Config{}, schemas.Workflows()...)
	require.NoError(t, err)
	return r
}

// client is one connection of a role's user; ctx ends with the *Denied as
// its cause when the server refuses something.
type client struct {
	nc  *nats.Conn
	js  jetstream.JetStream
	ctx context.Context
}

func (r *rig) connect(t *testing.T, role natsauth.Role) *client {
	t.Helper()
	c := r.users[role]
	ctx, cancel := context.WithCancelCause(context.Background())
	t.Cleanup(func() { cancel(nil) })
	nc := natstest.Connect(t, r.url, nats.Nkey(c.pub, c.kp.Sign), nats.CustomInboxPrefix(natsauth.InboxPrefix(c.pub)),
		natsauth.OnDenied(func(d *natsauth.Denied) { cancel(d) }))
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	return &client{nc: nc, js: js, ctx: ctx}
}

// denied returns the violation the server reported, if any. A violation
// reaches the connection before the reply to a later flush, so after a
// flush LastError has it; the error handler then names the role.
func (c *client) denied() (*natsauth.Denied, bool) {
	if err := c.nc.FlushTimeout(5 * time.Second); err != nil && c.ctx.Err() == nil {
		return nil, false
	}
	if _, ok := natsauth.DeniedFrom(c.nc.LastError()); ok {
		select {
		case <-c.ctx.Done():
		case <-time.After(5 * time.Second):
		}
	}
	var d *natsauth.Denied
	return d, errors.As(context.Cause(c.ctx), &d)
}

// seed stores an operation, its progress, a node state record and a dead
// letter of the operation, as the runtime would.
func (r *rig) seed(t *testing.T, key string) {
	t.Helper()
	ctx := context.Background()
	e, err := schemas.New("test", "ev-"+key, &schemas.MaintenanceRequested{Node: "node-1", RequestID: key, Reason: "test", RequestedBy: "test", Mode: schemas.ModeLiveMigrate})
	require.NoError(t, err)
	ce, err := json.Marshal(e)
	require.NoError(t, err)
	rec, err := json.Marshal(consumers.Record{Key: key, Workflow: schemas.WorkflowMaintenance, Target: "node-1", State: consumers.StateFailed, Generation: 1, Request: ce, Created: time.Now()})
	require.NoError(t, err)
	ops, err := r.svc.KeyValue(ctx, consumers.BucketOps)
	require.NoError(t, err)
	_, err = ops.Put(ctx, key, rec)
	require.NoError(t, err)
	_, err = ops.Put(ctx, consumers.NodeStateKey("node-1"), []byte(`{"node":"node-1"}`))
	require.NoError(t, err)
	progress, err := r.svc.KeyValue(ctx, consumers.BucketProgress)
	require.NoError(t, err)
	_, err = progress.Put(ctx, key+".vm-1", []byte(`{}`))
	require.NoError(t, err)
	subject, err := schemas.RequestSubject(schemas.KindMaintenanceRequested, "node-1")
	require.NoError(t, err)
	_, err = r.svc.PublishMsg(ctx, &nats.Msg{Subject: consumers.DLQSubjectPrefix + schemas.WorkflowMaintenance, Data: ce, Header: nats.Header{
		consumers.HeaderDLQSubject: {subject}, consumers.HeaderDLQOperation: {key}, consumers.HeaderDLQWorkflow: {schemas.WorkflowMaintenance},
	}})
	require.NoError(t, err)
}

func publishKind(kind string) func(*client) error {
	return func(c *client) error {
		subject, err := schemas.RequestSubject(kind, "node-1")
		if err != nil {
			return err
		}
		_, err = c.js.Publish(c.ctx, subject, []byte("{}"))
		return err
	}
}

func corePublish(subject string) func(*client) error {
	return func(c *client) error { return c.nc.Publish(subject, []byte("x")) }
}

func subscribe(subject string) func(*client) error {
	return func(c *client) error { _, err := c.nc.SubscribeSync(subject); return err }
}

func kvPut(bucket, key string) func(*client) error {
	return func(c *client) error {
		kv, err := c.js.KeyValue(c.ctx, bucket)
		if err != nil {
			return err
		}
		_, err = kv.Put(c.ctx, key, []byte(`{}`))
		return err
	}
}

// TestRolePermissions runs what each role may or may not do against a real
// server: every request kind, reading operations, status and dead letters,
// repairs, and what no client role may do (consumers, other users' inboxes,
// the service's own subjects).
func TestRolePermissions(t *testing.T) {
	r := startRig(t)
	r.seed(t, "maintenance.node-1.seeded")
	const (
		drover   = natsauth.RoleDrover
		operator = natsauth.RoleOperator
		chatbot  = natsauth.RoleChatbot
		fencer   = natsauth.RoleFencer
		observer = natsauth.RoleObserver
	)
	type action struct {
		name    string
		allowed []natsauth.Role
		do      func(*client) error
	}
	actions := []action{
		{"publish node.fenced", []natsauth.Role{drover, operator, fencer}, publishKind(schemas.KindNodeFenced)},
		{"publish node.notready", []natsauth.Role{drover, operator}, publishKind(schemas.KindNodeNotReady)},
		{"publish node.ready", []natsauth.Role{drover, operator}, publishKind(schemas.KindNodeReady)},
		{"publish maintenance.requested", []natsauth.Role{drover, operator, chatbot}, publishKind(schemas.KindMaintenanceRequested)},
		{"publish maintenance.ended", []natsauth.Role{drover, operator, chatbot}, publishKind(schemas.KindMaintenanceEnded)},
		{"publish vm.migrate.requested", []natsauth.Role{drover, operator, chatbot}, publishKind(schemas.KindVMMigrateRequested)},
		{"publish vm.migrate.cancelled", []natsauth.Role{drover, operator, chatbot}, publishKind(schemas.KindVMMigrateCancelled)},
		{"pause recovery (issue 9)", []natsauth.Role{drover, operator}, corePublish("drover.ctl.recovery.pause")},
		{"list and read operations", []natsauth.Role{drover, operator, chatbot, observer}, func(c *client) error {
			ops, err := consumers.OpenOpStore(c.ctx, c.js)
			if err != nil {
				return err
			}
			recs, err := ops.List(c.ctx, ">")
			if err == nil && len(recs) == 0 {
				return errors.New("no operations listed")
			}
			return err
		}},
		{"read status", []natsauth.Role{drover, operator, chatbot, observer}, subscribe("drover.status.maintenance.node-1")},
		{"read recovery status", []natsauth.Role{drover, operator, chatbot, fencer, observer}, subscribe(schemas.StatusFilter(schemas.WorkflowRecovery))},
		{"list dead letters", []natsauth.Role{drover, operator}, func(c *client) error {
			_, err := consumers.ListDeadLetters(c.ctx, c.js, 0)
			return err
		}},
		{"retry an operation", []natsauth.Role{drover, operator}, func(c *client) error {
			_, err := consumers.RetryOperation(c.ctx, c.js, "maintenance.node-1.retry")
			return err
		}},
		{"replay a dead letter", []natsauth.Role{drover, operator}, func(c *client) error {
			dls, err := consumers.ListDeadLetters(c.ctx, c.js, 0)
			if err != nil {
				return err
			}
			for _, d := range dls {
				if d.Operation == "maintenance.node-1.retry" {
					_, _, err = consumers.ReplayDeadLetter(c.ctx, c.js, d.Seq)
					return err
				}
			}
			return fmt.Errorf("no dead letter to replay in %d", len(dls))
		}},
		{"write an operation record", []natsauth.Role{drover, operator}, kvPut(consumers.BucketOps, "maintenance.node-1.forged")},
		{"write a node state record", []natsauth.Role{drover}, kvPut(consumers.BucketOps, consumers.NodeStateKey("node-1"))},
		{"take a lease", []natsauth.Role{drover}, kvPut(consumers.BucketLocks, consumers.NodeLock("node-1"))},
		{"publish status", []natsauth.Role{drover}, corePublish("drover.status.recovery.node-1")},
		{"publish a dead letter", []natsauth.Role{drover}, corePublish(consumers.DLQSubjectPrefix + "recovery")},
		{"create a consumer on the status stream", []natsauth.Role{drover}, func(c *client) error {
			_, err := c.js.OrderedConsumer(c.ctx, consumers.StreamStatus, jetstream.OrderedConsumerConfig{})
			return err
		}},
		{"create a consumer on the operations bucket", []natsauth.Role{drover}, func(c *client) error {
			kv, err := c.js.KeyValue(c.ctx, consumers.BucketOps)
			if err != nil {
				return err
			}
			_, err = kv.ListKeys(c.ctx)
			return err
		}},
		{"read another user's replies", []natsauth.Role{drover}, subscribe("_INBOX.>")},
		{"read everything", []natsauth.Role{drover}, subscribe(">")},
	}
	for _, role := range natsauth.Roles() {
		t.Run(string(role), func(t *testing.T) {
			for _, a := range actions {
				if a.name == "retry an operation" || a.name == "replay a dead letter" {
					r.seed(t, "maintenance.node-1.retry")
				}
				c := r.connect(t, role)
				err := a.do(c)
				d, refused := c.denied()
				if slices.Contains(a.allowed, role) {
					require.NoError(t, err, "%s may %s", role, a.name)
					require.False(t, refused, "%s may %s, refused: %v", role, a.name, d)
					continue
				}
				require.True(t, refused, "%s must not %s (error: %v)", role, a.name, err)
				require.Equal(t, role, d.Role, "the violation names the role")
				require.Equal(t, r.users[role].pub, d.User)
				require.Contains(t, d.Error(), d.Subject)
			}
		})
	}
}

// TestNoWildcardForClients: no client role may publish or subscribe to
// everything, nor create JetStream consumers (whose deliver subject could be
// any subject, see TestConsumerDeliversAnywhere).
func TestNoWildcardForClients(t *testing.T) {
	for _, role := range natsauth.Roles() {
		if role == natsauth.RoleDrover {
			continue
		}
		g, err := natsauth.For(role, "UXXX")
		require.NoError(t, err)
		for _, s := range slices.Concat(g.Publish, g.Subscribe) {
			require.NotEqual(t, ">", s, role)
			require.NotContains(t, s, "$JS.API.CONSUMER", role)
			require.NotContains(t, []string{"$JS.API.>", "_INBOX.>", "$KV.>", "drover.>"}, s, role)
		}
	}
	_, err := natsauth.For("admin", "UXXX")
	require.ErrorContains(t, err, `unknown role "admin"`)
}

// TestConsumerDeliversAnywhere shows why readers get no consumers: a push
// consumer created with another stream's subject as its deliver subject puts
// messages on that stream as soon as anything subscribes to the subject,
// whatever the creator may publish.
func TestConsumerDeliversAnywhere(t *testing.T) {
	s := natstest.Start(t)
	nc := natstest.Connect(t, s.ClientURL())
	js, err := jetstream.New(nc)
	require.NoError(t, err)
	ctx := context.Background()
	_, err = consumers.Setup(ctx, js, consumers.Config{})
	require.NoError(t, err)
	_, err = js.Publish(ctx, "drover.status.recovery.node-1", []byte("a status event"))
	require.NoError(t, err)
	fenced, err := schemas.RequestSubject(schemas.KindNodeFenced, "node-1")
	require.NoError(t, err)
	_, err = nc.SubscribeSync(fenced) // anyone listening on the subject
	require.NoError(t, err)
	_, err = js.CreateOrUpdateConsumer(ctx, consumers.StreamStatus, jetstream.ConsumerConfig{Name: "reader", DeliverSubject: fenced})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		st, err := js.Stream(ctx, consumers.StreamRequests)
		return err == nil && st.CachedInfo().State.Msgs == 1
	}, 5*time.Second, 20*time.Millisecond, "the status event reaches the request stream on %s", fenced)
}

// TestRepliesStayInTheClientAccount: the server does not check a reply
// subject against permissions, so in one account any user allowed a single
// request (a fencer asking who it is) has the answer stored wherever it
// likes: over a lease, an operation record, on a request subject. With
// drover's two accounts the answer goes back to the clients account, where
// no stream listens.
func TestRepliesStayInTheClientAccount(t *testing.T) {
	for _, accounts := range []bool{false, true} {
		name := map[bool]string{false: "one account: replies land", true: "two accounts: replies stay with the client"}[accounts]
		t.Run(name, func(t *testing.T) {
			r := startRigAccounts(t, accounts)
			ctx := context.Background()
			key := "maintenance.node-1.seeded"
			r.seed(t, key)
			ops, err := r.svc.KeyValue(ctx, consumers.BucketOps)
			require.NoError(t, err)
			locks, err := r.svc.KeyValue(ctx, consumers.BucketLocks)
			require.NoError(t, err)
			rec, err := ops.Get(ctx, key)
			require.NoError(t, err)
			requests := func() uint64 {
				s, err := r.svc.Stream(ctx, consumers.StreamRequests)
				require.NoError(t, err)
				return s.CachedInfo().State.LastSeq
			}
			before := requests()
			fenced, err := schemas.RequestSubject(schemas.KindNodeFenced, "node-4")
			require.NoError(t, err)
			c := r.connect(t, natsauth.RoleFencer)
			for _, reply := range []string{"$KV." + consumers.BucketLocks + "." + consumers.NodeLock("node-1"), "$KV." + consumers.BucketOps + "." + key, fenced} {
				require.NoError(t, c.nc.PublishMsg(&nats.Msg{Subject: natsauth.UserInfoSubject, Reply: reply}))
			}
			// Barrier: the server answers in order, and each stream stores
			// in order, so once these are stored the answers above are too.
			_, err = c.nc.Request(natsauth.UserInfoSubject, nil, 5*time.Second)
			require.NoError(t, err)
			_, err = locks.Put(ctx, "barrier", []byte("b"))
			require.NoError(t, err)
			_, err = ops.Put(ctx, "barrier", []byte("b"))
			require.NoError(t, err)
			_, err = r.svc.Publish(ctx, "drover.req.node-ready.barrier", nil)
			require.NoError(t, err)
			_, d := c.denied()
			require.False(t, d, "asking who one is is allowed")

			_, lockErr := locks.Get(ctx, consumers.NodeLock("node-1"))
			now, err := ops.Get(ctx, key)
			require.NoError(t, err)
			stored := requests() - before - 1 // minus the barrier
			if !accounts {
				require.NoError(t, lockErr, "a lease was written by a fencer")
				require.NotEqual(t, rec.Revision(), now.Revision(), "an operation record was overwritten by a fencer")
				require.EqualValues(t, 1, stored, "a message reached %s", fenced)
				return
			}
			require.ErrorIs(t, lockErr, jetstream.ErrKeyNotFound, "no lease appears")
			require.Equal(t, rec.Revision(), now.Revision(), "the operation record is untouched")
			require.Zero(t, stored, "nothing reached the request stream")
		})
	}
}
