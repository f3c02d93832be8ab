#!/usr/bin/env bash
# Builds (once) and checks everything `cargo test` needs beyond Rust, so that README's test command
# works on a fresh machine: kubectl (tests/manifests.rs renders deploy/), kube-apiserver and etcd
# (tests/real_apiserver.rs), helm and promtool (tests/chart.rs). The Go-built tools are cached
# under target/tools/; the tests find them there. The first run on a fresh 2-core machine takes
# about 15 minutes (docs/development.md); later runs, a second.
#
# If kubectl had to be installed outside PATH, its directory is printed: put it first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
kubectl_dir=$(scripts/ensure-kubectl.sh)
echo "ensure-test-tools: kube-apiserver and etcd in $(scripts/ensure-kube-apiserver.sh)" >&2
echo "ensure-test-tools: helm in $(scripts/ensure-helm.sh)" >&2
echo "ensure-test-tools: promtool in $(scripts/ensure-promtool.sh)" >&2
if [ -n "$kubectl_dir" ]; then echo "$kubectl_dir"; fi
