#!/usr/bin/env bash
# The hostile load of issue 12 against a release build of `serve` on 127.0.0.1, with the
# Deployment's flags and a development CA: 256 HTTP/2 streams x 6 MiB bodies (32 connections at
# the server's 8 streams each), idle HTTP/2 connections that send only the preface, bodies sent
# slowly under ?timeout=1000h, and concurrent HTTP/1 bodies just under the body limit. Meanwhile a
# normal review is sent every 100 ms and timed, and the server's RSS is sampled every 100 ms.
#
#   scripts/hostile-load.sh [SECONDS=40]
#
# Prints the peak RSS against budget::worst_case_rss and the Deployment's memory limit, and the
# normal review's latency; exits 1 if the peak reaches either, a normal review takes 100 ms or
# more, or the server panics or dies. A measurement, so a script and never a test. The driver is
# examples/hostile_load.rs; every attacker stops at the deadline and is bounded in count.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-40}
cargo build --release --locked --bin outpost-webhook --example hostile_load >&2
run=target/hostile-load
rm -rf "$run"
mkdir -p "$run"
# Two free loopback ports (another engineer's server may hold the usual ones).
read -r port health < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')
# The Deployment's flags (deploy/base/deployment.yaml) other than its files; --cluster off, as
# there is no cluster here.
target/release/outpost-webhook serve --addr "127.0.0.1:$port" --health-addr "127.0.0.1:$health" \
  --dev-ca-out "$run/dev-ca/ca.crt" --cluster off --drain-seconds 5 --shutdown-grace 10s \
  --request-timeout 5s --log-level warn 2> "$run/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$health/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
status=0
target/release/examples/hostile_load "127.0.0.1:$port" "127.0.0.1:$health" "$run/dev-ca/ca.crt" \
  "$server" "$seconds" || status=$?
echo "server log lines at warn or above: $(wc -l < "$run/server.log")"
exit $status
