#!/usr/bin/env bash
# Runs both fuzz targets for SECONDS each, side by side (one per core), and prints executions and
# coverage. Installs cargo-fuzz into target/bench-tools if needed. libFuzzer needs nightly
# flags; RUSTC_BOOTSTRAP=1 lets this stable toolchain accept them.
#
#   scripts/fuzz.sh [SECONDS=60]
#
# A crash is saved under fuzz/artifacts/<target>/; turn it into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
export RUSTC_BOOTSTRAP=1
tools=$PWD/target/bench-tools/bin
if [ ! -x "$tools/cargo-fuzz" ]; then
  cargo install cargo-fuzz --locked --version 0.13.2 --root target/bench-tools >&2
fi
export PATH="$tools:$PATH"

# Seed the request-path target with every golden review and the shared fixtures' reviews.
mkdir -p fuzz/corpus/review fuzz/corpus/object target/fuzz-logs
for f in tests/golden/*/review.json tests/fixtures/admissionreview-*.json; do
  cp "$f" "fuzz/corpus/review/seed-$(echo "$f" | tr '/' '_')"
done

for target in review object; do cargo fuzz build --release "$target" >&2; done
status=0
for target in review object; do
  cargo fuzz run --release "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    > "target/fuzz-logs/$target.log" 2>&1 &
done
for job in $(jobs -p); do wait "$job" || status=1; done

for target in review object; do
  log=target/fuzz-logs/$target.log
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 || true)
  corpus=$(ls "fuzz/corpus/$target" | wc -l)
  crash=$(grep -cE 'ERROR: libFuzzer|panicked' "$log" || true)
  echo "$target: ${seconds}s, $runs executions, $cov, corpus $corpus inputs, crashes $crash"
done
exit $status
