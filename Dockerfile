# syntax=docker/dockerfile:1
# Build stage: compile the binary (the `dist` profile: release with thin LTO) with the locked
# dependency versions, optimised by profile (`benches/pgo.sh`).
FROM rust:1.95-slim-bookworm AS build
# jemalloc (the service's allocator) is built from C with make, which the slim image lacks.
# The profile-guided build runs the service under wrk and curl, and merges its counts with
# the llvm-profdata of rustc's own LLVM (22 for Rust 1.95, from bookworm-security).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make wrk curl llvm-22 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY config.example.toml ./
# Built instrumented, run on loopback through the cached paths clients use most, then built
# again with what that run counted: about a quarter fewer instructions per cached request.
RUN benches/pgo.sh

# Runtime stage: the binary, CA certificates for TLS to backends, the sample extensions.
FROM debian:bookworm-slim
# Package versions follow the Debian release pinned by the base image tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin registry
WORKDIR /app
COPY --from=build /src/target/pgo/service/use/dist/extension-registry /usr/local/bin/extension-registry
COPY config.example.toml /app/config.toml
COPY tests/fixtures/extensions /app/tests/fixtures/extensions
USER 10001
EXPOSE 8082
ENV EXTENSION_REGISTRY_CONFIG=/app/config.toml
# The image has no curl: the binary checks /livez itself.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/extension-registry", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/extension-registry"]
