package schemas

import (
	"testing"

	"github.com/stretchr/testify/require"
)

func TestDeterministicID(t *testing.T) {
	base := DeterministicID("node-uid-1", "2026-11-21T16:00:00Z")
	require.Len(t, base, 32)
	require.Regexp(t, `^[0-9a-f]{32}$`, base)
	require.Equal(t, base, DeterministicID("node-uid-1", "2026-11-21T16:00:00Z"), "stable across calls")
	// Pinned value (sha256 of uvarint-length-prefixed parts, first 16 bytes): changing the derivation would break deduplication across a rolling upgrade.
	require.Equal(t, "fa4a350f5906021e27b2caf19409319e", DeterministicID("a", "b"))

	tests := []struct {
		name string
		a, b []string
	}{
		{name: "first part", a: []string{"x", "y"}, b: []string{"z", "y"}},
		{name: "second part", a: []string{"x", "y"}, b: []string{"x", "z"}},
		{name: "boundary", a: []string{"a", "bc"}, b: []string{"ab", "c"}},
		{name: "empty part vs none", a: []string{"a", ""}, b: []string{"a"}},
		{name: "no parts vs one empty", a: nil, b: []string{""}},
		{name: "order", a: []string{"a", "b"}, b: []string{"b", "a"}},
		{name: "separator injection", a: []string{"a\x01b"}, b: []string{"a", "b"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			require.NotEqual(t, DeterministicID(tc.a...), DeterministicID(tc.b...))
		})
	}
}

func TestMsgID(t *testing.T) {
	e1, err := New("drover/nodewatch", DeterministicID("uid", "t"), NodeReady{Node: "n1", Since: fixedTime})
	require.NoError(t, err)
	e2, err := New("drover/nodewatch", DeterministicID("uid", "t"), NodeReady{Node: "n1", Since: fixedTime})
	require.NoError(t, err)
	require.Equal(t, MsgID(e1), MsgID(e2), "same source and id: same Nats-Msg-Id whatever the publish time")
	require.Equal(t, DeterministicID("drover/nodewatch", e1.ID()), MsgID(e1))

	e3, err := New("drover/alertmanager", e1.ID(), NodeReady{Node: "n1", Since: fixedTime})
	require.NoError(t, err)
	require.NotEqual(t, MsgID(e1), MsgID(e3), "another source, another message")
}
