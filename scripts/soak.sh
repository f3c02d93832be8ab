#!/usr/bin/env bash
# Soak: a steady rate of admission requests over TLS for DURATION seconds (default 600), with
# the server's RSS and open file descriptors sampled every 10 s. Every response must be a 200.
# Only 127.0.0.1 is used; oha's rate limit and -z bound the run.
#
#   scripts/soak.sh [SECONDS=600] [RATE=2000]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-600}
rate=${2:-2000}
oha=$(scripts/ensure-oha.sh)
cargo build --release --locked --bin outpost-webhook >&2
mkdir -p target/soak
target/release/outpost-webhook certs --san 127.0.0.1 --out target/soak/certs >/dev/null
target/release/outpost-webhook serve --addr 127.0.0.1:18443 --health-addr 127.0.0.1:18080 \
  --tls-cert target/soak/certs/tls.crt --tls-key target/soak/certs/tls.key --log-level warn \
  2> target/soak/server.log &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 0.5

# 16 keep-alive connections at a fixed rate, as a busy apiserver would send.
"$oha" -z "${duration}s" -q "$rate" -c 16 -m POST -H 'content-type: application/json' \
  -D tests/fixtures/admissionreview-public-deployment-create.json \
  --cacert target/soak/certs/ca.crt --no-tui --output-format json \
  "https://127.0.0.1:18443/mutate?timeout=10s" > target/soak/oha.json &
load=$!

echo "seconds rss_kib fds"
start=$(date +%s)
while kill -0 "$load" 2>/dev/null; do
  now=$(( $(date +%s) - start ))
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$server/status")
  fds=$(ls "/proc/$server/fd" | wc -l)
  echo "$now $rss $fds"
  [ "$now" -gt $((duration + 60)) ] && break
  sleep 10
done
wait "$load"
python3 - <<'PY'
import json
d = json.load(open("target/soak/oha.json"))
codes = d["statusCodeDistribution"]
errors = {k: v for k, v in d["errorDistribution"].items() if k != "aborted due to deadline"}
total = sum(codes.values())
print(f"requests {total}, statuses {codes}, errors {errors or 'none'}, "
      f"rate {d['summary']['requestsPerSec']:.0f}/s, p99 {d['latencyPercentiles']['p99']*1000:.3f} ms")
assert set(codes) == {"200"} and not errors, "some responses were not 200"
PY
echo "server log lines at warn or above: $(wc -l < target/soak/server.log)"
