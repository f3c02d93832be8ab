#!/usr/bin/env bash
# Prints a directory holding `kube-apiserver` and `etcd` for the real-apiserver tests
# (tests/real_apiserver.rs), building both from the Go module proxy the first time.
#
# tests/apiserver/ is a tiny Go module: it requires k8s.io/kubernetes at the pinned release, with
# each staging module replaced by its published k8s.io/* v0.x.y, and etcd's server at the release
# that kube-apiserver requires. Both are built with CGO_ENABLED=0 into target/tools/k8s-<version>/;
# later runs only check `kube-apiserver --version`. The first build takes about 11 minutes on 2
# cores and ~750 MB of module cache; with Go's build cache warm, seconds.
#
# Use the printed directory as envtest does: KUBEBUILDER_ASSETS=<dir> cargo test --test real_apiserver
set -euo pipefail
cd "$(dirname "$0")/.."

version=v1.34.4
src=tests/apiserver
out=target/tools/k8s-$version

grep -q "k8s.io/kubernetes $version\$" "$src/go.mod" || {
  echo "ensure-kube-apiserver: $src/go.mod does not require k8s.io/kubernetes $version" >&2
  exit 1
}
if [ -x "$out/kube-apiserver" ] && [ -x "$out/etcd" ] &&
  [ "$("$out/kube-apiserver" --version 2>/dev/null)" = "Kubernetes $version" ]; then
  echo "$PWD/$out"
  exit 0
fi
command -v go >/dev/null || {
  echo "ensure-kube-apiserver: no go on PATH; Go 1.24 or newer builds the test control plane" >&2
  exit 1
}

echo "ensure-kube-apiserver: building kube-apiserver $version and etcd from the Go module proxy (once; about 11 minutes on 2 cores)" >&2
mkdir -p "$out"
minor=${version#v1.}
minor=${minor%%.*}
pkg=k8s.io/component-base/version
ldflags="-s -w -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
(
  cd "$src"
  export CGO_ENABLED=0 GOFLAGS=-mod=readonly GOTOOLCHAIN=local
  go build -trimpath -ldflags "$ldflags" -o "../../$out/kube-apiserver.tmp" ./cmd/kube-apiserver
  go build -trimpath -ldflags "-s -w" -o "../../$out/etcd.tmp" ./cmd/etcd
) >&2
mv "$out/kube-apiserver.tmp" "$out/kube-apiserver"
mv "$out/etcd.tmp" "$out/etcd"
got=$("$out/kube-apiserver" --version)
[ "$got" = "Kubernetes $version" ] || {
  echo "ensure-kube-apiserver: built kube-apiserver reports '$got', not Kubernetes $version" >&2
  exit 1
}
echo "$PWD/$out"
