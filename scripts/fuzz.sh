#!/usr/bin/env bash
# Runs the fuzz targets for SECONDS each, two side by side (one per core), and prints executions
# and coverage. Installs cargo-fuzz into target/bench-tools if needed. libFuzzer needs nightly
# flags; RUSTC_BOOTSTRAP=1 lets this stable toolchain accept them.
#
#   scripts/fuzz.sh [SECONDS=60] [TARGET...]     # TARGETs: review object duration (default: all)
#
# A crash is saved under fuzz/artifacts/<target>/; turn it into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(review object duration)
export RUSTC_BOOTSTRAP=1
tools=$PWD/target/bench-tools/bin
if [ ! -x "$tools/cargo-fuzz" ]; then
  cargo install cargo-fuzz --locked --version 0.13.2 --root target/bench-tools >&2
fi
export PATH="$tools:$PATH"

# Seed the request-path target with every golden review and the shared fixtures' reviews.
mkdir -p fuzz/corpus/review fuzz/corpus/object fuzz/corpus/duration target/fuzz-logs
for f in tests/golden/*/review.json tests/fixtures/admissionreview-*.json; do
  cp "$f" "fuzz/corpus/review/seed-$(echo "$f" | tr '/' '_')"
done
# The duration target starts from what the apiserver and the CLI write, and from the inputs that
# once overflowed.
i=0
for d in 10s 1m0s 500ms 1.5h 2h45m30.5s 1us 1µs 7ns .5s 5.s 1000h \
  18000000000000000000s18000000000000000000s 1e400s 99999999999999999999h; do
  printf '%s' "$d" > "fuzz/corpus/duration/seed-$i"
  i=$((i + 1))
done

for target in "${targets[@]}"; do cargo fuzz build --release "$target" >&2; done
status=0
running=0
for target in "${targets[@]}"; do
  # Two at a time: one per core.
  if [ "$running" -ge 2 ]; then wait -n || status=1; running=$((running - 1)); fi
  cargo fuzz run --release "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    > "target/fuzz-logs/$target.log" 2>&1 &
  running=$((running + 1))
done
for job in $(jobs -p); do wait "$job" || status=1; done

for target in "${targets[@]}"; do
  log=target/fuzz-logs/$target.log
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
  corpus=$(ls "fuzz/corpus/$target" | wc -l)
  crash=$(grep -cE 'ERROR: libFuzzer|panicked' "$log" || true)
  echo "$target: ${seconds}s, $runs executions, $cov, corpus $corpus inputs, crashes $crash"
done
exit $status
