#!/usr/bin/env bash
# Installs (once) LMCache 0.5.6, for the tests that check `switchyard cache-server`
# and `switchyard bench cache` against LMCache's own lm:// client and server.
#
# Everything lives outside the repository clone, under
#   ${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/lmcache/
#     venv/        virtual environment with lmcache 0.5.6 (--no-deps) + sortedcontainers, aiofile, redis
#     downloads/   the lmcache wheel fetched from PyPI
# torch, numpy, transformers, ... are NOT installed again: a `zz_vllm_venv.pth` file in the
# venv's site-packages adds the real-vLLM venv's site-packages (scripts/setup-vllm.sh, or
# $VLLM_PYTHON when already exported) to sys.path. venv/ gets a `.ok` marker (with a
# stamp) only after it was built and checked, so a rerun returns in well under a second
# and needs no network.
#
# Recipe: `pip download --no-deps lmcache==0.5.6`, `pip install --no-deps` of that wheel, the
# .pth above, then `pip install sortedcontainers aiofile redis` (the pure-Python modules its
# lm:// connector and server import that the vLLM venv lacks). The wheel's own requirements
# are not installed: torch comes from the vLLM venv. Wire captures of this version:
# tests/fixtures/lmcache/.
#
# On success the last line on stdout is
#   LMCACHE_PYTHON=<venv python>
# Progress goes to stderr. Any failure exits non-zero with a message.
#
# LMCache's own server: $LMCACHE_PYTHON -m lmcache.v1.server HOST PORT cpu
set -euo pipefail

LMCACHE_VERSION="0.5.6"
EXTRA_PKGS=(sortedcontainers aiofile redis)
# Bump when what goes into venv/ changes, so old caches rebuild.
VENV_STAMP="lmcache==${LMCACHE_VERSION} +${EXTRA_PKGS[*]} vllm-pth v1"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/lmcache"
venv="$root/venv"
downloads="$root/downloads"
lpy="$venv/bin/python"

log() { echo "setup-lmcache: $*" >&2; }
die() { echo "setup-lmcache: ERROR: $*" >&2; exit 1; }
trap 'rc=$?; if ((rc != 0)); then echo "setup-lmcache: FAILED (exit $rc); rerun to retry (finished parts are kept)" >&2; fi' EXIT

marker_ok() { [[ -f "$1/.ok" && "$(cat "$1/.ok" 2>/dev/null)" == "$2" ]]; }

pip_q() {
    # Quiet unless it fails; pip's own output is kept for the error message.
    local out
    if ! out="$("$lpy" -m pip --disable-pip-version-check "$@" 2>&1)"; then
        echo "$out" | tail -40 >&2
        return 1
    fi
}

# The real-vLLM venv's python: $VLLM_PYTHON, or what setup-vllm.sh reports.
vllm_python() {
    if [[ -n "${VLLM_PYTHON:-}" ]]; then
        echo "$VLLM_PYTHON"
        return 0
    fi
    local out
    out="$("$script_dir/setup-vllm.sh")" || return 1
    echo "$out" | sed -n 's/^VLLM_PYTHON=//p' | tail -n1
}

check_imports() {
    "$lpy" -c 'import torch, lmcache, lmcache.v1.protocol, lmcache.v1.server.__main__, lmcache.v1.storage_backend.connector.lm_connector; print("lmcache", lmcache.__version__ if hasattr(lmcache, "__version__") else "?", "torch", torch.__version__)'
}

build_venv() {
    local vpy purelib site
    vpy="$(vllm_python)" || die "scripts/setup-vllm.sh failed (LMCache borrows torch from the vLLM venv)"
    [[ -n "$vpy" && -x "$vpy" ]] || die "no usable VLLM_PYTHON (got '${vpy}')"
    purelib="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
        || die "cannot ask $vpy for its site-packages"
    [[ -d "$purelib" ]] || die "vLLM venv site-packages $purelib is not a directory"

    # Same interpreter version as the vLLM venv (its compiled wheels, torch included,
    # are loaded through the .pth), so build the venv with that venv's base python.
    local base_python
    base_python="$("$vpy" -c 'import sys; print(sys._base_executable)')" \
        || die "cannot find the base interpreter of $vpy"
    log "creating venv at $venv with $base_python ($("$base_python" --version 2>&1))"
    mkdir -p "$root" "$downloads"
    rm -rf "$venv"
    "$base_python" -m venv "$venv" >&2 || die "could not create venv at $venv"
    pip_q install -q --upgrade pip || die "pip upgrade in $venv failed"

    local wheel
    wheel="$(ls "$downloads"/lmcache-"$LMCACHE_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
        log "downloading lmcache==$LMCACHE_VERSION"
        pip_q download -q --no-deps --dest "$downloads" "lmcache==$LMCACHE_VERSION" \
            || die "pip download lmcache==$LMCACHE_VERSION failed"
        wheel="$(ls "$downloads"/lmcache-"$LMCACHE_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
        [[ -n "$wheel" ]] || die "lmcache wheel not found in $downloads after download"
    fi
    log "installing $(basename "$wheel") (--no-deps)"
    pip_q install -q --no-deps "$wheel" || die "pip install of $wheel failed"

    site="$("$lpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
        || die "cannot ask $lpy for its site-packages"
    echo "$purelib" >"$site/zz_vllm_venv.pth"
    log "torch etc. from $purelib (via $site/zz_vllm_venv.pth)"

    log "installing ${EXTRA_PKGS[*]}"
    pip_q install -q "${EXTRA_PKGS[@]}" || die "pip install of ${EXTRA_PKGS[*]} failed"

    log "checking the install imports"
    check_imports >&2 || die "lmcache does not import in $venv"
    echo "$VENV_STAMP" >"$venv/.ok"
}

if ! marker_ok "$venv" "$VENV_STAMP"; then
    # Something to build: serialize concurrent runs (parallel test jobs) on a lock.
    mkdir -p "$root" || die "cannot create $root"
    exec 9>"$root/.lock"
    if command -v flock >/dev/null 2>&1; then
        flock 9 || die "cannot lock $root/.lock"
    fi
    # Another run may have finished the build while we waited for the lock.
    if ! marker_ok "$venv" "$VENV_STAMP"; then
        build_venv
    fi
fi
[[ -x "$lpy" ]] || die "venv python missing at $lpy"

echo "LMCACHE_PYTHON=$lpy"
