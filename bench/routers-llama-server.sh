#!/usr/bin/env bash
# Routers in front of llama.cpp's `llama-server`, side by side in one run on loopback.
#
# llama-server closes its connection after every streamed answer while its headers say
# `Keep-Alive`, so a router that pools connections sends its next request down a closed
# one. What each router makes of that, and what it costs:
#   direct         llama-server itself (no router)
#   switchyard     `switchyard router` (static backend, roundrobin)
#   baseline       `switchyard router` from another build, $BASELINE_BIN (e.g. f2c0b8f,
#                  before stale connections were sent again)
#   vllm-router    PyPI vllm-router   (round_robin)
#   sglang-router  PyPI sglang-router (round_robin)
# Each target: `switchyard bench random`, REQUESTS streamed completions (64 prompt tokens,
# 16 output) at CONCURRENCY; the targets take turns, REPS rounds, each router restarted
# each round. Every run has its own seed, so its prompts are new to llama-server (which
# reuses a slot's cached prompt: a target sent the prompts another just sent would skip
# their prefill). Prints completed / failed, request throughput and median TTFT per round, and
# their medians over rounds.
#
# Usage: bench/routers-llama-server.sh   (env: REQUESTS CONCURRENCY REPS TARGETS BASE_PORT
#                                         OUT_DIR SWITCHYARD_BIN BASELINE_BIN SKIP_BUILD
#                                         LLAMA_CPP_BIN GGUF)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REQUESTS=${REQUESTS:-96}
CONCURRENCY=${CONCURRENCY:-8}
REPS=${REPS:-3}
TARGETS=${TARGETS:-"direct switchyard vllm-router sglang-router"}
[ -n "${BASELINE_BIN:-}" ] && TARGETS="$TARGETS baseline"
BASE_PORT=${BASE_PORT:-27600}
OUT_DIR=${OUT_DIR:-$ROOT/target/routers-llama-server}
CACHE=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
VENV=$CACHE/peers-venv
BIN=${SWITCHYARD_BIN:-$ROOT/target/release/switchyard}
MODEL=smollm2
GGUF=${GGUF:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}
mkdir -p "$OUT_DIR"
RAW=$OUT_DIR/raw.tsv
: >"$RAW"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

if [ -z "${SKIP_BUILD:-}" ] && [ -z "${SWITCHYARD_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p switchyard)
fi
[ -x "$BIN" ] || { echo "no switchyard binary at $BIN" >&2; exit 1; }
[ -f "$GGUF" ] || { echo "no model at $GGUF (switchyard engine --backend gguf fetches it on first use)" >&2; exit 1; }
if [ -z "${LLAMA_CPP_BIN:-}" ]; then
  LLAMA_CPP_BIN=$("$ROOT/scripts/setup-llama-cpp.sh" 2>"$OUT_DIR/llama-cpp-setup.log" | sed -n 's/^LLAMA_CPP_BIN=//p')
fi
if [[ " $TARGETS " == *" vllm-router "* || " $TARGETS " == *" sglang-router "* ]] &&
  ! "$VENV/bin/python" -c 'import vllm_router, sglang_router' 2>/dev/null; then
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q vllm-router sglang-router; } >"$OUT_DIR/pip.log" 2>&1
fi

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -- -"$p" 2>/dev/null || kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT


UP_PORT=$BASE_PORT
setsid "$LLAMA_CPP_BIN/llama-server" -m "$GGUF" --alias smollm2 --host 127.0.0.1 --port "$UP_PORT" \
  -t 2 -tb 2 -np 16 -c 32768 --no-webui >"$OUT_DIR/llama-server.out" 2>&1 &
PIDS+=($!)
wait_completion "$UP_PORT" "$!" 120 || { echo "llama-server did not start (see $OUT_DIR/llama-server.out)" >&2; exit 1; }
UP=http://127.0.0.1:$UP_PORT

start_target() { # target -> its port in $PORT, its pid in $PID
  local t=$1 port
  case $t in
    direct) PORT=$UP_PORT; PID=${PIDS[0]}; return ;;
    switchyard | baseline)
      port=$((BASE_PORT + 1))
      local b=$BIN; [ "$t" = baseline ] && b=$BASELINE_BIN
      setsid "$b" router --host 127.0.0.1 --port "$port" --static-backends "$UP" \
        --static-models smollm2 >"$OUT_DIR/$t.out" 2>"$OUT_DIR/$t.err" & ;;
    vllm-router | sglang-router)
      local i=2 pkg=vllm_router level=warning
      [ "$t" = sglang-router ] && { i=3; pkg=sglang_router; level=warn; }
      port=$((BASE_PORT + i))
      setsid "$VENV/bin/python" -m "$pkg.launch_router" --host 127.0.0.1 --port "$port" \
        --worker-urls "$UP" --policy round_robin --log-level "$level" \
        --prometheus-host 127.0.0.1 --prometheus-port $((BASE_PORT + 10 + i)) \
        >"$OUT_DIR/$t.out" 2>"$OUT_DIR/$t.err" & ;;
  esac
  PID=$!
  PIDS+=("$PID")
  PORT=$port
}

for ((rep = 1; rep <= REPS; rep++)); do
  ti=0
  for t in $TARGETS; do
    ti=$((ti + 1))
    start_target "$t"
    if ! wait_completion "$PORT" "$PID" 60; then
      echo "$t did not start (see $OUT_DIR/$t.err)" >&2
      continue
    fi
    out=$OUT_DIR/$t-$rep.json
    "$BIN" bench random --base-url "http://127.0.0.1:$PORT" --model smollm2 \
      --num-requests "$REQUESTS" --concurrency "$CONCURRENCY" --input-len 64 --output-len 16 \
      --seed $((1000 * rep + ti)) --no-progress --output "$out" >"$OUT_DIR/$t-$rep.log" 2>&1 || true
    python3 - "$out" "$t" "$rep" >>"$RAW" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
q = r["requests"]
print(f'{sys.argv[2]}\t{sys.argv[3]}\t{q["completed"]}\t{q["failed"]}\t{r["throughput"]["requests_per_s"]:.2f}\t{r["ttft_ms"]["p50"] or 0:.1f}')
EOF
    tail -n 1 "$RAW"
    if [ "$t" != direct ]; then kill -- -"$PID" 2>/dev/null || kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  done
done

echo
python3 - "$RAW" "$REQUESTS" <<'EOF'
import statistics, sys
rows = [l.split("\t") for l in open(sys.argv[1]) if l.strip()]
print(f"{'target':<14} {'completed':>10} {'failed':>7} {'req/s':>7} {'TTFT p50 ms':>12}   (medians over rounds, of {sys.argv[2]} requests)")
for t in dict.fromkeys(r[0] for r in rows):
    rs = [r for r in rows if r[0] == t]
    med = lambda i: statistics.median(float(r[i]) for r in rs)
    print(f"{t:<14} {med(2):>10.0f} {med(3):>7.0f} {med(4):>7.2f} {med(5):>12.1f}")
EOF
