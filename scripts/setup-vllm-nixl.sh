#!/usr/bin/env bash
# Adds NIXL (PyPI `nixl` 1.5.1) to the real-vLLM venv from scripts/setup-vllm.sh, so two
# vLLM CPU engines can do prefill/decode disaggregation with vLLM's NixlConnector
# (KV blocks pulled over UCX on loopback). Captures and the recipe:
# tests/fixtures/vllm-pd/README.md.
#
# Installs into ${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/vllm/venv (the same venv; runs
# setup-vllm.sh first, or uses $VLLM_PYTHON when already exported). The `nixl` wheel is a
# meta package: it pulls `nixl-cu12` and `nixl-cu13` (~250 MB together, bundled UCX), and
# at import picks the one matching torch's CUDA build (13 here); both run without a GPU,
# the UCX backend works on plain host memory. The venv gets a `.nixl-ok` marker (with a
# stamp) only after `nixl._api` imported and a UCX agent was created, so a rerun returns
# in well under a second and needs no network.
#
# On success the last lines on stdout are
#   VLLM_PYTHON=<venv python>
#   VLLM_MODEL_DIR=<model folder>
#   VLLM_GGUF=<gguf>
#   NIXL_VERSION=1.5.1
# Progress (and what was done) goes to stderr. Any failure exits non-zero with a message.
#
# Serve a prefill or decode engine with (distinct HTTP and side-channel ports per engine,
# and on a small box one core each: NIXL's UCX thread busy-polls, see the README):
#   HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0 \
#   VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT=5601 \
#   $VLLM_PYTHON -m vllm.entrypoints.openai.api_server --model $VLLM_MODEL_DIR \
#     --served-model-name smollm2 --host 127.0.0.1 --port 18201 --max-model-len 2048 \
#     --enable-prefix-caching --enforce-eager \
#     --kv-transfer-config '{"kv_connector":"NixlConnector","kv_role":"kv_both","kv_buffer_device":"cpu"}'
set -euo pipefail

NIXL_VERSION="1.5.1"
# Bump when what goes into the venv changes, so old markers are redone.
NIXL_STAMP="nixl==${NIXL_VERSION} v1"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/vllm"

log() { echo "setup-vllm-nixl: $*" >&2; }
die() { echo "setup-vllm-nixl: ERROR: $*" >&2; exit 1; }
trap 'rc=$?; if ((rc != 0)); then echo "setup-vllm-nixl: FAILED (exit $rc); rerun to retry" >&2; fi' EXIT

# The vLLM venv (and model) first: setup-vllm.sh is idempotent and prints the paths.
vllm_out="$(bash "$script_dir/setup-vllm.sh")" || die "scripts/setup-vllm.sh failed"
vpy="$(sed -n 's/^VLLM_PYTHON=//p' <<<"$vllm_out" | tail -n1)"
[[ -x "$vpy" ]] || die "no VLLM_PYTHON from setup-vllm.sh"
venv="$(cd "$(dirname "$vpy")/.." && pwd)"
marker="$venv/.nixl-ok"

check_nixl() {
    # Import the way vLLM does (nixl._api.nixl_agent) and create a UCX agent on host memory.
    "$vpy" - <<'PY'
import logging
logging.disable(logging.WARNING)
from importlib.metadata import version
from nixl._api import nixl_agent, nixl_agent_config
agent = nixl_agent("setup-vllm-nixl-check", nixl_agent_config(num_threads=0))
assert "UCX" in agent.get_plugin_list(), agent.get_plugin_list()
assert "UCX" in agent.backends, "UCX backend not instantiated"
print("nixl", version("nixl"), "UCX backend ok")
PY
}

if [[ -f "$marker" && "$(cat "$marker" 2>/dev/null)" == "$NIXL_STAMP" ]]; then
    log "nixl==$NIXL_VERSION already in $venv (marker $marker)"
else
    exec 9>"$root/.nixl-lock"
    if command -v flock >/dev/null 2>&1; then
        flock 9 || die "cannot lock $root/.nixl-lock"
    fi
    have="$("$vpy" -c 'from importlib.metadata import version; print(version("nixl"))' 2>/dev/null || true)"
    if [[ "$have" == "$NIXL_VERSION" ]]; then
        log "nixl==$NIXL_VERSION already installed in $venv; checking it"
    else
        log "installing nixl==$NIXL_VERSION into $venv (pulls nixl-cu12 + nixl-cu13, ~250 MB)"
        out="$("$vpy" -m pip --disable-pip-version-check install "nixl==$NIXL_VERSION" 2>&1)" || {
            echo "$out" | tail -40 >&2
            die "pip install nixl==$NIXL_VERSION failed"
        }
        log "installed: $(echo "$out" | grep -E '^Successfully installed' || echo 'nothing new')"
    fi
    check_out="$(check_nixl 2>&1)" || { echo "$check_out" | tail -20 >&2; die "nixl does not work in $venv"; }
    log "check: $(echo "$check_out" | tail -n1)"
    echo "$NIXL_STAMP" >"$marker"
fi

echo "$vllm_out"
echo "NIXL_VERSION=$NIXL_VERSION"
