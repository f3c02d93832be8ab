#!/usr/bin/env bash
# Prints the path of an oha binary, building oha 1.16.0 from crates.io into target/bench-tools
# the first time. Used by bench/load.sh and scripts/soak.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
oha=target/bench-tools/bin/oha
if [ ! -x "$oha" ]; then
  echo "ensure-oha: building oha 1.16.0 from crates.io (once)" >&2
  cargo install oha --locked --version 1.16.0 --root target/bench-tools >&2
fi
echo "$PWD/$oha"
