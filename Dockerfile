# syntax=docker/dockerfile:1
# outpost-webhook: a glibc binary on distroless/cc (no shell, no package manager), non-root.
#
#   docker build -t ghcr.io/outpost-webhook/outpost-webhook:0.1.0 .
#
# The binary writes nothing at run time when it is given certificate files, so it runs with a
# read-only root filesystem (deploy/base sets readOnlyRootFilesystem: true).

FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and the build directory between builds; the binary is
# copied out because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin outpost-webhook \
 && cp target/release/outpost-webhook /outpost-webhook

# Debian 12's glibc, as in the build stage. 65532 is distroless's `nonroot`.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /outpost-webhook /usr/local/bin/outpost-webhook
USER 65532:65532
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/outpost-webhook"]
CMD ["serve"]
