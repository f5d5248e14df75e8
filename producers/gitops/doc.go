// Package gitops is the Git producer: it polls a repository with go-git
// (file://, HTTPS with a token, SSH with a key), reads the maintenance
// requests committed under a path, and publishes maintenance.requested when
// one becomes active and maintenance.ended when it is removed, marked Done or
// its window closes. Its state (what it published as active, the last
// commit it processed) lives in a JetStream KV bucket written with
// compare-and-set, so restarts, replicas and re-polls publish nothing twice;
// a force-pushed branch is handled by comparing what is in the tree with
// that state, never by walking history.
package gitops
