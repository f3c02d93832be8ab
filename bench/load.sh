#!/usr/bin/env bash
# Load benchmark over TLS: outpost-webhook and a floor server (the same TLS and HTTP stack
# answering a constant) in the same run, each pinned to core 0 with the load generator on
# core 1; HTTP/1.1 keep-alive, HTTP/2, and a new connection per request; 1, 16 and 64
# connections; medians of REPEATS runs of SECONDS each.
#
#   bench/load.sh [SECONDS=5] [REPEATS=3]
#
# PROFILE=dist measures the image's build (fat LTO) instead of `release`; CELLS="http1:16" runs
# only the rows named (see bench/load.py).
#
# Installs what it needs: oha (from crates.io, into target/bench-tools). Only 127.0.0.1 is
# used. Writes the table to stdout and target/bench/load.json.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-5}
repeats=${2:-3}

oha=$(scripts/ensure-oha.sh)
command -v taskset >/dev/null || { echo "load.sh: taskset (util-linux) is needed" >&2; exit 1; }
command -v python3 >/dev/null || { echo "load.sh: python3 is needed" >&2; exit 1; }

profile=${PROFILE:-release}
cargo build --profile "$profile" --locked --bin outpost-webhook --example floor >&2
mkdir -p target/bench
"target/$profile/outpost-webhook" certs --service outpost-webhook --namespace outpost-webhook \
  --san 127.0.0.1 --out target/bench/certs --force >/dev/null

PROFILE="$profile" OHA="$oha" exec python3 bench/load.py "$seconds" "$repeats"
