#!/usr/bin/env bash
# Where the server's CPU goes while it reviews: `perf record` of `serve` pinned to core 0 while
# oha on core 1 posts the 12 KB Deployment review over 16 HTTP/1.1 keep-alive connections, then
# the samples grouped as the issue counts them: JSON parse and serialise, the allocator, TLS,
# the kernel, the rest.
#
#   bench/profile.sh [SECONDS=10]
#
# Needs perf (linux-perf, as root or with kernel.perf_event_paranoid <= 1), taskset, python3 and
# the binaries of bench/load.sh (PROFILE=release by default; WEBHOOK overrides the server).
# Prints the table; the raw samples stay in target/bench/perf.data. Only 127.0.0.1 is used.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
profile=${PROFILE:-release}
webhook=${WEBHOOK:-target/$profile/outpost-webhook}
oha=$(scripts/ensure-oha.sh)
command -v perf >/dev/null || { echo "profile.sh: perf is needed" >&2; exit 1; }
[ -x "$webhook" ] || cargo build --profile "$profile" --locked --bin outpost-webhook >&2
mkdir -p target/bench
[ -f target/bench/certs/tls.crt ] || "$webhook" certs --service outpost-webhook \
  --namespace outpost-webhook --san 127.0.0.1 --out target/bench/certs >/dev/null
read -r port health < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')
taskset -c 0 "$webhook" serve --addr "127.0.0.1:$port" --health-addr "127.0.0.1:$health" \
  --tls-cert target/bench/certs/tls.crt --tls-key target/bench/certs/tls.key \
  --log-level warn --cluster off 2>/dev/null &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$health/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
taskset -c 1 "$oha" -z "$((seconds + 2))s" -c 16 -m POST -H 'content-type: application/json' \
  -D tests/fixtures/admissionreview-public-deployment-create.json \
  --cacert target/bench/certs/ca.crt --no-tui \
  "https://127.0.0.1:$port/mutate?timeout=10s" >/dev/null &
load=$!
sleep 1
perf record -q -F 2999 -p "$server" -o target/bench/perf.data -- sleep "$seconds" 2>/dev/null
wait $load
perf report -i target/bench/perf.data --no-children --sort dso,sym --stdio 2>/dev/null \
  | python3 -c '
import re, sys
groups = {"JSON parse and serialise": 0.0, "allocator (malloc/free)": 0.0, "TLS": 0.0,
          "kernel": 0.0, "the rest": 0.0}
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
    if not m:
        continue
    pct, dso, where, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
    if where == "k" or dso.startswith("[kernel"):
        g = "kernel"
    elif re.search(r"malloc|free|realloc|calloc|\bmi_|_mi_|mimalloc|memalign|tcache|arena", sym):
        g = "allocator (malloc/free)"
    elif re.search(r"serde_json|serde_core|serde::|prune::|::admission::|json_patch|base64|ser::Serializer", sym):
        g = "JSON parse and serialise"
    elif re.search(r"rustls|ring_core|ring::|aes|gcm|chacha|sha256|GFp|aws_lc", sym, re.I):
        g = "TLS"
    else:
        g = "the rest"
    groups[g] += pct
total = sum(groups.values()) or 1
print("| where | share of server CPU |")
print("|---|---|")
for g, v in groups.items():
    print(f"| {g} | {100 * v / total:.1f} % |")
'
