package schemas

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"

	"github.com/cloudevents/sdk-go/v2/event"
)

// DeterministicID returns a stable id for what a producer saw: the first 32 hex characters
// (128 bits) of SHA-256 over the parts, each prefixed with its length so that ("a","bc") and
// ("ab","c") differ. Producers derive CloudEvent ids with it (node UID + transition time, alert
// fingerprint + startsAt, blob + path) so replicas and retries publish the same id.
func DeterministicID(parts ...string) string {
	h := sha256.New()
	var n [binary.MaxVarintLen64]byte
	for _, p := range parts {
		h.Write(n[:binary.PutUvarint(n[:], uint64(len(p)))])
		h.Write([]byte(p))
	}
	var sum [sha256.Size]byte
	return hex.EncodeToString(h.Sum(sum[:0])[:16])
}

// MsgID returns the JetStream Nats-Msg-Id of an event: DeterministicID(source, id), so the same
// CloudEvent (same source and id) is deduplicated by the stream.
func MsgID(e event.Event) string {
	if e.Context == nil {
		return DeterministicID("", "")
	}
	return DeterministicID(e.Source(), e.ID())
}
