#!/usr/bin/env bash
# What the shared KV tier buys one request, side by side in one run on loopback: two real
# CPU engines (SmolLM2-135M, release build) offloading to one `switchyard cache-server`.
# Each of N distinct prompts (~PROMPT_WORDS words, about 1.2 tokens a word) is sent with
# max_tokens 1 (time to first token = the whole request) first to engine A, which computes
# it and saves its 256-token chunks, then to engine B, which loads them from the server
# (remote hit) and computes only the tail; then to an engine without offloading, as the
# reference for a cold prefill. Medians over the prompts, and B/A.
#
# Usage: bench/kv-offload.sh   (env: N=5 PROMPT_WORDS=1600 OUT_DIR SWITCHYARD_BIN SKIP_BUILD)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${N:-5}
PROMPT_WORDS=${PROMPT_WORDS:-1600}
OUT_DIR=${OUT_DIR:-$ROOT/target/kv-offload-bench}
BIN=${SWITCHYARD_BIN:-$ROOT/target/release/switchyard}
mkdir -p "$OUT_DIR"
if [ -z "${SKIP_BUILD:-}" ] && [ -z "${SWITCHYARD_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p switchyard)
fi
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$BIN" cache-server --host 127.0.0.1 --port 0 --http-port 0 --log-level warn >"$OUT_DIR/cs.out" 2>"$OUT_DIR/cs.err" &
PIDS+=($!); wait_ready_line "$OUT_DIR/cs.out" "$!" 30
LM=$(grep -o 'lm://[^ ]*' "$OUT_DIR/cs.out")
ENGINE=(engine --host 127.0.0.1 --port 0 --max-model-len 4096 --kv-cache-memory-bytes 536870912 --log-level warn)
start() { # name, then extra args
  local name=$1; shift
  "$BIN" "${ENGINE[@]}" "$@" >"$OUT_DIR/$name.out" 2>"$OUT_DIR/$name.err" &
  PIDS+=($!); wait_ready_line "$OUT_DIR/$name.out" "$!" 120
  sed -n 's/^READY //p' "$OUT_DIR/$name.out"
}
export LMCACHE_REMOTE_URL=$LM LMCACHE_LOCAL_CPU=False
TRANSFER='{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}'
A=$(start a --kv-transfer-config "$TRANSFER")
B=$(start b --kv-transfer-config "$TRANSFER")
C=$(start cold)
ttft() { # url prompt
  curl -s -o /dev/null -w '%{time_total}' "$1/v1/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"SmolLM2-135M-Instruct\",\"prompt\":\"$2\",\"max_tokens\":1,\"temperature\":0}"
}
: >"$OUT_DIR/raw.tsv"
for ((i = 0; i < N; i++)); do
  p=$(python3 -c "import random; r=random.Random($i); w=['river','stone','light','market','winter','harbor','garden','signal','paper','engine']; print(' '.join(r.choice(w) for _ in range($PROMPT_WORDS)))")
  a=$(ttft "$A" "$p"); sleep 0.5  # let A's chunks reach the server
  b=$(ttft "$B" "$p"); c=$(ttft "$C" "$p")
  printf '%s\t%s\t%s\n' "$a" "$b" "$c" | tee -a "$OUT_DIR/raw.tsv" >&2
done
hits=$(curl -s "$B/metrics" | awk '/^switchyard:kv_offload_hit_chunks_total.*tier="remote"/{print $2}')
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); switchyard $(cd "$ROOT" && git rev-parse --short HEAD)"
echo "engine B remote chunk hits: $hits"
python3 - "$OUT_DIR/raw.tsv" <<'PY'
import statistics, sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
a, b, c = (statistics.median(r[i] for r in rows) for i in range(3))
print(f"| engine | TTFT median s |\n|---|---:|\n| A (computes, saves) | {a:.3f} |\n| B (remote hit) | {b:.3f} |\n| no offloading | {c:.3f} |")
print(f"B / A = {b / a:.2f}; B / no offloading = {b / c:.2f}")
PY
