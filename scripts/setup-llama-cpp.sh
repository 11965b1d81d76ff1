#!/usr/bin/env bash
# Builds llama.cpp's reference tools (llama-server, llama-simple, llama-tokenize,
# llama-quantize) once, from the llama.cpp sources vendored in PyPI's `llama-cpp-python`
# sdist (pinned below), with PyPI's `cmake` and `ninja`: CPU only, Release, static
# libraries, -DGGML_NATIVE=ON (a local reference, not a portable build) but without AMX:
# on this machine's VM the AMX tiles fault (`ldtilecfg`, SIGSEGV in
# ggml_backend_amx_mul_mat on Gemma's K-quants), so -mno-amx-* keeps ggml off them.
# Used by the tokenizer and model fixtures (scripts/record-tokenizer-fixture.sh) and by
# bench/engine-cpu.sh's `llama-server` target.
#
# Result: $CACHE/llama.cpp/<version>/bin/ with a `.ok` marker beside it. Idempotent: with
# the marker present it only prints. On stdout exactly
#   LLAMA_CPP_BIN=<dir>
# Env: SWITCHYARD_CACHE (default ~/.cache/switchyard), LLAMA_CPP_PY_VERSION (default
# below), JOBS (parallel compile jobs, default nproc), KEEP_BUILD=1 (keep the build tree).
set -euo pipefail

VERSION=${LLAMA_CPP_PY_VERSION:-0.3.36}
CACHE=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
DIR=$CACHE/llama.cpp/$VERSION
BIN=$DIR/bin
TOOLS=(llama-server llama-simple llama-tokenize llama-quantize)
NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
# What the build is; a marker from another configuration means build again.
CONFIG="llama-cpp-python $VERSION; Release; GGML_NATIVE=ON; $NOAMX; ${TOOLS[*]}"

log() { echo "setup-llama-cpp: $*" >&2; }
die() { echo "setup-llama-cpp: ERROR: $*" >&2; exit 1; }

if [[ -f "$DIR/.ok" && "$(cat "$DIR/.ok")" == "$CONFIG" ]]; then
    for t in "${TOOLS[@]}"; do [[ -x "$BIN/$t" ]] || die "$DIR/.ok exists but $BIN/$t is missing; remove $DIR and rerun"; done
    echo "LLAMA_CPP_BIN=$BIN"
    exit 0
fi

command -v python3 >/dev/null || die "python3 not found"
command -v c++ >/dev/null || die "no C++ compiler (c++) found"
mkdir -p "$DIR"
# One build at a time for this version.
exec 9>"$DIR/.lock"
flock 9
if [[ -f "$DIR/.ok" && "$(cat "$DIR/.ok")" == "$CONFIG" ]]; then echo "LLAMA_CPP_BIN=$BIN"; exit 0; fi
rm -f "$DIR/.ok"

# Build tools from PyPI in their own venv.
VENV=$DIR/tools-venv
if [[ ! -x "$VENV/bin/cmake" || ! -x "$VENV/bin/ninja" ]]; then
    log "installing cmake and ninja from PyPI into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV" || die "python3 -m venv failed"
    "$VENV/bin/pip" install -q cmake ninja >"$DIR/pip-tools.log" 2>&1 ||
        die "pip install cmake ninja failed: $(tail -5 "$DIR/pip-tools.log")"
fi

# The sdist.
SDIST_DIR=$DIR/sdist
if ! compgen -G "$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz" >/dev/null; then
    log "downloading llama-cpp-python==$VERSION (sdist)"
    mkdir -p "$SDIST_DIR"
    "$VENV/bin/pip" download -q --no-deps --no-binary llama-cpp-python -d "$SDIST_DIR" "llama-cpp-python==$VERSION" \
        >"$DIR/pip-sdist.log" 2>&1 || die "pip download llama-cpp-python==$VERSION failed: $(tail -5 "$DIR/pip-sdist.log")"
fi
TARBALL=$(compgen -G "$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz" | head -1) || die "no sdist in $SDIST_DIR"

SRC=$DIR/src
if [[ ! -f "$SRC/.extracted" ]]; then
    rm -rf "$SRC"
    mkdir -p "$SRC"
    tar -xzf "$TARBALL" -C "$SRC" --strip-components=1 || die "cannot extract $TARBALL"
    touch "$SRC/.extracted"
fi
LLAMA=$SRC/vendor/llama.cpp
[[ -f "$LLAMA/CMakeLists.txt" ]] || die "no vendor/llama.cpp in $TARBALL"

BUILD=$DIR/build
log "configuring llama.cpp in $BUILD"
"$VENV/bin/cmake" -S "$LLAMA" -B "$BUILD" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DCMAKE_C_FLAGS="$NOAMX" \
    -DCMAKE_CXX_FLAGS="$NOAMX" \
    -DGGML_OPENMP=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_SERVER=ON \
    >"$DIR/cmake-configure.log" 2>&1 || die "cmake configure failed: $(tail -20 "$DIR/cmake-configure.log")"
log "building ${TOOLS[*]} (this takes a while on few cores; log: $DIR/cmake-build.log)"
"$VENV/bin/cmake" --build "$BUILD" --config Release -j "${JOBS:-$(nproc)}" --target "${TOOLS[@]}" \
    >"$DIR/cmake-build.log" 2>&1 || die "build failed: $(grep -m5 -i error "$DIR/cmake-build.log" || tail -20 "$DIR/cmake-build.log")"

mkdir -p "$BIN"
for t in "${TOOLS[@]}"; do
    [[ -x "$BUILD/bin/$t" ]] || die "built, but $BUILD/bin/$t is missing"
    cp "$BUILD/bin/$t" "$BIN/$t.tmp" && mv "$BIN/$t.tmp" "$BIN/$t"
done
"$BIN/llama-tokenize" --help >/dev/null 2>&1 || "$BIN/llama-server" --version >/dev/null 2>&1 ||
    die "the built binaries do not run"
echo "$VERSION" >"$BIN/VERSION"
[[ -n "${KEEP_BUILD:-}" ]] || rm -rf "$BUILD"
echo "$CONFIG" >"$DIR/.ok"
log "done: $BIN"
echo "LLAMA_CPP_BIN=$BIN"
