#!/usr/bin/env bash
# Prints a directory holding `helm` for the chart tests (tests/chart.rs) and CI's `helm lint`,
# building it from the Go module proxy the first time.
#
# `go install helm.sh/helm/v4/cmd/helm@<version>` into target/tools/helm-<version>/ with
# CGO_ENABLED=0; the version is stamped by -ldflags as helm's own Makefile does, or `helm version`
# reports only the minor. Later runs only check `helm version`. The first build takes several
# minutes on 2 busy cores; with Go's build cache warm, seconds.
#
# Use the printed directory as the tests do: HELM=<dir>/helm cargo test --test chart
set -euo pipefail
cd "$(dirname "$0")/.."

version=v4.3.2
out=target/tools/helm-$version

reports() { [ "$("$out/helm" version --template '{{.Version}}' 2>/dev/null)" = "$version" ]; }

if [ -x "$out/helm" ] && reports; then
  echo "$PWD/$out"
  exit 0
fi
command -v go >/dev/null || {
  echo "ensure-helm: no go on PATH; Go 1.26 or newer builds helm $version" >&2
  exit 1
}

echo "ensure-helm: building helm $version from the Go module proxy (once; minutes on 2 cores)" >&2
mkdir -p "$out"
(
  export CGO_ENABLED=0 GOTOOLCHAIN=local GOBIN="$PWD/$out"
  go install -trimpath -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$version" \
    "helm.sh/helm/v4/cmd/helm@$version"
) >&2
reports || {
  echo "ensure-helm: built helm reports '$("$out/helm" version --template '{{.Version}}' 2>&1)', not $version" >&2
  exit 1
}
echo "$PWD/$out"
