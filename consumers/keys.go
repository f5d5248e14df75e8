package consumers

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

// BucketKeys returns the keys of bucket that match filter (a key pattern such
// as "maintenance.*" or ">"), sorted, read from the subject index of the
// bucket's stream (a stream info request with a subject filter). Unlike a KV
// watcher it creates no consumer, so a client that may only read the bucket
// can list it: a consumer's deliver subject is a publish permission in
// disguise, which natsauth grants to no client role. Keys whose latest entry
// is a delete or purge marker are listed too; a reader skips them on Get.
func BucketKeys(ctx context.Context, js jetstream.JetStream, bucket, filter string) ([]string, error) {
	name := "KV_" + bucket
	s, err := js.Stream(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", bucket, err)
	}
	prefix := "$KV." + bucket + "."
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(prefix+filter))
	if err != nil {
		return nil, fmt.Errorf("list keys %s of bucket %s: %w", filter, bucket, err)
	}
	keys := make([]string, 0, len(info.State.Subjects))
	for subj := range info.State.Subjects {
		keys = append(keys, strings.TrimPrefix(subj, prefix))
	}
	sort.Strings(keys)
	return keys, nil
}

// OpenOpStore opens the drover-ops bucket for a client command: its List
// reads keys with BucketKeys, so that reading operations needs no more than
// stream info and direct gets (see natsauth). If the bucket does not exist,
// an error wrapping jetstream.ErrBucketNotFound is returned.
func OpenOpStore(ctx context.Context, js jetstream.JetStream) (*OpStore, error) {
	kv, err := js.KeyValue(ctx, BucketOps)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", BucketOps, err)
	}
	s := NewOpStore(kv)
	s.js = js
	return s, nil
}
