#!/usr/bin/env bash
# LoRA adapters (issue 18): aggregate decode tokens/s of STREAMS closed-loop streams on one
# real CPU engine (SmolLM2-135M), spread evenly over 0 (the base model), 1, 4 and 8
# adapters. Goal: with 8 adapters at most 20% slower than 16 base-model streams.
#
#   bench/lora.sh
#   SETUPS="0 8" TIME=30 bench/lora.sh
#
# The adapters are random PEFT adapters from scripts/make-lora-adapter.py (rank RANK,
# targets TARGETS), loaded at start with --lora-modules; --max-loras is the largest setup,
# so no request waits for an adapter slot. Each setup runs one `switchyard bench random`
# client per model (STREAMS / models streams each) for TIME seconds; the report sums their
# output tokens and divides by the longest client's duration.
#
# Env: SETUPS="0 1 4 8" STREAMS=16 TIME=60 INPUT=64 OUTPUT=128 RANK=8 TARGETS=all
#      OUT_DIR SWITCHYARD_BIN SKIP_BUILD PORT
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SETUPS=${SETUPS:-"0 1 4 8"}
STREAMS=${STREAMS:-16}
TIME=${TIME:-60}
INPUT=${INPUT:-64}
OUTPUT=${OUTPUT:-128}
RANK=${RANK:-8}
TARGETS=${TARGETS:-all}
PORT=${PORT:-27950}
OUT_DIR=${OUT_DIR:-$ROOT/target/lora-bench}
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

max=0
for n in $SETUPS; do [ "$n" -gt "$max" ] && max=$n; done
modules=()
for ((i = 1; i <= max; i++)); do
  python3 "$ROOT/scripts/make-lora-adapter.py" --out "$OUT_DIR/adapters/a$i" --seed "$i" \
    --rank "$RANK" --targets "$TARGETS"
  modules+=("a$i=$OUT_DIR/adapters/a$i")
done
lora_flags=()
if [ "$max" -gt 0 ]; then
  lora_flags=(--enable-lora --max-loras "$max" --max-cpu-loras "$max" --max-lora-rank "$RANK"
    --lora-modules "${modules[@]}")
fi
"$BIN" engine --host 127.0.0.1 --port "$PORT" --served-model-name base \
  --max-num-seqs "$STREAMS" --max-model-len 1024 "${lora_flags[@]}" \
  >"$OUT_DIR/engine.out" 2>"$OUT_DIR/engine.err" &
PID=$!
wait_ready_line "$OUT_DIR/engine.out" "$PID" 300 || {
  echo "the engine did not start" >&2
  tail "$OUT_DIR/engine.err" >&2
  exit 1
}
URL="http://127.0.0.1:$PORT"

for n in $SETUPS; do
  if [ "$n" -eq 0 ]; then models=(base); else models=(); for ((i = 1; i <= n; i++)); do models+=("a$i"); done; fi
  per=$((STREAMS / ${#models[@]}))
  rm -f "$OUT_DIR/setup-$n"-*.json
  pids=()
  seed=0
  for m in "${models[@]}"; do
    seed=$((seed + 1))
    "$BIN" bench random --base-url "$URL" --model "$m" --request-rate inf --concurrency "$per" --time "$TIME" \
      --input-len "$INPUT" --output-len "$OUTPUT" --range-ratio 0 --seed "$seed" \
      --no-progress --output "$OUT_DIR/setup-$n-$m.json" >/dev/null 2>"$OUT_DIR/setup-$n-$m.err" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
done

python3 - "$OUT_DIR" "$STREAMS" $SETUPS <<'PY'
import glob, json, sys
out, streams, setups = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3:]]
rows = {}
for n in setups:
    reports = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/setup-{n}-*.json"))]
    tokens = sum(r["tokens"]["output_total"] for r in reports)
    dur = max(r["duration_s"] for r in reports)
    failed = sum(r["requests"]["failed"] for r in reports)
    rows[n] = (tokens / dur, failed)
base = rows.get(0, (None,))[0]
print(f"{'adapters':>8} {'streams':>7} {'output tok/s':>12} {'vs base':>8} {'failed':>6}")
for n in setups:
    tps, failed = rows[n]
    rel = f"{tps / base:.2f}x" if base else "-"
    print(f"{n:>8} {streams:>7} {tps:>12.1f} {rel:>8} {failed:>6}")
PY
