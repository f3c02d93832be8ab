#!/usr/bin/env bash
# Prints a directory holding `promtool`, which checks and unit-tests the chart's alerting rules
# (charts/outpost-webhook/files/alerts.yaml; tests/chart.rs), building it from the Go module proxy
# the first time.
#
# Prometheus 3.x publishes its Go module as v0.3XX.Y (3.16.0 is v0.316.0). Its go.mod has no
# replace directives, so `go install` of cmd/promtool works from the proxy. Built into
# target/tools/promtool-<version>/ with CGO_ENABLED=0 and the version stamped as Prometheus's
# own build does; later runs only check `promtool --version`. The first build takes minutes on
# 2 busy cores; with Go's build cache warm, seconds.
#
# Use the printed directory as the tests do: PROMTOOL=<dir>/promtool cargo test --test chart
set -euo pipefail
cd "$(dirname "$0")/.."

version=3.16.0
module=v0.316.0
out=target/tools/promtool-$version

reports() { "$out/promtool" --version 2>/dev/null | grep -q "^promtool, version $version "; }

if [ -x "$out/promtool" ] && reports; then
  echo "$PWD/$out"
  exit 0
fi
command -v go >/dev/null || {
  echo "ensure-promtool: no go on PATH; Go 1.26 or newer builds promtool $version" >&2
  exit 1
}

echo "ensure-promtool: building promtool $version from the Go module proxy (once; minutes on 2 cores)" >&2
mkdir -p "$out"
(
  export CGO_ENABLED=0 GOTOOLCHAIN=local GOBIN="$PWD/$out"
  go install -trimpath -ldflags "-s -w -X github.com/prometheus/common/version.Version=$version" \
    "github.com/prometheus/prometheus/cmd/promtool@$module"
) >&2
reports || {
  echo "ensure-promtool: built promtool reports '$("$out/promtool" --version 2>&1 | head -n 1)', not $version" >&2
  exit 1
}
echo "$PWD/$out"
