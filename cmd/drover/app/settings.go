package app

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/drover-io/drover/handlers/recovery"
)

// BucketSettings holds cluster-wide switches every replica reads: the
// recovery pause (`drover recovery pause|resume`) and the last failover
// capacity computed.
const BucketSettings = "drover-settings"

// Keys of BucketSettings.
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

// settingsBucket creates (or opens) BucketSettings.
func settingsBucket(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      BucketSettings,
		Description: "drover cluster-wide switches: recovery pause, failover capacity",
		History:     10,
		Storage:     jetstream.FileStorage,
		Replicas:    max(replicas, 1),
	})
	if err != nil {
		return nil, fmt.Errorf("create bucket %s: %w", BucketSettings, err)
	}
	return kv, nil
}

// openSettings opens BucketSettings for a client command.
func openSettings(ctx context.Context, js jetstream.JetStream) (jetstream.KeyValue, error) {
	kv, err := js.KeyValue(ctx, BucketSettings)
	if err != nil {
		return nil, fmt.Errorf("open %s (has drover serve run against this NATS?): %w", BucketSettings, err)
	}
	return kv, nil
}

// kvPauser reads the recovery pause from BucketSettings.
type kvPauser struct{ kv jetstream.KeyValue }

var _ recovery.Pauser = kvPauser{}

// RecoveryPause implements recovery.Pauser.
func (p kvPauser) RecoveryPause(ctx context.Context) (recovery.Pause, error) {
	return readPause(ctx, p.kv)
}

func readPause(ctx context.Context, kv jetstream.KeyValue) (recovery.Pause, error) {
	var pause recovery.Pause
	ok, err := getJSON(ctx, kv, keyRecoveryPause, &pause)
	if err != nil || !ok {
		return recovery.Pause{}, err
	}
	return pause, nil
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
