#!/usr/bin/env bash
# The project's one test command: builds the binary, runs the Rust tests, then
# the Python suite (official openai client + Prometheus parser) against the
# built binary, the router in front of two real vLLM engines on CPU, and the
# cache server against LMCache's own lm:// client and server.
# Exits non-zero on any failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

echo "==> cargo build"
cargo build

echo "==> cargo test --workspace"
cargo test --workspace

echo "==> python test environment"
venv="$("$root/scripts/setup-test-env.sh")"
prom_env="$("$root/scripts/setup-prometheus.sh")"; export $prom_env  # PROMETHEUS_BIN, PROMTOOL_BIN
redis_env="$("$root/scripts/setup-redis.sh")"; export $redis_env     # REDIS_SERVER_BIN

echo "==> real vLLM, with NIXL for prefill/decode (cached under ~/.cache/switchyard/vllm; minutes on the first run)"
vllm_env="$("$root/scripts/setup-vllm-nixl.sh" | grep -E '^VLLM_(PYTHON|MODEL_DIR|GGUF)=')"
export $vllm_env

echo "==> LMCache (cached under ~/.cache/switchyard/lmcache; borrows torch from the vLLM venv)"
lmcache_env="$("$root/scripts/setup-lmcache.sh" | grep -E '^LMCACHE_PYTHON=')"
export $lmcache_env

echo "==> pytest tests/python"
bin="${SWITCHYARD_BIN:-$root/target/debug/switchyard}"
SWITCHYARD_BIN="$bin" "$venv/bin/python" -m pytest -q --durations=20 "$root/tests/python" "$@"
