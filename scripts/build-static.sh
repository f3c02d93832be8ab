#!/usr/bin/env bash
# Builds outpost-webhook as one static linux binary for this machine's arch, for the image, with
# the `dist` profile (fat LTO, one codegen unit; Cargo.toml says why it is not `release`):
#
#   scripts/build-static.sh            -> target/image/bin/<arch>/outpost-webhook
#
# <arch> is Debian's and Docker's name (amd64, arm64), the TARGETARCH the Dockerfile copies by.
# glibc static-pie: RUSTFLAGS=+crt-static with an explicit --target, so the flag reaches the
# binary and not build scripts or proc-macros. The build has its own CARGO_TARGET_DIR under
# target/image/ so it does not invalidate the normal debug and release builds.
#
# Environment:
#   CARGO_BUILD_SUBCOMMAND  `build` (default) or `auditable build` (cargo-auditable, which the
#                           release uses so SBOM scanners can read the crate list from the binary)
#
# The binary never resolves host names (it binds and serves IP addresses only), so glibc's NSS,
# which a static glibc cannot load, is never used.
set -euo pipefail
cd "$(dirname "$0")/.."

case "$(uname -m)" in
  x86_64) arch=amd64 triple=x86_64-unknown-linux-gnu ;;
  aarch64 | arm64) arch=arm64 triple=aarch64-unknown-linux-gnu ;;
  *) echo "build-static: unsupported machine $(uname -m)" >&2; exit 1 ;;
esac

out=target/image/bin/$arch
cargo_dir=target/image/cargo
read -r -a subcommand <<<"${CARGO_BUILD_SUBCOMMAND:-build}"

# strip=symbols: the image carries no debugger; panics still print their message and location.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
CARGO_TARGET_DIR=$cargo_dir \
CARGO_PROFILE_DIST_STRIP=symbols \
  cargo "${subcommand[@]}" --profile dist --locked --bin outpost-webhook --target "$triple" >&2

bin=$cargo_dir/$triple/dist/outpost-webhook
# Static means no program interpreter and no shared-library dependencies.
elf=$(readelf --wide --program-headers --dynamic "$bin")
if grep -q -e INTERP -e '(NEEDED)' <<<"$elf"; then
  echo "build-static: $bin is not static:" >&2
  echo "$elf" >&2
  exit 1
fi
mkdir -p "$out"
install -m 0755 "$bin" "$out/outpost-webhook"
echo "$out/outpost-webhook"
