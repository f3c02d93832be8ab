#!/usr/bin/env bash
# Builds outpost-webhook's image with buildah and smoke-tests it with podman, with no Docker
# daemon and no base image to pull:
#
#   1. the static binary (scripts/build-static.sh), in its own cargo target dir;
#   2. the image from Dockerfile, tagged localhost/outpost-webhook:dev;
#   3. target/image/outpost-webhook.oci.tar (an OCI archive: `podman load -i`, or
#      `skopeo copy oci-archive:target/image/outpost-webhook.oci.tar docker://REGISTRY/NAME:TAG`);
#   4. its size, uncompressed and as a gzip-compressed layer;
#   5. a smoke test of the image loaded back from that archive, run as a cluster would run it:
#      read-only root, uid 65532, no capabilities, no-new-privileges, certificates from a mounted
#      directory. It checks /readyz, one review through /mutate, the uid and capabilities of the
#      running process, and a clean exit 0 on SIGTERM after the drain.
#
# Run it as root from anywhere: `scripts/image.sh`. It installs buildah, podman and runc (and
# the few other tools it uses) with apt-get when they are missing, and fails if it cannot.
# Every bit of container state (storage, run state, configuration) lives under target/image/,
# never in /var/lib/containers or /etc/containers; the network is loopback only (host network,
# server bound to 127.0.0.1). Re-running it is safe.
set -euo pipefail
cd "$(dirname "$0")/.."
started=${IMAGE_SH_STARTED:-$(date +%s)}

root=$PWD
work=$root/target/image
image=localhost/outpost-webhook:dev
archive=$work/outpost-webhook.oci.tar
container=outpost-webhook-smoke
# Short drain and grace keep the smoke test quick; SIGTERM must end the process within both.
drain=2
grace=5

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'image.sh: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: buildah and podman keep rootful storage under target/image"

# --- Tools -----------------------------------------------------------------------------------
[ -n "${IMAGE_SH_NAMESPACE:-}" ] || log "tools"
declare -A package_of=(
  [buildah]=buildah [podman]=podman [runc]=runc [curl]=curl [jq]=jq [readelf]=binutils
  [gzip]=gzip [python3]=python3 [timeout]=coreutils [git]=git
)
missing=()
for tool in "${!package_of[@]}"; do
  command -v "$tool" >/dev/null || missing+=("${package_of[$tool]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  echo "installing: ${missing[*]}" >&2
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || die "apt-get install ${missing[*]} failed"
fi
for tool in "${!package_of[@]}"; do
  command -v "$tool" >/dev/null || die "$tool is still missing after installing ${package_of[$tool]}"
done
# podman reads the signature policy for `load`; Debian's containers-common ships it.
[ -f /etc/containers/policy.json ] || die "/etc/containers/policy.json is missing (package golang-github-containers-common)"

# --- A private mount namespace --------------------------------------------------------------
# Some state has no setting: containers/image keeps a blob cache in /var/lib/containers/cache
# for root, and runc keeps its state in /run/runc. The rest of this script runs in a private
# mount namespace where /var/lib and /run are overlays whose writes land in target/image/host/,
# so nothing is written outside target/. The container mounts vanish with the namespace too.
if [ "${IMAGE_SH_NAMESPACE:-}" != "$work" ]; then
  command -v unshare >/dev/null || die "unshare (util-linux) is missing"
  IMAGE_SH_NAMESPACE=$work IMAGE_SH_STARTED=$started \
    exec unshare --mount --propagation private -- "$root/scripts/image.sh" "$@"
fi
for dir in /var/lib /run; do
  host=$work/host${dir//\//-}
  mkdir -p "$host/upper" "$host/work"
  mount -t overlay overlay -o "lowerdir=$dir,upperdir=$host/upper,workdir=$host/work" "$dir" \
    || die "cannot mount an overlay on $dir"
done
buildah --version
podman --version
runc --version | head -n 1

# --- Configuration: everything under target/image -------------------------------------------
mkdir -p "$work/storage" "$work/run" "$work/tmp" "$work/networks"
# Overlay needs a filesystem that supports it under target/ (ext4, xfs); vfs works anywhere.
driver=${IMAGE_STORAGE_DRIVER:-overlay}
cat >"$work/storage.conf" <<EOF
# Written by scripts/image.sh: image and container storage for this work tree only.
[storage]
driver = "$driver"
graphroot = "$work/storage"
runroot = "$work/run"
EOF
cat >"$work/containers.conf" <<EOF
# Written by scripts/image.sh.
[containers]
# Podman's defaults ask for more than root may set on this machine.
default_ulimits = ["nofile=16384:16384", "nproc=16384:16384"]
log_driver = "k8s-file"

[engine]
# crun fails on this machine's hybrid cgroup layout; runc works.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$work/run/events.log"
tmp_dir = "$work/run/libpod"

[network]
network_config_dir = "$work/networks"
EOF
cat >"$work/registries.conf" <<EOF
# Written by scripts/image.sh: no registry is ever searched; every name here is localhost/.
unqualified-search-registries = []
short-name-mode = "enforcing"
EOF
export CONTAINERS_CONF=$work/containers.conf
export CONTAINERS_STORAGE_CONF=$work/storage.conf
export CONTAINERS_REGISTRIES_CONF=$work/registries.conf
export TMPDIR=$work/tmp

# A run that was interrupted may have left the smoke container behind (in this private store).
timeout 60 podman rm --force --time 0 --ignore "$container" >/dev/null

# --- The static binary -----------------------------------------------------------------------
log "static binary"
binary=$(scripts/build-static.sh)
ls -l "$binary"
arch=$(basename "$(dirname "$binary")")

# --- The image -------------------------------------------------------------------------------
log "image (buildah)"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then
  revision=$revision-dirty
fi
# The last commit's time as every timestamp in the image: the same tree builds the same image.
timestamp=$(git log -1 --format=%ct 2>/dev/null || echo 0)
timeout 600 buildah build \
  --file Dockerfile \
  --platform "linux/$arch" \
  --build-arg "VERSION=$version" \
  --build-arg "REVISION=$revision" \
  --timestamp "$timestamp" \
  --identity-label=false \
  --format oci \
  --tag "$image" \
  .
built_id=$(podman image inspect --format '{{.Id}}' "$image")
echo "built $image $built_id"

log "OCI archive"
rm -f "$archive"
timeout 300 podman save --format oci-archive --output "$archive" "$image"
ls -l "$archive"

# --- Size ------------------------------------------------------------------------------------
log "size"
extract() { tar --extract --to-stdout --file "$archive" "$1"; }
manifest_digest=$(extract index.json | jq -r '.manifests[0].digest')
manifest=$(extract "blobs/sha256/${manifest_digest#sha256:}")
[ "$(jq '.layers | length' <<<"$manifest")" = 1 ] || die "expected one layer: $manifest"
layer_digest=$(jq -r '.layers[0].digest' <<<"$manifest")
layer_type=$(jq -r '.layers[0].mediaType' <<<"$manifest")
layer_blob=blobs/sha256/${layer_digest#sha256:}
case "$layer_type" in
  *tar+gzip) gz_bytes=$(extract "$layer_blob" | wc -c)
             tar_bytes=$(extract "$layer_blob" | gzip -dc | wc -c) ;;
  *tar) tar_bytes=$(extract "$layer_blob" | wc -c)
        gz_bytes=$(extract "$layer_blob" | gzip -9 -n | wc -c) ;;
  *) die "unexpected layer media type $layer_type" ;;
esac
image_bytes=$(podman image inspect --format '{{.Size}}' "$image")
binary_bytes=$(stat -c %s "$binary")
archive_bytes=$(stat -c %s "$archive")
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }
echo "layer contents:"
extract "$layer_blob" | { [ "${layer_type%+gzip}" = "$layer_type" ] && cat || gzip -dc; } \
  | tar --list --verbose --numeric-owner --file - | sed 's/^/  /'
printf 'binary:                    %10d bytes (%s)\n' "$binary_bytes" "$(mib "$binary_bytes")"
printf 'image, uncompressed:       %10d bytes (%s)\n' "$image_bytes" "$(mib "$image_bytes")"
printf 'layer, uncompressed tar:   %10d bytes (%s)\n' "$tar_bytes" "$(mib "$tar_bytes")"
printf 'layer, gzip -9:            %10d bytes (%s)\n' "$gz_bytes" "$(mib "$gz_bytes")"
printf 'oci archive:               %10d bytes (%s)\n' "$archive_bytes" "$(mib "$archive_bytes")"

# --- Smoke test ------------------------------------------------------------------------------
log "smoke test: load the archive"
# Remove the built image and load it back, so what runs below is what the archive holds.
timeout 60 podman rmi --force "$image" >/dev/null
load_out=$(timeout 300 podman load --input "$archive")
echo "$load_out"
loaded_id=$(podman image inspect --format '{{.Id}}' "$image") \
  || die "podman load did not bring back $image"
[ "$loaded_id" = "$built_id" ] || die "loaded image $loaded_id is not the built $built_id"
[ "$(podman image inspect --format '{{.Config.User}}' "$image")" = 65532:65532 ] \
  || die "the image's user is not 65532:65532"
podman image inspect --format '{{json .Config.Labels}}' "$image" | jq -e \
  --arg v "$version" --arg r "$revision" \
  '.["org.opencontainers.image.version"] == $v and .["org.opencontainers.image.revision"] == $r
   and .["org.opencontainers.image.licenses"] == "Apache-2.0"
   and (.["org.opencontainers.image.source"] | startswith("https://"))' >/dev/null \
  || die "OCI labels missing or wrong"

smoke=$work/smoke
rm -rf "$smoke"
mkdir -p "$smoke"
chown 65532:65532 "$smoke"
# The flags a cluster applies (deploy/base/deployment.yaml): no writable root, not even the
# tmpfs podman adds by default, uid 65532, no capabilities, no privilege gain.
hardened=(--read-only --read-only-tmpfs=false --user 65532:65532 --cap-drop ALL
  --security-opt no-new-privileges)

log "smoke test: certs (in the image, no network)"
timeout 60 podman run --rm --network none "${hardened[@]}" --volume "$smoke:/out" "$image" \
  certs --service outpost-webhook --namespace outpost-webhook \
  --san 127.0.0.1 --san localhost --out /out/certs
for f in ca.crt tls.crt tls.key; do [ -s "$smoke/certs/$f" ] || die "certs wrote no $f"; done
ls -ln "$smoke/certs"

# Two free loopback ports, chosen by the kernel.
read -r port health_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

cleanup() {
  status=$?
  if [ "$status" != 0 ] && podman container exists "$container" 2>/dev/null; then
    echo "--- $container logs" >&2
    timeout 30 podman logs "$container" >&2 || true
  fi
  timeout 60 podman rm --force --time 0 --ignore "$container" >/dev/null 2>&1 || true
}
trap cleanup EXIT

log "smoke test: serve on 127.0.0.1:$port (TLS) and 127.0.0.1:$health_port (health)"
timeout 60 podman run --detach --name "$container" --network host "${hardened[@]}" \
  --volume "$smoke/certs:/tls:ro" "$image" \
  serve --addr "127.0.0.1:$port" --health-addr "127.0.0.1:$health_port" \
  --tls-cert /tls/tls.crt --tls-key /tls/tls.key \
  --drain-seconds "$drain" --shutdown-grace "${grace}s" >/dev/null

readyz() { curl --silent --output /dev/null --write-out '%{http_code}' --max-time 2 \
  "http://127.0.0.1:$health_port/readyz" || true; }
deadline=$(($(date +%s) + 30))
for ((i = 1; ; i++)); do
  code=$(readyz)
  [ "$code" = 200 ] && break
  [ "$(podman inspect --format '{{.State.Status}}' "$container")" = running ] \
    || die "the container stopped before it was ready"
  [ "$i" -lt 150 ] && [ "$(date +%s)" -lt "$deadline" ] || die "/readyz never answered 200 (last: $code)"
  sleep 0.2
done
echo "/readyz: 200 after $i tries"

log "smoke test: the process"
pid=$(podman inspect --format '{{.State.Pid}}' "$container")
[ "$pid" -gt 0 ] || die "no pid for $container"
status_file=$(cat "/proc/$pid/status")
grep -E '^(Name|Uid|Gid|Groups|NoNewPrivs|Cap(Inh|Prm|Eff|Bnd|Amb)):' <<<"$status_file"
field() { awk -v k="$1:" '$1 == k { $1 = ""; sub(/^ +/, ""); print }' <<<"$status_file"; }
[ "$(field Uid)" = "65532 65532 65532 65532" ] || die "the process's uids are $(field Uid)"
[ "$(field Gid)" = "65532 65532 65532 65532" ] || die "the process's gids are $(field Gid)"
for cap in CapInh CapPrm CapEff CapBnd CapAmb; do
  [ "$(field "$cap")" = 0000000000000000 ] || die "$cap is $(field "$cap"), not empty"
done
[ "$(field NoNewPrivs)" = 1 ] || die "no_new_privs is not set"
root_options=$(awk '$5 == "/" { print $6 }' "/proc/$pid/mountinfo" | tail -n 1)
echo "root mount options: $root_options"
[[ ",$root_options," == *,ro,* ]] || die "the root filesystem is mounted $root_options, not ro"

log "smoke test: one review through /mutate"
# A Deployment: its fix needs no view of the cluster, which the smoke test has none of.
review=tests/golden/embedded-deployment-create/review.json
code=$(curl --silent --show-error --max-time 10 --cacert "$smoke/certs/ca.crt" \
  --header 'Content-Type: application/json' --data-binary "@$review" \
  --output "$smoke/response.json" --write-out '%{http_code}' \
  "https://127.0.0.1:$port/mutate?timeout=10s") || die "POST /mutate failed"
[ "$code" = 200 ] || die "/mutate answered $code: $(head -c 500 "$smoke/response.json")"
jq -e --arg uid "$(jq -r .request.uid "$review")" \
  '.response.uid == $uid and .response.allowed == true and .response.patchType == "JSONPatch"
   and (.response.patch | type == "string" and length > 0)' "$smoke/response.json" >/dev/null \
  || die "the review came back unpatched: $(head -c 500 "$smoke/response.json")"
ops=$(jq -r .response.patch "$smoke/response.json" | base64 --decode | jq -c 'map(.op + " " + .path)')
[ "$ops" != "[]" ] || die "the patch is empty"
echo "/mutate: 200, patched: $ops"

log "smoke test: SIGTERM"
stop_timeout=$((drain + grace + 5))
t0=$(date +%s%N)
timeout $((stop_timeout + 30)) podman stop --time "$stop_timeout" "$container" >/dev/null &
stopper=$!
# Readiness fails at once on SIGTERM, while requests are still served during the drain.
deadline=$(($(date +%s) + drain + 1))
for ((i = 1; i <= 50 && $(date +%s) < deadline; i++)); do
  code=$(readyz)
  [ "$code" != 200 ] && break
  sleep 0.1
done
echo "/readyz after SIGTERM: $code"
[ "$code" = 503 ] || die "/readyz did not fail during the drain (last: $code)"
wait "$stopper" || die "podman stop failed"
elapsed_ms=$((($(date +%s%N) - t0) / 1000000))
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
echo "exited $exit_code after ${elapsed_ms} ms (drain ${drain}s, grace ${grace}s, stop timeout ${stop_timeout}s)"
[ "$exit_code" = 0 ] || die "exit code $exit_code on SIGTERM, not 0"
[ "$elapsed_ms" -ge $((drain * 1000)) ] || die "it exited before the ${drain}s drain"
[ "$elapsed_ms" -lt $(((drain + grace) * 1000)) ] || die "it took longer than drain + grace"
echo "--- last log lines"
timeout 30 podman logs "$container" 2>&1 | tail -n 6

log "image.sh: passed in $(($(date +%s) - started)) s"
printf '%s %s\n%s\nimage %s bytes uncompressed, layer %s bytes gzip-compressed\n' \
  "$image" "$built_id" "$archive" "$image_bytes" "$gz_bytes"
