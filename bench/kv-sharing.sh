#!/usr/bin/env bash
# What sharing KV buys multi-round QA, side by side in one run on loopback: `switchyard
# up` with ENGINES engines behind each configuration in turn, started fresh for it:
#   roundrobin          --routing-logic roundrobin
#   prefixaware         --routing-logic prefixaware
#   roundrobin+cache    --routing-logic roundrobin --kv-cache-server
#   kvaware+cache       --routing-logic kvaware --kv-cache-server
# Load: `switchyard bench multi-round` (the Production Stack's multi-round QA shape):
# USERS users, ROUNDS rounds, a SYSTEM_PROMPT-token shared system prompt and
# HISTORY-token per-user histories, ANSWER-token answers, at QPS for TIME seconds.
#
# BACKEND=gguf (default): 2 real CPU engines (SmolLM2-135M), KV_BYTES of paged KV each.
# BACKEND=sim: sim engines (SIM_PRESET, default smollm2-135m-cpu: the same engines'
# latency and KV shape) with SIM_BLOCKS paged blocks each, so that larger runs fit the
# machine (e.g. ENGINES=16 USERS=64 QPS=4); the `+cache` configurations go through
# the real tiers (host memory, HOST_GB per engine, and a cache server of CACHE_BYTES)
# with payloads of the preset model's size and modelled transfer times.
#
# Usage: bench/kv-sharing.sh   (env: BACKEND=gguf|sim ENGINES TARGETS USERS ROUNDS
#        SYSTEM_PROMPT HISTORY ANSWER QPS TIME KV_BYTES SIM_PRESET SIM_BLOCKS
#        MAX_MODEL_LEN TIME_SCALE HOST_GB CACHE_BYTES BASE_PORT OUT_DIR SWITCHYARD_BIN
#        SKIP_BUILD)
#   BACKEND=sim ENGINES=16 bench/kv-sharing.sh      # 64 users over 16 sim engines
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGETS=${TARGETS:-"roundrobin prefixaware roundrobin+cache kvaware+cache"}
BACKEND=${BACKEND:-gguf}
if [ "$BACKEND" = sim ]; then
  # Per engine: 4 users, 0.25 questions/s, room in the paged cache for ~1.5 users.
  ENGINES=${ENGINES:-16}
  USERS=${USERS:-$((4 * ENGINES))}
  QPS=${QPS:-$(python3 -c "print($ENGINES / 4)")}
  ROUNDS=${ROUNDS:-10}
  SYSTEM_PROMPT=${SYSTEM_PROMPT:-500}
  HISTORY=${HISTORY:-1500}
  ANSWER=${ANSWER:-50}
  TIME=${TIME:-120}
else
  ENGINES=${ENGINES:-2}
  USERS=${USERS:-4}
  QPS=${QPS:-0.25}
  ROUNDS=${ROUNDS:-5}
  SYSTEM_PROMPT=${SYSTEM_PROMPT:-300}
  HISTORY=${HISTORY:-600}
  ANSWER=${ANSWER:-20}
  TIME=${TIME:-60}
fi
BASE_PORT=${BASE_PORT:-27700}
KV_BYTES=${KV_BYTES:-268435456}   # gguf: each engine's paged KV cache
SIM_PRESET=${SIM_PRESET:-smollm2-135m-cpu}
SIM_BLOCKS=${SIM_BLOCKS:-256}     # sim: each engine's paged KV blocks (16 tokens each)
MAX_MODEL_LEN=${MAX_MODEL_LEN:-$([ "$BACKEND" = sim ] && echo 4096 || echo 2048)}
TIME_SCALE=${TIME_SCALE:-1}
HOST_GB=${HOST_GB:-$([ "$BACKEND" = sim ] && echo 0.2 || echo 5)}   # LMCACHE_MAX_LOCAL_CPU_SIZE
CACHE_BYTES=${CACHE_BYTES:-$([ "$BACKEND" = sim ] && echo 6000000000 || echo 1073741824)}
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
  port=$((BASE_PORT + i)); i=$((i + 1))
  [[ $t == *+cache ]] && extra=(--kv-cache-server="$CACHE_BYTES")
  if [ "$BACKEND" = sim ]; then
    engine=(--backend sim --engine-arg=--sim-preset="$SIM_PRESET" --engine-arg=--time-scale="$TIME_SCALE"
      --engine-arg=--num-gpu-blocks-override="$SIM_BLOCKS")
  else
    engine=(--engine-arg=--kv-cache-memory-bytes="$KV_BYTES")
  fi
  LMCACHE_MAX_LOCAL_CPU_SIZE=$HOST_GB \
  "$BIN" up --host 127.0.0.1 --port "$port" --engines "$ENGINES" --routing-logic "$logic" "${extra[@]}" \
    "${engine[@]}" --engine-arg=--max-model-len="$MAX_MODEL_LEN" \
    --log-level warn >"$OUT_DIR/$t.out" 2>"$OUT_DIR/$t.err" &
  PID=$!
  wait_ready_line "$OUT_DIR/$t.out" "$PID" 300 || { echo "$t did not start" >&2; tail "$OUT_DIR/$t.err" >&2; exit 1; }
  "$BIN" bench multi-round --base-url "http://127.0.0.1:$port" --num-users "$USERS" --num-rounds "$ROUNDS" \
    --qps "$QPS" --shared-system-prompt "$SYSTEM_PROMPT" --user-history-prompt "$HISTORY" \
    --answer-len "$ANSWER" --time "$TIME" --no-progress --label "$t" --output "$OUT_DIR/$t.json" \
    >"$OUT_DIR/$t.bench" 2>&1 || echo "$t: bench failed: $(tail -n 2 "$OUT_DIR/$t.bench")" >&2
  # Where the prompt tokens came from, summed over the engines' own metrics.
  for u in $(sed -n 's/^  engine \(http:[^ ]*\)$/\1/p' "$OUT_DIR/$t.err"); do
    curl -sf "$u/metrics" || true
  done >"$OUT_DIR/$t.metrics"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); switchyard $(cd "$ROOT" && git rev-parse --short HEAD)"
echo "backend $BACKEND, $ENGINES engines; $USERS users x $ROUNDS rounds, system $SYSTEM_PROMPT, history $HISTORY, answer $ANSWER tokens, QPS $QPS, $TIME s"
python3 - "$OUT_DIR" $TARGETS <<'PY'
import json, sys
out, targets = sys.argv[1], sys.argv[2:]
rows = {}
for t in targets:
    try:
        r = json.load(open(f"{out}/{t}.json"))
    except Exception:
        continue
    m = {}
    try:
        for line in open(f"{out}/{t}.metrics"):
            if line.startswith("#") or " " not in line:
                continue
            name, v = line.rsplit(" ", 1)
            for k in ("vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total",
                      "vllm:external_prefix_cache_hits_total"):
                if name == k or name.startswith(k + "{"):
                    m[k] = m.get(k, 0.0) + float(v)
    except OSError:
        pass
    prompt = m.get("vllm:prompt_tokens_total", 0.0)
    # Tier loads register as prefix hits; tell them apart.
    ext = m.get("vllm:external_prefix_cache_hits_total", 0.0)
    own = m.get("vllm:prefix_cache_hits_total", 0.0) - ext
    share = lambda x: f"{100 * x / prompt:.0f}%" if prompt else "-"
    # Returning questions (round 2 on): a user's first question is new to every tier.
    later = [x["ttft_ms"] for x in r.get("rounds", []) if x["round"] >= 2 and x["ttft_ms"]["count"]]
    n = sum(x["count"] for x in later)
    back = sum(x["mean"] * x["count"] for x in later) / n if n else 0.0
    rows[t] = (r["ttft_ms"]["mean"], r["ttft_ms"]["p50"], r["ttft_ms"]["p90"], back, r["requests"]["completed"],
               r["requests"]["failed"], share(own), share(ext))
print("| configuration | TTFT mean ms | TTFT p50 ms | TTFT p90 ms | rounds 2+ mean ms | completed | failed | prompt tokens from own cache | from tiers |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for t, (m, p50, p90, back, c, f, own, ext) in rows.items():
    print(f"| {t} | {m:.0f} | {p50:.0f} | {p90:.0f} | {back:.0f} | {c} | {f} | {own} | {ext} |")
def ratio(a, b):
    if a in rows and b in rows and rows[b][0] > 0:
        print(f"- {a} / {b} TTFT mean: {rows[a][0] / rows[b][0]:.2f}x, p50: {rows[a][1] / max(rows[b][1], 1e-9):.2f}x, "
              f"rounds 2+ mean: {rows[a][3] / max(rows[b][3], 1e-9):.2f}x")
ratio("roundrobin+cache", "roundrobin")
ratio("kvaware+cache", "prefixaware")
PY
