# syntax=docker/dockerfile:1
# rdev-api container image.
#
#   docker build -t rdev-api .
#   docker run --rm -p 8080:8080 -v rdev-data:/data rdev-api
#
# Stage 1 compiles the dependencies alone against placeholder sources, so that an edit under
# src/ reuses that layer and rebuilds only this crate. Stage 2 is a small Debian with what
# operators use inside the pod (curl, per docs/operations) and tini as PID 1.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
# jemalloc (tikv-jemalloc-sys) builds its bundled C sources with make; gcc comes with the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependency layer: only the manifests and the lockfile, with empty targets in place of the code.
# Cargo reads every workspace member's manifest (and finds its targets) before it builds one
# package, so bench/ and fake-kube/ are here as manifests with empty targets. The image builds
# rdev-api alone; their placeholders stay, and an edit of their code rebuilds nothing here.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
COPY fake-kube/Cargo.toml fake-kube/Cargo.toml
RUN mkdir -p src bench/src/bin fake-kube/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs fake-kube/src/lib.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && echo 'fn main() {}' > bench/src/bin/hello.rs \
    && cargo build --release --locked -p rdev-api --bin rdev-api \
    && rm -rf src

# The real sources. Migrations are embedded at compile time (sqlx::migrate!).
COPY src src
COPY migrations migrations
# The placeholder build left fresher artefacts for this crate than the copied sources' mtimes.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked -p rdev-api --bin rdev-api \
    && cp target/release/rdev-api /usr/local/bin/rdev-api

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# tini reaps orphans: a killed command's grandchildren would stay zombies under a PID 1 that
# does not (STACK.md). curl serves the health check and the runbooks' in-pod commands.
# Versions follow the Debian release pinned above (see .hadolint.yaml for DL3008).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 rdev \
    && useradd --system --uid 10001 --gid rdev --home-dir /data --shell /usr/sbin/nologin rdev \
    && mkdir -p /data \
    && chown rdev:rdev /data

# Not stripped: the server names the functions in its own heap profiles from these line tables,
# so `go tool pprof` reads a profile copied out of the pod without the binary.
COPY --from=build /usr/local/bin/rdev-api /usr/local/bin/rdev-api

# The embedded default keeps its SQLite file on a volume; replicas set DATABASE_URL=postgres://...
ENV RDEV_LISTEN_ADDR=0.0.0.0:8080 \
    DATABASE_URL=sqlite:///data/rdev.db \
    RDEV_LOG_FORMAT=json
VOLUME ["/data"]
WORKDIR /data
EXPOSE 8080
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/health"]

# SIGTERM goes through tini to the server, which drains (RDEV_DRAIN_DELAY_SECS) and lets running
# commands finish (RDEV_SHUTDOWN_GRACE_SECS) before it exits.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/rdev-api"]
