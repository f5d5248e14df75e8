package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/drover-io/drover/integration/crds"
)

// EnvBinDir names the environment variable that points at the folder holding the etcd and
// kube-apiserver binaries. The Makefile exports it.
const EnvBinDir = "DROVER_TEST_BIN"

// BuildCommand is what a person runs to build the control-plane binaries.
const BuildCommand = "make controlplane"

const (
	// defaultStartTimeout bounds Start when the caller's context has no deadline. The machines
	// that run the tests are small and busy, so it is generous.
	defaultStartTimeout = 2 * time.Minute
	stopTimeout         = 20 * time.Second
)

// SystemNamespaces exist in every cluster Start returns.
var SystemNamespaces = []string{"default", "kube-system", "kube-public", "kube-node-lease"}

// Options configure Start.
type Options struct {
	// BinDir holds the etcd and kube-apiserver binaries. Default: $DROVER_TEST_BIN, else
	// .cache/bin at the repository root.
	BinDir string
	// SkipCRDs leaves out installing drover's CRDs (see package crds).
	SkipCRDs bool
	// Audit makes the API server keep an audit log of the requests made through
	// ImpersonatedConfig (and only those); AuditEvents reads it.
	Audit bool
}

// Cluster is a running control plane. Stop it when done.
type Cluster struct {
	// Config is an admin (system:masters) client configuration.
	Config *rest.Config
	// Kubeconfig is the path of a kubeconfig file for the same admin user, usable by kubectl
	// and `drover serve --kubeconfig`. It is removed by Stop.
	Kubeconfig string
	// Dir is a private folder of this cluster (kubeconfig, control-plane logs); removed by Stop.
	Dir string
	// StartupTime is how long Start took.
	StartupTime time.Duration

	env          *envtest.Environment
	auditLog     string
	userMu       sync.Mutex // guards impersonator*
	impersonator *rest.Config
	// impersonatorKubeconfig is the impersonator's kubeconfig (client certificate).
	impersonatorKubeconfig []byte
	apiserverPID           int
	etcdPID                int
	stopOnce               sync.Once
	stopErr                error
}

// Start starts etcd and kube-apiserver from opts.BinDir, waits until the API server answers and
// the system namespaces exist, installs the CRDs unless opts.SkipCRDs, and writes a kubeconfig.
// If a binary is missing, the error names it and says to run `make controlplane`. Start is
// bounded by ctx (or by two minutes when ctx has no deadline); on any error it leaves no process
// behind. The processes are killed by the kernel if the calling process dies without Stop (when
// setpriv is installed). Start logs to zerolog.Ctx(ctx) and routes controller-runtime's logs to
// zerolog's global logger (see routeControllerRuntimeLogs).
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	begin := time.Now()
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultStartTimeout)
		defer cancel()
	}
	log := zerolog.Ctx(ctx)
	routeControllerRuntimeLogs()

	binDir, err := ResolveBinDir(opts.BinDir)
	if err != nil {
		return nil, err
	}
	apiserverPath, etcdPath, err := findBinaries(binDir)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "drover-cluster-")
	if err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	c := &Cluster{Dir: dir}
	ok := false
	defer func() {
		if !ok {
			_ = c.Stop()
		}
	}()

	apiserverLog, err := os.Create(filepath.Join(dir, "kube-apiserver.log"))
	if err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	defer apiserverLog.Close() // the child process keeps its own descriptor
	etcdLog, err := os.Create(filepath.Join(dir, "etcd.log"))
	if err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	defer etcdLog.Close()

	deadline, _ := ctx.Deadline()
	env := &envtest.Environment{
		BinaryAssetsDirectory: binDir,
		// Each component gets what is left of ctx; envtest retries a failed start a few times.
		ControlPlaneStartTimeout: time.Until(deadline),
		ControlPlaneStopTimeout:  stopTimeout,
	}
	// Explicit paths, so that KUBEBUILDER_ASSETS or TEST_ASSET_* in the environment cannot
	// silently swap in other binaries.
	api := env.ControlPlane.GetAPIServer()
	api.Path, err = dieWithParent(dir, apiserverPath)
	if err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	api.Out, api.Err = apiserverLog, apiserverLog
	if opts.Audit {
		if c.auditLog, err = configureAudit(dir, api); err != nil {
			return nil, fmt.Errorf("start cluster: %w", err)
		}
	}
	etcdExec, err := dieWithParent(dir, etcdPath)
	if err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	env.ControlPlane.Etcd = &envtest.Etcd{Path: etcdExec, Out: etcdLog, Err: etcdLog}
	// envtest only records kubectl's path (for its deprecated helpers); it never runs it.
	if kubectl, err := exec.LookPath("kubectl"); err == nil {
		env.ControlPlane.KubectlPath = kubectl
	} else {
		env.ControlPlane.KubectlPath = filepath.Join(binDir, "kubectl")
	}
	c.env = env

	if err := startEnv(ctx, env); err != nil {
		return nil, fmt.Errorf("start control plane from %s: %w%s", binDir, err, logTail(dir))
	}
	c.Config = rest.CopyConfig(env.Config)
	c.apiserverPID = findPID(apiserverPath, api.CertDir)
	c.etcdPID = findPID(etcdPath, env.ControlPlane.Etcd.DataDir)

	if err := ensureNamespaces(ctx, c.Config); err != nil {
		return nil, fmt.Errorf("start cluster: %w", err)
	}
	if !opts.SkipCRDs {
		if err := crds.Install(ctx, c.Config); err != nil {
			return nil, fmt.Errorf("start cluster: %w", err)
		}
	}
	c.Kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(c.Kubeconfig, env.KubeConfig, 0o600); err != nil {
		return nil, fmt.Errorf("start cluster: write kubeconfig: %w", err)
	}
	c.StartupTime = time.Since(begin)
	ok = true
	log.Info().Str("kubeconfig", c.Kubeconfig).Str("host", c.Config.Host).
		Dur("startup", c.StartupTime).Msg("control plane started")
	return c, nil
}

// startEnv runs env.Start, which takes no context, and gives up when ctx ends. envtest bounds
// each component's start by ControlPlaneStartTimeout, so the goroutine does not outlive ctx by
// much; its processes are stopped by the caller's Stop either way.
func startEnv(ctx context.Context, env *envtest.Environment) error {
	done := make(chan error, 1)
	go func() {
		_, err := env.Start()
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		// Wait for Start to return so that Stop sees every process it started.
		<-done
		return ctx.Err()
	}
}

// Stop stops kube-apiserver and etcd and removes Dir. It is safe to call more than once (later
// calls return the first call's result) and waits until both processes have exited.
func (c *Cluster) Stop() error {
	c.stopOnce.Do(func() {
		var errs []error
		if c.env != nil {
			if err := c.env.Stop(); err != nil {
				errs = append(errs, fmt.Errorf("stop control plane: %w", err))
			}
		}
		if c.Dir != "" {
			if err := os.RemoveAll(c.Dir); err != nil {
				errs = append(errs, fmt.Errorf("stop control plane: remove %s: %w", c.Dir, err))
			}
		}
		c.stopErr = errors.Join(errs...)
	})
	return c.stopErr
}

// PIDs returns the process ids kube-apiserver and etcd had when Start returned (0 if unknown:
// they are looked up in /proc, so only on Linux). After Stop these processes no longer exist.
func (c *Cluster) PIDs() (apiserver, etcd int) {
	return c.apiserverPID, c.etcdPID
}

// ResolveBinDir returns dir, else $DROVER_TEST_BIN, else .cache/bin at the repository root.
func ResolveBinDir(dir string) (string, error) {
	if dir == "" {
		dir = os.Getenv(EnvBinDir)
	}
	if dir == "" {
		root, err := repoRoot()
		if err != nil {
			return "", fmt.Errorf("find control-plane binaries: set %s or Options.BinDir: %w", EnvBinDir, err)
		}
		dir = filepath.Join(root, ".cache", "bin")
	}
	return filepath.Abs(dir)
}

func findBinaries(dir string) (apiserver, etcd string, err error) {
	var missing []string
	check := func(name string) string {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			missing = append(missing, p)
		}
		return p
	}
	apiserver, etcd = check("kube-apiserver"), check("etcd")
	if len(missing) > 0 {
		return "", "", fmt.Errorf("control-plane binary missing: %s; build it with `%s` (or integration/tools/build.sh %s)",
			strings.Join(missing, ", "), BuildCommand, dir)
	}
	return apiserver, etcd, nil
}

// repoRoot finds the drover module's root: from the working directory upwards, else from this
// source file's location (tests run with the package folder as working directory).
func repoRoot() (string, error) {
	isRoot := func(dir string) bool {
		data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		return err == nil && bytes.Contains(data, []byte("module github.com/drover-io/drover\n"))
	}
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		starts = append(starts, filepath.Dir(file))
	}
	for _, dir := range starts {
		for d := dir; ; d = filepath.Dir(d) {
			if isRoot(d) {
				return d, nil
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	return "", errors.New("no github.com/drover-io/drover go.mod above the working directory")
}

// ensureNamespaces waits for the namespaces the API server creates itself and creates any that
// are still missing, as a real cluster has them all.
func ensureNamespaces(ctx context.Context, cfg *rest.Config) error {
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("namespaces: client: %w", err)
	}
	for _, name := range SystemNamespaces {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
		err := wait.PollUntilContextCancel(ctx, 50*time.Millisecond, true, func(ctx context.Context) (bool, error) {
			_, err := cs.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{})
			switch {
			case err == nil, apierrors.IsAlreadyExists(err):
				return true, nil
			case ctx.Err() != nil:
				return false, ctx.Err()
			default:
				return false, nil // the API server may still be bootstrapping; poll
			}
		})
		if err != nil {
			return fmt.Errorf("namespace %s: %w", name, err)
		}
	}
	return nil
}

// logTail returns the end of the control-plane logs in dir, for start-up errors.
func logTail(dir string) string {
	var b strings.Builder
	for _, name := range []string{"etcd.log", "kube-apiserver.log"} {
		data, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || len(data) == 0 {
			continue
		}
		if len(data) > 2000 {
			data = data[len(data)-2000:]
		}
		fmt.Fprintf(&b, "\n--- %s (end) ---\n%s", name, data)
	}
	return b.String()
}

// dieWithParent returns the path of a wrapper in dir that runs bin so that the kernel kills it
// when the process that started it dies (setpriv --pdeathsig). Stop ends the processes in an
// orderly way; this covers a test binary killed by a timeout or a signal, which otherwise
// leaves etcd and kube-apiserver running (envtest starts them in their own process group).
// Without setpriv, bin itself is returned.
func dieWithParent(dir, bin string) (string, error) {
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		return bin, nil
	}
	wrapper := filepath.Join(dir, filepath.Base(bin))
	script := fmt.Sprintf("#!/bin/sh\nexec %s --pdeathsig KILL -- %s \"$@\"\n", shellQuote(setpriv), shellQuote(bin))
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		return "", fmt.Errorf("write %s: %w", wrapper, err)
	}
	return wrapper, nil
}

func shellQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// findPID returns the id of this process's child that runs bin with marker (a folder unique to
// this cluster) on its command line, or 0.
func findPID(bin, marker string) int {
	if marker == "" {
		return 0
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(cmdline), "\x00")
		if len(args) > 0 && args[0] == bin && strings.Contains(string(cmdline), marker) {
			return pid
		}
	}
	return 0
}
