# outpost-webhook's image: the static binary FROM scratch, plus /etc/passwd and /etc/group naming
# uid/gid 65532 (nonroot). Nothing else: no shell, no libc, no CA bundle (the webhook calls out
# to nothing; it only serves).
#
# The binary is built before the image, not inside it, so no stage pulls a base image and the
# same file serves both builders:
#
#   local:   scripts/image.sh   (cargo builds target/image/bin/amd64/outpost-webhook with the
#                                `dist` profile, then `buildah build` runs this file)
#   release: .github/workflows/release.yml (one static binary per arch on native runners, then
#            `docker buildx build --platform linux/amd64,linux/arm64` runs this file; buildx
#            sets TARGETARCH for each platform and copies that arch's binary)
#
# There is no `# syntax=` line: the builder's own Dockerfile frontend reads this file, so the
# release pulls no frontend image either.
#
# Any builder works the same way: put a static linux binary for each arch at
# target/image/bin/<arch>/outpost-webhook (scripts/build-static.sh does it), then build with
# TARGETARCH set (buildx and buildah set it from --platform). .dockerignore lets only those
# files into the context.

FROM scratch

ARG TARGETARCH
ARG VERSION=0.0.0-dev
ARG REVISION=unknown
ARG SOURCE=https://github.com/outpost-webhook/outpost-webhook

LABEL org.opencontainers.image.title="outpost-webhook" \
      org.opencontainers.image.description="Kubernetes mutating admission webhook that fixes authentik outpost Services and Deployments" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY image/etc/passwd image/etc/group /etc/
COPY target/image/bin/${TARGETARCH}/outpost-webhook /usr/local/bin/outpost-webhook

# 65532 is nonroot in image/etc/passwd; deploy/base sets the same uid and gid.
USER 65532:65532
# 8443: admission on TLS; 8080: /healthz, /readyz and /metrics on plain HTTP.
EXPOSE 8443 8080
ENTRYPOINT ["/usr/local/bin/outpost-webhook"]
CMD ["serve"]
