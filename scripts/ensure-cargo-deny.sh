#!/usr/bin/env bash
# Prints the path of a cargo-deny binary, building it from crates.io into target/tools the first
# time (only when missing). Used for `cargo deny check licenses bans sources` (deny.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
deny=target/tools/bin/cargo-deny
if [ ! -x "$deny" ]; then
  echo "ensure-cargo-deny: building cargo-deny 0.20.2 from crates.io (once)" >&2
  cargo install --locked cargo-deny --version 0.20.2 --root target/tools >&2
fi
echo "$PWD/$deny"
