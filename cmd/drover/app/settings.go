package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/drover-io/drover/consumers"
	"github.com/drover-io/drover/handlers/recovery"
)

// Recovery control requests (natsauth.RecoveryControlSubjects): an
// operator pauses and resumes new recoveries and reads the pause and the
// failover capacity; every replica of drover serve answers (queue group),
// and keeps the state in consumers.BucketSettings, which clients never touch.
const (
	subjectRecoveryPause  = "drover.ctl.recovery.pause"
	subjectRecoveryResume = "drover.ctl.recovery.resume"
	subjectRecoveryStatus = "drover.ctl.recovery.status"
)

// Keys of consumers.BucketSettings.
const (
	keyRecoveryPause    = "recovery.pause"
	keyFailoverCapacity = "recovery.capacity"
)

// capacityReport is the failover capacity as a replica last computed it.
type capacityReport struct {
	Nodes int       `json:"nodes"`
	At    time.Time `json:"at"`
	By    string    `json:"by,omitempty"`
}

// recoveryControl is what a control request asks and what it answers.
type recoveryControl struct {
	Pause    recovery.Pause  `json:"pause"`
	Capacity *capacityReport `json:"capacity,omitempty"`
	Error    string          `json:"error,omitempty"`
}

// settingsBucket creates (or opens) consumers.BucketSettings.
func settingsBucket(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      consumers.BucketSettings,
		Description: "drover cluster-wide switches: recovery pause, failover capacity",
		History:     10,
		Storage:     jetstream.FileStorage,
		Replicas:    max(replicas, 1),
	})
	if err != nil {
		return nil, fmt.Errorf("create bucket %s: %w", consumers.BucketSettings, err)
	}
	return kv, nil
}

// kvPauser reads the recovery pause from the settings bucket.
type kvPauser struct{ kv jetstream.KeyValue }

var _ recovery.Pauser = kvPauser{}

// RecoveryPause implements recovery.Pauser.
func (p kvPauser) RecoveryPause(ctx context.Context) (recovery.Pause, error) {
	var pause recovery.Pause
	_, err := getJSON(ctx, p.kv, keyRecoveryPause, &pause)
	return pause, err
}

// serveRecoveryControl answers the recovery control requests until ctx ends.
func serveRecoveryControl(ctx context.Context, nc *nats.Conn, kv jetstream.KeyValue, log zerolog.Logger) (func(), error) {
	answer := func(m *nats.Msg) {
		if !strings.HasPrefix(m.Reply, "_INBOX.") && !strings.HasPrefix(m.Reply, "_R_.") {
			// The answer goes to an inbox only (or, across NATS accounts, the
			// service import's reply subject): a reply subject naming a
			// request subject would have the service publish there.
			log.Warn().Str("subject", m.Subject).Str("reply", m.Reply).Msg("recovery control request without an inbox to answer; ignored")
			return
		}
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		var resp recoveryControl
		err := func() error {
			switch m.Subject {
			case subjectRecoveryPause, subjectRecoveryResume:
				var req recovery.Pause
				if err := json.Unmarshal(m.Data, &req); err != nil {
					return fmt.Errorf("malformed request: %w", err)
				}
				req.Paused, req.Since = m.Subject == subjectRecoveryPause, time.Now().UTC()
				if err := putJSON(rctx, kv, keyRecoveryPause, req); err != nil {
					return err
				}
				log.Warn().Bool("paused", req.Paused).Str("by", req.By).Str("reason", req.Reason).Msg("recovery pause changed")
			}
			if _, err := getJSON(rctx, kv, keyRecoveryPause, &resp.Pause); err != nil {
				return err
			}
			var c capacityReport
			if ok, err := getJSON(rctx, kv, keyFailoverCapacity, &c); err != nil {
				return err
			} else if ok {
				resp.Capacity = &c
			}
			return nil
		}()
		if err != nil {
			resp.Error = err.Error()
		}
		b, _ := json.Marshal(resp)
		if err := m.Respond(b); err != nil {
			log.Warn().Err(err).Msg("could not answer a recovery control request")
		}
	}
	var subs []*nats.Subscription
	unsubscribe := func() {
		for _, s := range subs {
			_ = s.Unsubscribe()
		}
	}
	for _, subj := range []string{subjectRecoveryPause, subjectRecoveryResume, subjectRecoveryStatus} {
		s, err := nc.QueueSubscribe(subj, "drover", answer)
		if err != nil {
			unsubscribe()
			return nil, fmt.Errorf("subscribe %s: %w", subj, err)
		}
		subs = append(subs, s)
	}
	return unsubscribe, nil
}

func getJSON(ctx context.Context, kv jetstream.KeyValue, key string, v any) (bool, error) {
	e, err := kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s: %w", key, err)
	}
	if err := json.Unmarshal(e.Value(), v); err != nil {
		return false, fmt.Errorf("decode %s: %w", key, err)
	}
	return true, nil
}

func putJSON(ctx context.Context, kv jetstream.KeyValue, key string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	if _, err := kv.Put(ctx, key, b); err != nil {
		return fmt.Errorf("write %s: %w", key, err)
	}
	return nil
}
