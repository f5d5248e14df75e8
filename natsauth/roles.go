package natsauth

import (
	"fmt"
	"slices"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/schemas"
)

// Role is what a NATS user may do on drover's subjects.
type Role string

// The roles. Only RoleDrover is granted wildcards beyond drover's own
// subjects; the others get exact subjects and JetStream API calls.
const (
	// RoleDrover is the service itself: every subject it uses.
	RoleDrover Role = "drover"
	// RoleOperator publishes every request kind, replays dead letters,
	// retries operations and (issue 9) pauses and resumes recovery.
	RoleOperator Role = "operator"
	// RoleChatbot requests and ends maintenance and requests and cancels
	// migrations, and reads status and operations.
	RoleChatbot Role = "chatbot"
	// RoleFencer declares nodes fenced and reads the recovery workflow's
	// status, which is where its declarations lead.
	RoleFencer Role = "fencer"
	// RoleObserver reads status and operations and publishes nothing.
	RoleObserver Role = "observer"
)

// Roles lists every role.
func Roles() []Role { return []Role{RoleDrover, RoleOperator, RoleChatbot, RoleFencer, RoleObserver} }

// Valid reports whether r is a known role.
func (r Role) Valid() bool { return slices.Contains(Roles(), r) }

// Subjects outside the request and status streams.
const (
	// RecoveryControlSubjects is where an operator pauses and resumes
	// recovery and reads the pause and the failover capacity
	// (drover.ctl.recovery.pause, .resume, .status: requests drover serve
	// answers).
	RecoveryControlSubjects = "drover.ctl.recovery.>"
	// RoleSubjectPrefix names the role in a user's permissions: each user
	// may subscribe to drover.role.<role>, on which nothing is ever
	// published, so that a client can learn its role from the server's
	// $SYS.REQ.USER.INFO (see WhoAmI), whichever server enforces it.
	RoleSubjectPrefix = "drover.role."
	// UserInfoSubject answers a client with its own user and permissions.
	UserInfoSubject = "$SYS.REQ.USER.INFO"
	// nodeStateKeys are node state records in drover-ops; only the holder
	// of a node's lease writes them (consumers.NodeStateKey).
	nodeStateKeys = "node.>"
)

// InboxPrefix is the reply-subject prefix of user (an nkey public key).
// Each user may subscribe only to its own inbox, so that no client reads the
// replies another one, or the service, receives (operation records, dead
// letters, acknowledgements). Clients set it with nats.CustomInboxPrefix.
func InboxPrefix(user string) string { return "_INBOX." + user }

// Grants are the subjects a user may publish and subscribe to; anything
// else is refused. PublishDeny carves exceptions out of Publish.
type Grants struct {
	Publish     []string
	PublishDeny []string
	Subscribe   []string
}

// jsAPI is the JetStream API subject of op on stream.
func jsAPI(op, stream string) string { return "$JS.API." + op + "." + stream }

func kvSubjects(bucket string) string { return "$KV." + bucket + ".>" }

// For returns the grants of role for user (an nkey public key). Readers
// get no JetStream consumer: a consumer's deliver subject can be any
// subject, and the server delivers to it whatever the creator may publish,
// so "$JS.API.CONSUMER.CREATE" would let a reader put messages on any
// subject someone listens on. They read operations with stream info (the
// bucket's subject index) and direct gets, and status by subscribing to
// the status subjects (status events are published there as they are
// stored). An unknown role is an error.
func For(role Role, user string) (Grants, error) {
	if role == RoleDrover {
		return Grants{
			Publish: []string{
				"drover.>",
				kvSubjects(consumers.BucketOps), kvSubjects(consumers.BucketProgress), kvSubjects(consumers.BucketLocks),
				kvSubjects(consumers.BucketSettings),
				"$JS.API.>", // streams, consumers, buckets, pull requests, direct gets
				"$JS.ACK.>", // acks, InProgress, naks, terms
				"$JS.FC.>",  // flow control replies of KV watchers
				"_INBOX.>",  // answers to recovery control requests (only to inboxes,
				"_R_.>",     // or to the reply subject of the clients account's service import)
				UserInfoSubject,
			},
			Subscribe: []string{">", RoleSubjectPrefix + string(RoleDrover)},
		}, nil
	}
	if !role.Valid() {
		return Grants{}, fmt.Errorf("unknown role %q (want one of %v)", role, Roles())
	}
	g := Grants{
		Publish:   []string{UserInfoSubject},
		Subscribe: []string{InboxPrefix(user) + ".>", RoleSubjectPrefix + string(role)},
	}
	// Reading operations (drover status [OPERATION]): records and per-VM
	// progress by the stream's subject index and direct gets, no consumer.
	readOperations := []string{
		jsAPI("STREAM.INFO", "KV_"+consumers.BucketOps),
		jsAPI("DIRECT.GET", "KV_"+consumers.BucketOps) + ".$KV." + consumers.BucketOps + ".>",
		jsAPI("STREAM.INFO", "KV_"+consumers.BucketProgress),
		jsAPI("DIRECT.GET", "KV_"+consumers.BucketProgress) + ".$KV." + consumers.BucketProgress + ".>",
	}
	switch role {
	case RoleOperator:
		for _, k := range sortedKinds() {
			g.Publish = append(g.Publish, schemas.RequestFilter(k))
		}
		g.Publish = append(g.Publish, RecoveryControlSubjects)
		g.Publish = append(g.Publish, readOperations...)
		g.Publish = append(g.Publish,
			// dlq list, dlq replay: read and remove dead letters (the
			// stream has no direct get).
			jsAPI("STREAM.INFO", consumers.StreamDLQ),
			jsAPI("STREAM.MSG.GET", consumers.StreamDLQ),
			jsAPI("STREAM.MSG.DELETE", consumers.StreamDLQ),
			// dlq replay, op retry: a new generation of the operation, its
			// progress cleared.
			kvSubjects(consumers.BucketOps),
			kvSubjects(consumers.BucketProgress),
		)
		g.PublishDeny = []string{"$KV." + consumers.BucketOps + "." + nodeStateKeys}
		g.Subscribe = append(g.Subscribe, schemas.StatusSubjects)
	case RoleChatbot:
		for _, k := range []string{schemas.KindMaintenanceRequested, schemas.KindMaintenanceEnded, schemas.KindVMMigrateRequested, schemas.KindVMMigrateCancelled} {
			g.Publish = append(g.Publish, schemas.RequestFilter(k))
		}
		g.Publish = append(g.Publish, readOperations...)
		g.Subscribe = append(g.Subscribe, schemas.StatusSubjects)
	case RoleFencer:
		g.Publish = append(g.Publish, schemas.RequestFilter(schemas.KindNodeFenced))
		g.Subscribe = append(g.Subscribe, schemas.StatusFilter(schemas.WorkflowRecovery))
	case RoleObserver:
		g.Publish = append(g.Publish, readOperations...)
		g.Subscribe = append(g.Subscribe, schemas.StatusSubjects)
	}
	return g, nil
}

func sortedKinds() []string {
	k := schemas.Kinds()
	slices.Sort(k)
	return k
}

// Permissions converts the grants for nats-server.
func (g Grants) Permissions() *server.Permissions {
	p := &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: slices.Clone(g.Publish)},
		Subscribe: &server.SubjectPermission{Allow: slices.Clone(g.Subscribe)},
	}
	if len(g.PublishDeny) > 0 {
		p.Publish.Deny = slices.Clone(g.PublishDeny)
	}
	return p
}
