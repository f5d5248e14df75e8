package natsauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// Denied is a permission violation the server reported: the user, in its
// role, may not publish or subscribe to Subject. A retry does not help;
// other credentials might.
type Denied struct {
	// Op is "publish", "subscribe" or "reply".
	Op      string
	Subject string
	// User is the user's public nkey and Role its role, as the server has
	// them; both are empty when the server did not say (see WhoAmI).
	User string
	Role Role
}

func (d *Denied) Error() string {
	who := "this user"
	switch {
	case d.Role != "":
		who = "role " + string(d.Role)
	case d.User != "":
		who = "user " + d.User
	}
	verb := map[string]string{"publish": "publish to", "subscribe": "subscribe to", "reply": "publish with reply subject"}[d.Op]
	s := fmt.Sprintf("permission denied: %s may not %s %s", who, verb, d.Subject)
	if d.Role != "" && d.User != "" {
		s += " (NATS user " + d.User + ")"
	}
	return s + "; retrying will not help, use credentials of a role that may (README: Who may do what)"
}

var violation = regexp.MustCompile(`Permissions Violation for (Publish to|Subscription to|Publish with Reply of) "([^"]*)"`)

// DeniedFrom recognises the permission violations nats.go reports to a
// connection's error handler (nats.ErrPermissionViolation). User and Role
// are left empty.
func DeniedFrom(err error) (*Denied, bool) {
	if !errors.Is(err, nats.ErrPermissionViolation) {
		return nil, false
	}
	m := violation.FindStringSubmatch(err.Error())
	if m == nil {
		return &Denied{Op: "publish", Subject: strings.TrimPrefix(err.Error(), nats.ErrPermissionViolation.Error()+": ")}, true
	}
	op := map[string]string{"Publish to": "publish", "Subscription to": "subscribe", "Publish with Reply of": "reply"}[m[1]]
	return &Denied{Op: op, Subject: m[2]}, true
}

// WhoAmI asks the server (UserInfoSubject) which user the connection is and
// which role its permissions name (RoleSubjectPrefix). The role is "" when
// the permissions name none: a server drover's roles do not configure, or
// one without authentication.
func WhoAmI(ctx context.Context, nc *nats.Conn) (string, Role, error) {
	m, err := nc.RequestWithContext(ctx, UserInfoSubject, nil)
	if err != nil {
		return "", "", fmt.Errorf("ask the NATS server who this user is: %w", err)
	}
	var resp struct {
		Data *struct {
			User        string `json:"user"`
			Permissions *struct {
				Subscribe *struct {
					Allow []string `json:"allow"`
				} `json:"subscribe"`
			} `json:"permissions"`
		} `json:"data"`
		Error *struct {
			Description string `json:"description"`
		} `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return "", "", fmt.Errorf("user info from the NATS server: %w", err)
	}
	if resp.Error != nil || resp.Data == nil {
		return "", "", fmt.Errorf("user info from the NATS server: %+v", resp.Error)
	}
	var role Role
	if p := resp.Data.Permissions; p != nil && p.Subscribe != nil {
		for _, s := range p.Subscribe.Allow {
			if r, ok := strings.CutPrefix(s, RoleSubjectPrefix); ok && Role(r).Valid() {
				role = Role(r)
			}
		}
	}
	return resp.Data.User, role, nil
}

// OnDenied is a connection option: on the first permission violation the
// server reports, f gets it with the user and role filled in from WhoAmI
// (asked within a second; left empty if the server does not answer). nats.go
// reports violations only to the error handler, so without this a refused
// JetStream publish looks like a timeout. Other asynchronous errors are
// ignored.
func OnDenied(f func(*Denied)) nats.Option {
	var once sync.Once
	return nats.ErrorHandler(func(nc *nats.Conn, _ *nats.Subscription, err error) {
		d, ok := DeniedFrom(err)
		if !ok {
			return
		}
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			if user, role, err := WhoAmI(ctx, nc); err == nil {
				d.User, d.Role = user, role
			}
			f(d)
		})
	})
}
