package cluster

import (
	"sync"

	"github.com/go-logr/logr"
	"github.com/rs/zerolog"
	zlog "github.com/rs/zerolog/log"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
)

var routeLogsOnce sync.Once

// routeControllerRuntimeLogs sends controller-runtime's logs (envtest writes a few) to zerolog's
// global logger: V(0) Info at debug level, Error at warn level; the V(1)+ chatter envtest emits on every start is dropped. Without a logger, controller-runtime
// prints a stack trace complaining about it the first time it logs after 30 s of process life,
// which long test binaries hit. controller-runtime keeps the first logger it is given, so a
// program that wants these logs elsewhere calls ctrllog.SetLogger before Start.
func routeControllerRuntimeLogs() {
	routeLogsOnce.Do(func() { ctrllog.SetLogger(logr.New(zerologSink{})) })
}

type zerologSink struct {
	name   string
	values []any
}

var _ logr.LogSink = zerologSink{}

func (zerologSink) Init(logr.RuntimeInfo) {}

func (zerologSink) Enabled(level int) bool { return level <= 0 }

func (s zerologSink) Info(_ int, msg string, kv ...any) {
	s.event(zlog.Debug(), kv).Msg(msg)
}

func (s zerologSink) Error(err error, msg string, kv ...any) {
	s.event(zlog.Warn().Err(err), kv).Msg(msg)
}

func (s zerologSink) event(e *zerolog.Event, kv []any) *zerolog.Event {
	if s.name != "" {
		e = e.Str("logger", s.name)
	}
	return e.Fields(append(append([]any{}, s.values...), kv...))
}

func (s zerologSink) WithValues(kv ...any) logr.LogSink {
	s.values = append(append([]any{}, s.values...), kv...)
	return s
}

func (s zerologSink) WithName(name string) logr.LogSink {
	if s.name != "" {
		name = s.name + "." + name
	}
	s.name = name
	return s
}
