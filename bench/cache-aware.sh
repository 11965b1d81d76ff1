#!/usr/bin/env bash
# Cache-aware routing on multi-round QA, side by side, in one run on loopback.
#
# Four sim engines (Llama-3.1-8B on an H100 latency preset, real scheduler and block
# manager with prefix caching) with a KV pool too small for every user's history, behind
# each target in turn:
#   roundrobin     switchyard router --routing-logic roundrobin
#   session        switchyard router --routing-logic session --session-key x-user-id
#   prefixaware    switchyard router --routing-logic prefixaware
#   kvaware        switchyard router --routing-logic kvaware (engines publish KV events);
#                  skipped with a note when this build rejects the value
#   vllm-router    PyPI vllm-router   --policy cache_aware (VLLM_ROUTER_TOKENIZER set)
#   sglang-router  PyPI sglang-router --policy cache_aware
# Load: `switchyard bench multi-round` (x-user-id header per user) at each QPS level.
# Every cell starts cold: engines and router are started fresh for it and stopped after.
# Prefix-cache hit rate: sum over the 4 engines of the deltas of
# vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total (tokens) over the run.
#
# Usage: bench/cache-aware.sh
#   env: TARGETS QPS_LEVELS TIME USERS ROUNDS SYSTEM_PROMPT HISTORY ANSWER QUESTION KV_ARGS
#        BLOCKS MAX_MODEL_LEN TIME_SCALE BASE_PORT OUT_DIR SWITCHYARD_BIN SKIP_BUILD
#        PEER_TOKENIZER (a local HF tokenizer dir/file for vllm-router; default: the
#        SmolLM2 tokenizer scripts/setup-vllm.sh leaves in the cache, if present)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGETS=${TARGETS:-"roundrobin session prefixaware kvaware vllm-router sglang-router"}
QPS_LEVELS=${QPS_LEVELS:-"4 10 40"}
TIME=${TIME:-40}
USERS=${USERS:-12}
ROUNDS=${ROUNDS:-5}
SYSTEM_PROMPT=${SYSTEM_PROMPT:-600}
HISTORY=${HISTORY:-1500}
ANSWER=${ANSWER:-100}
QUESTION=${QUESTION:-16}
NUM_ENGINES=4
BLOCKS=${BLOCKS:-640}            # 16-token blocks per engine: 10,240 tokens
MAX_MODEL_LEN=${MAX_MODEL_LEN:-4096}
TIME_SCALE=${TIME_SCALE:-1}
BASE_PORT=${BASE_PORT:-27500}
OUT_DIR=${OUT_DIR:-$ROOT/target/cache-aware}
CACHE=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
VENV=$CACHE/peers-venv
BIN=${SWITCHYARD_BIN:-$ROOT/target/release/switchyard}
PEER_TOKENIZER=${PEER_TOKENIZER:-$CACHE/vllm/smollm2-hf}
MODEL=switchyard-sim
KV_EVENTS='{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://127.0.0.1:0"}'

mkdir -p "$OUT_DIR"
RAW=$OUT_DIR/raw.tsv
NOTES=$OUT_DIR/notes.txt
: >"$NOTES"
note() { echo "$*" | tee -a "$NOTES" >&2; }

# ---------------------------------------------------------------- prerequisites
if [ -z "${SKIP_BUILD:-}" ] && [ -z "${SWITCHYARD_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q)
fi
[ -x "$BIN" ] || { echo "no switchyard binary at $BIN" >&2; exit 1; }

PEERS_OK=1
case " $TARGETS " in *" vllm-router "*|*" sglang-router "*)
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import vllm_router, sglang_router' 2>/dev/null; then
    mkdir -p "$CACHE"
    { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q vllm-router sglang-router; } \
      >"$OUT_DIR/pip.log" 2>&1 || { PEERS_OK=0; note "peer install failed: $(tail -n 3 "$OUT_DIR/pip.log" | tr '\n' ' ')"; }
  fi ;;
esac
peer_version() { "$VENV/bin/pip" show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }

# ---------------------------------------------------------------- processes
PIDS=()
stop_pids() { # pids...
  local p
  for p in "$@"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "$@"; do
    [ -n "$p" ] || continue
    for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
}
cleanup() { stop_pids "${PIDS[@]:-}"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# sums over the engines of the prefix-cache counters (tokens) and of the engine-side TTFT
# histogram's sum (s) and count: "hits queries ttft_sum ttft_count"
scrape() {
  local i
  for ((i = 0; i < NUM_ENGINES; i++)); do
    curl -s -m 3 "http://127.0.0.1:$((BASE_PORT + i))/metrics"
  done | awk '
    function take(m) { return $1 == m || index($1, m "{") == 1 }
    take("vllm:prefix_cache_hits_total") { h += $NF }
    take("vllm:prefix_cache_queries_total") { q += $NF }
    take("vllm:time_to_first_token_seconds_sum") { ts += $NF }
    take("vllm:time_to_first_token_seconds_count") { tc += $NF }
    END { printf "%.0f %.0f %.6f %.0f\n", h, q, ts, tc }'
}

ENGINE_PIDS=()
start_engines() { # extra args...
  local i port pid
  ENGINE_PIDS=()
  for ((i = 0; i < NUM_ENGINES; i++)); do
    port=$((BASE_PORT + i))
    "$BIN" engine --backend sim --sim-preset llama-3.1-8b-h100 --host 127.0.0.1 --port $port \
      --num-gpu-blocks "$BLOCKS" --max-model-len "$MAX_MODEL_LEN" --time-scale "$TIME_SCALE" \
      --log-level warn "$@" >"$OUT_DIR/engine$i.out" 2>"$OUT_DIR/engine$i.err" &
    pid=$!; PIDS+=("$pid"); ENGINE_PIDS+=("$pid")
  done
  for ((i = 0; i < NUM_ENGINES; i++)); do
    wait_ready_line "$OUT_DIR/engine$i.out" "${ENGINE_PIDS[$i]}" 30 ||
      { echo "engine $i did not start:" >&2; cat "$OUT_DIR/engine$i.err" >&2; return 1; }
  done
}
engine_urls() { local i; for ((i = 0; i < NUM_ENGINES; i++)); do printf 'http://127.0.0.1:%d ' $((BASE_PORT + i)); done; }

ROUTER_PORT=$((BASE_PORT + 10))
ROUTER_PID=
start_router() { # target
  local t=$1 urls csv
  urls=$(engine_urls); csv=$(echo $urls | tr ' ' ',')
  case $t in
    roundrobin|session|prefixaware|kvaware)
      local extra=()
      [ $t = session ] && extra=(--session-key x-user-id)
      # KV_ARGS: extra flags for the kvaware router (e.g. "--kv-overlap-weight 16").
      [ $t = kvaware ] && [ -n "${KV_ARGS:-}" ] && read -r -a extra <<<"$KV_ARGS"
      "$BIN" router --host 127.0.0.1 --port $ROUTER_PORT --static-backends "$csv" \
        --static-models "$(for _ in $urls; do printf '%s,' $MODEL; done | sed 's/,$//')" \
        --routing-logic $t "${extra[@]}" --log-level warn >"$OUT_DIR/router.out" 2>"$OUT_DIR/router.err" &
      ;;
    vllm-router)
      VLLM_ROUTER_TOKENIZER=$PEER_TOKENIZER "$VENV/bin/python" -m vllm_router.launch_router \
        --host 127.0.0.1 --port $ROUTER_PORT --worker-urls $urls --policy cache_aware \
        --log-level warning --prometheus-host 127.0.0.1 --prometheus-port $((ROUTER_PORT + 1)) \
        >"$OUT_DIR/router.out" 2>"$OUT_DIR/router.err" &
      ;;
    sglang-router)
      "$VENV/bin/python" -m sglang_router.launch_router \
        --host 127.0.0.1 --port $ROUTER_PORT --worker-urls $urls --policy cache_aware \
        --log-level warn --prometheus-host 127.0.0.1 --prometheus-port $((ROUTER_PORT + 1)) \
        >"$OUT_DIR/router.out" 2>"$OUT_DIR/router.err" &
      ;;
  esac
  ROUTER_PID=$!; PIDS+=("$ROUTER_PID")
  wait_completion $ROUTER_PORT "$ROUTER_PID" 60 chat
}

# which targets can run
ACTIVE=()
for t in $TARGETS; do
  case $t in
    roundrobin|session|prefixaware) ACTIVE+=("$t") ;;
    kvaware)
      if "$BIN" router --help 2>/dev/null | grep -q 'kvaware'; then
        ACTIVE+=("$t")
      else
        note "kvaware: skipped (this switchyard build rejects --routing-logic kvaware)"
      fi ;;
    vllm-router|sglang-router)
      if [ "$PEERS_OK" = 1 ]; then ACTIVE+=("$t"); else note "$t: skipped (install failed)"; fi ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
done
if [[ " ${ACTIVE[*]} " == *" vllm-router "* ]]; then
  if [ -e "$PEER_TOKENIZER" ]; then
    note "vllm-router: VLLM_ROUTER_TOKENIZER=$PEER_TOKENIZER (an HF tokenizer; its ids are not the sim engine's, which a router-side prefix tree does not need)"
  else
    note "vllm-router: no local HF tokenizer at $PEER_TOKENIZER; run without VLLM_ROUTER_TOKENIZER"
    PEER_TOKENIZER=
  fi
fi

note "workload: multi-round QA, $USERS users x $ROUNDS rounds, shared system prompt $SYSTEM_PROMPT tokens, user history $HISTORY, question $QUESTION, answer $ANSWER; $TIME s per cell; QPS levels: $QPS_LEVELS"
note "engines: $NUM_ENGINES x sim llama-3.1-8b-h100, --num-gpu-blocks $BLOCKS (x16 = $((BLOCKS * 16)) tokens each), --max-model-len $MAX_MODEL_LEN, --time-scale $TIME_SCALE"
note "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), kernel $(uname -r); loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
note "versions: switchyard $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$ROOT" && git diff --quiet HEAD -- crates 2>/dev/null || echo '+dirty'), vllm-router $(peer_version vllm-router), sglang-router $(peer_version sglang-router)"

# ---------------------------------------------------------------- runs
printf 'qps\ttarget\tlaunched\tcompleted\tfailed\tunfinished\treq_s\tout_tok_s\tttft_p50\tttft_p90\tttft_mean\tttft_p99\titl_p50\titl_mean\tcache_hits\tcache_queries\tengine_ttft_mean\n' >"$RAW"
for qps in $QPS_LEVELS; do
  for t in "${ACTIVE[@]}"; do
    extra=()
    [ $t = kvaware ] && extra=(--kv-events-config "$KV_EVENTS")
    start_engines "${extra[@]}" || exit 1
    if ! start_router $t; then
      note "$t @ qps $qps: router did not start: $(tail -n 3 "$OUT_DIR/router.err" | tr '\n' ' ')"
      stop_pids "$ROUTER_PID" "${ENGINE_PIDS[@]}"; continue
    fi
    read -r h0 q0 ts0 tc0 <<<"$(scrape)"
    json=$OUT_DIR/$t-qps$qps.json
    "$BIN" bench multi-round --base-url "http://127.0.0.1:$ROUTER_PORT" --model $MODEL \
      --num-users "$USERS" --num-rounds "$ROUNDS" --qps "$qps" \
      --shared-system-prompt "$SYSTEM_PROMPT" --user-history-prompt "$HISTORY" \
      --answer-len "$ANSWER" --question-len "$QUESTION" --time "$TIME" --drain-timeout 30 \
      --label "$t qps=$qps" --output "$json" --no-progress --log-level warn \
      >"$OUT_DIR/$t-qps$qps.txt" 2>&1 || note "$t @ qps $qps: bench exited non-zero"
    read -r h1 q1 ts1 tc1 <<<"$(scrape)"
    stop_pids "$ROUTER_PID" "${ENGINE_PIDS[@]}"
    python3 - "$json" "$qps" "$t" $((h1 - h0)) $((q1 - q0)) "$ts0" "$ts1" "$tc0" "$tc1" >>"$RAW" <<'PY'
import json, sys
f, qps, t, h, q, ts0, ts1, tc0, tc1 = sys.argv[1:]
n = float(tc1) - float(tc0)
eng = 1000 * (float(ts1) - float(ts0)) / n if n > 0 else 0.0
r = json.load(open(f))
c, tp, tt, il = r["requests"], r["throughput"], r["ttft_ms"], r["itl_ms"]
print("\t".join(str(x) for x in [qps, t, c["launched"], c["completed"], c["failed"], c["unfinished"],
      f'{tp["requests_per_s"]:.3f}', f'{tp["output_tokens_per_s"]:.1f}', f'{tt["p50"]:.2f}', f'{tt["p90"]:.2f}',
      f'{tt["mean"]:.2f}', f'{tt["p99"]:.2f}', f'{il["p50"]:.2f}', f'{il["mean"]:.2f}', h, q, f'{eng:.2f}']))
PY
    tail -n 1 "$RAW" | awk -F'\t' '{printf "qps %-4s %-14s %5.2f req/s  TTFT p50 %8.1f ms  mean %8.1f ms  hit %5.1f%%  failed %s\n", $1, $2, $7, $9, $11, ($16 > 0 ? 100 * $15 / $16 : 0), $5}' >&2
  done
done
note "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- report
python3 - "$RAW" "$NOTES" <<'PY'
import csv, sys
raw, notes = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
order = ["roundrobin", "session", "prefixaware", "kvaware", "vllm-router", "sglang-router"]
cell = {(r["qps"], r["target"]): r for r in rows}
levels = list(dict.fromkeys(r["qps"] for r in rows))
def hit(r):
    q = int(r["cache_queries"])
    return 100.0 * int(r["cache_hits"]) / q if q else 0.0
print(open(notes).read().strip())
print()
print("| QPS | target | req/s | output tok/s | TTFT p50 ms | TTFT p90 ms | TTFT mean ms | engine TTFT mean ms | ITL p50 ms | ITL mean ms | prefix-cache hit | done / failed / unfinished |")
print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for q in levels:
    for t in order:
        r = cell.get((q, t))
        if not r:
            continue
        print(f"| {q} | {t} | {float(r['req_s']):.2f} | {float(r['out_tok_s']):.0f} | {float(r['ttft_p50']):.1f} | "
              f"{float(r['ttft_p90']):.1f} | {float(r['ttft_mean']):.1f} | {float(r['engine_ttft_mean']):.1f} | {float(r['itl_p50']):.2f} | "
              f"{float(r['itl_mean']):.2f} | {hit(r):.1f}% | {r['completed']} / {r['failed']} / {r['unfinished']} |")
for base in ("roundrobin", "sglang-router"):
    print()
    print(f"Ratios vs {base} (TTFT: lower is better; throughput and hit rate: higher is better)")
    print()
    print("| QPS | target | TTFT p50 | TTFT p90 | TTFT mean | output tok/s | hit rate (points) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for q in levels:
        b = cell.get((q, base))
        if not b:
            continue
        for t in order:
            r = cell.get((q, t))
            if not r or t == base:
                continue
            ratio = lambda k: float(r[k]) / float(b[k]) if float(b[k]) else float("nan")
            print(f"| {q} | {t} | {ratio('ttft_p50'):.2f}x | {ratio('ttft_p90'):.2f}x | {ratio('ttft_mean'):.2f}x | "
                  f"{ratio('out_tok_s'):.2f}x | {hit(r) - hit(b):+.1f} |")
PY
