#!/usr/bin/env bash
# Builds the control-plane binaries the integration tests use into $1
# (default .cache/bin at the repository root). Skips a binary that is already
# there and was built from the same go.sum, so a warm cache costs nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/../../.cache/bin"}
mkdir -p "$out"
out=$(cd "$out" && pwd)
stamp=$(sha256sum "$here/go.sum" "$here/go.mod" | sha256sum | cut -c1-16)
build() {
  local name=$1
  if [ -x "$out/$name" ] && [ "$(cat "$out/$name.stamp" 2>/dev/null)" = "$stamp" ]; then
    return 0
  fi
  echo "building $name into $out (first build takes a few minutes)" >&2
  (cd "$here" && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$out/$name.tmp" "./$name")
  mv "$out/$name.tmp" "$out/$name"
  echo "$stamp" > "$out/$name.stamp"
}
build etcd
build kube-apiserver
