# syntax=docker/dockerfile:1
#
# strom container image.
#
# UNTESTED: no container engine runs on the machine this file was written
# on, so this image has never been built. Expect to fix small things the
# first time `docker build .` runs.
#
# The cache mounts below need BuildKit (the default builder of Docker 23+;
# `podman build` and `buildah` understand them too). They keep the cargo
# registry and the target directory between builds, so a source change does
# not download and recompile every dependency again.
#
#   docker build -t strom .
#   docker run --rm -p 8000:8000 strom
#
# build.rs compiles the .proto file with protox (pure Rust): no protoc needed.

# ---- builder --------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The target directory is a cache mount and is gone after this step, so the
# binary is copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/strom /usr/local/bin/strom

# ---- runtime --------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A system user with no shell and no home: strom needs neither.
RUN useradd --system --uid 10001 --user-group --no-create-home \
        --shell /usr/sbin/nologin strom
COPY --from=builder /usr/local/bin/strom /usr/local/bin/strom
USER strom
# One port for gRPC, gRPC-Web, WebSocket, SSE and REST.
EXPOSE 8000
ENTRYPOINT ["strom"]
CMD ["serve", "--listen", "0.0.0.0:8000"]
