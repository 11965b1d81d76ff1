#!/usr/bin/env bash
# What sharing KV buys multi-round QA, side by side in one run on loopback: `switchyard
# up` with 2 real CPU engines (SmolLM2-135M, release build) behind each configuration in
# turn, started fresh for it:
#   roundrobin          --routing-logic roundrobin
#   prefixaware         --routing-logic prefixaware
#   roundrobin+cache    --routing-logic roundrobin --kv-cache-server
#   kvaware+cache       --routing-logic kvaware --kv-cache-server
# Load: `switchyard bench multi-round` (the Production Stack's multi-round QA shape):
# USERS users, ROUNDS rounds, a SYSTEM_PROMPT-token shared system prompt and
# HISTORY-token per-user histories, ANSWER-token answers, at QPS for TIME seconds.
#
# Usage: bench/kv-sharing.sh   (env: TARGETS USERS=4 ROUNDS=5 SYSTEM_PROMPT=300
#        HISTORY=600 ANSWER=20 QPS=0.25 TIME=60 KV_BYTES BASE_PORT=27700 OUT_DIR SWITCHYARD_BIN
#        SKIP_BUILD)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGETS=${TARGETS:-"roundrobin prefixaware roundrobin+cache kvaware+cache"}
USERS=${USERS:-4}
ROUNDS=${ROUNDS:-5}
SYSTEM_PROMPT=${SYSTEM_PROMPT:-300}
HISTORY=${HISTORY:-600}
ANSWER=${ANSWER:-20}
QPS=${QPS:-0.25}
TIME=${TIME:-60}
BASE_PORT=${BASE_PORT:-27700}
KV_BYTES=${KV_BYTES:-268435456}   # each engine's paged KV cache
OUT_DIR=${OUT_DIR:-$ROOT/target/kv-sharing}
BIN=${SWITCHYARD_BIN:-$ROOT/target/release/switchyard}
mkdir -p "$OUT_DIR"
if [ -z "${SKIP_BUILD:-}" ] && [ -z "${SWITCHYARD_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p switchyard)
fi
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null || true; }
trap cleanup EXIT INT TERM

i=0
for t in $TARGETS; do
  logic=${t%%+*}
  extra=()
  [[ $t == *+cache ]] && extra=(--kv-cache-server)
  port=$((BASE_PORT + i)); i=$((i + 1))
  "$BIN" up --host 127.0.0.1 --port "$port" --engines 2 --routing-logic "$logic" "${extra[@]}" \
    --engine-arg=--kv-cache-memory-bytes="$KV_BYTES" --engine-arg=--max-model-len=2048 \
    --log-level warn >"$OUT_DIR/$t.out" 2>"$OUT_DIR/$t.err" &
  PID=$!
  wait_ready_line "$OUT_DIR/$t.out" "$PID" 300 || { echo "$t did not start" >&2; tail "$OUT_DIR/$t.err" >&2; exit 1; }
  "$BIN" bench multi-round --base-url "http://127.0.0.1:$port" --num-users "$USERS" --num-rounds "$ROUNDS" \
    --qps "$QPS" --shared-system-prompt "$SYSTEM_PROMPT" --user-history-prompt "$HISTORY" \
    --answer-len "$ANSWER" --time "$TIME" --no-progress --label "$t" --output "$OUT_DIR/$t.json" \
    >"$OUT_DIR/$t.bench" 2>&1 || echo "$t: bench failed: $(tail -n 2 "$OUT_DIR/$t.bench")" >&2
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); switchyard $(cd "$ROOT" && git rev-parse --short HEAD)"
python3 - "$OUT_DIR" $TARGETS <<'PY'
import json, sys
out, targets = sys.argv[1], sys.argv[2:]
rows = {}
for t in targets:
    try:
        r = json.load(open(f"{out}/{t}.json"))
    except Exception:
        continue
    rows[t] = (r["ttft_ms"]["mean"], r["ttft_ms"]["p50"], r["ttft_ms"]["p90"], r["requests"]["completed"], r["requests"]["failed"])
print("| configuration | TTFT mean ms | TTFT p50 ms | TTFT p90 ms | completed | failed |")
print("|---|---:|---:|---:|---:|---:|")
for t, (m, p50, p90, c, f) in rows.items():
    print(f"| {t} | {m:.0f} | {p50:.0f} | {p90:.0f} | {c} | {f} |")
def ratio(a, b):
    if a in rows and b in rows and rows[b][0] > 0:
        print(f"- {a} / {b} TTFT mean: {rows[a][0] / rows[b][0]:.2f}x")
ratio("roundrobin+cache", "roundrobin")
ratio("kvaware+cache", "prefixaware")
PY
