#!/usr/bin/env bash
# Builds the binaries the integration tests run into $1 (default .cache/bin at
# the repository root): kube-apiserver and etcd (this module), or, when the
# second argument is "alertmanager", the real Alertmanager (its own module in
# alertmanager/), or, when it is "promtool", Prometheus's promtool (its own
# module in promtool/). Skips a binary that is already there and was built
# from the same go.mod and go.sum, so a warm cache costs nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/../../.cache/bin"}
what=${2:-controlplane}
mkdir -p "$out"
out=$(cd "$out" && pwd)
# build NAME MODULE_DIR PACKAGE
build() {
  local name=$1 dir=$2 pkg=$3
  local stamp
  stamp=$(cat "$dir/go.sum" "$dir/go.mod" | sha256sum | cut -c1-16) # not the paths: any checkout shares a cache
  if [ -x "$out/$name" ] && [ "$(cat "$out/$name.stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  echo "building $name into $out (first build takes a few minutes)" >&2
  (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$out/$name.tmp" "$pkg")
  mv "$out/$name.tmp" "$out/$name"
  echo "$stamp" > "$out/$name.stamp"
}
case "$what" in
controlplane)
  build etcd "$here" ./etcd
  build kube-apiserver "$here" ./kube-apiserver
  ;;
alertmanager)
  build alertmanager "$here/alertmanager" github.com/prometheus/alertmanager/cmd/alertmanager
  ;;
promtool)
  build promtool "$here/promtool" github.com/prometheus/prometheus/cmd/promtool
  ;;
*)
  echo "build.sh: unknown target $what (controlplane, alertmanager or promtool)" >&2
  exit 2
  ;;
esac
