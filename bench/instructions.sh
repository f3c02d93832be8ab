#!/usr/bin/env bash
# Instructions per review, server side, for outpost-webhook and the floor server, under
# `valgrind --tool=callgrind`: each server gets the same N reviews (the 12 KB Deployment review,
# 16 HTTP/1.1 keep-alive connections, from oha), and the instructions of its whole run less those
# of an idle start and stop are divided by N. Instruction counts do not move with the neighbours
# on a shared machine as CPU time does; the kernel's part is not in them.
#
#   bench/instructions.sh [N=4000]
#
# Needs valgrind, python3 and the binaries of bench/load.sh (PROFILE=release by default;
# WEBHOOK and FLOOR override them; BODY another review file). Only 127.0.0.1 is used.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-4000}
profile=${PROFILE:-release}
webhook=${WEBHOOK:-target/$profile/outpost-webhook}
floor=${FLOOR:-target/$profile/examples/floor}
oha=$(scripts/ensure-oha.sh)
mkdir -p target/bench/callgrind
[ -f target/bench/certs/tls.crt ] || "$webhook" certs --service outpost-webhook \
  --namespace outpost-webhook --san 127.0.0.1 --out target/bench/certs >/dev/null
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cert=target/bench/certs/tls.crt key=target/bench/certs/tls.key

# Runs one server under callgrind, sends `requests` reviews, stops it; prints its instructions.
measure() {
  local kind=$1 requests=$2 p h out pid
  p=$(port) h=$(port) out=target/bench/callgrind/$kind-$requests.out
  if [ "$kind" = webhook ]; then
    valgrind --tool=callgrind --callgrind-out-file="$out" "$webhook" serve --addr "127.0.0.1:$p" \
      --health-addr "127.0.0.1:$h" --tls-cert "$cert" --tls-key "$key" --log-level warn \
      --cluster off --drain-seconds 0 2>/dev/null &
  else
    valgrind --tool=callgrind --callgrind-out-file="$out" "$floor" "127.0.0.1:$p" "$cert" "$key" \
      >/dev/null 2>&1 &
  fi
  pid=$!
  for _ in $(seq 300); do
    python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$p)))" && break
    sleep 0.1
  done
  if [ "$requests" -gt 0 ]; then
    "$oha" -n "$requests" -c 16 -m POST -H 'content-type: application/json' \
      -D "${BODY:-tests/fixtures/admissionreview-public-deployment-create.json}" \
      --cacert target/bench/certs/ca.crt --no-tui "https://127.0.0.1:$p/mutate?timeout=30s" >/dev/null
  fi
  kill -INT "$pid"
  wait "$pid" || true
  sed -n 's/^summary: //p; s/^totals: //p' "$out" | head -n 1
}

declare -A per
for kind in webhook floor; do
  idle=$(measure "$kind" 0)
  busy=$(measure "$kind" "$n")
  per[$kind]=$(( (busy - idle) / n ))
  echo "$kind: $(( busy - idle )) instructions for $n reviews: ${per[$kind]} per review" >&2
done
python3 -c "w, f = ${per[webhook]}, ${per[floor]}; print(f'instructions per review: webhook {w}, floor {f}; webhook/floor {w / f:.2f}x, share {f / w:.2f}')"
