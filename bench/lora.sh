#!/usr/bin/env bash
# LoRA adapters (issue 18): aggregate decode tokens/s of STREAMS closed-loop streams on one
# real CPU engine (SmolLM2-135M), spread evenly over 0 (the base model), 1, 4 and 8
# adapters. Goal: with 8 adapters at most 20% slower than 16 base-model streams.
#
#   bench/lora.sh
#   SETUPS="0 8" TIME=30 bench/lora.sh
#   PEERS= bench/lora.sh                  # Switchyard only
#
# The adapters are random PEFT adapters from scripts/make-lora-adapter.py (rank RANK,
# targets TARGETS), loaded at start with --lora-modules; --max-loras is the largest setup,
# so no request waits for an adapter slot. Each setup runs one `switchyard bench random`
# client per model (STREAMS / models streams each) for TIME seconds; the report sums their
# output tokens and divides by the longest client's duration ("failed" counts requests that
# failed or were still unfinished after the clients' drain timeout).
#
# Side by side (PEERS=llama-server, the default): llama.cpp's own server
# (scripts/setup-llama-cpp.sh builds it, as bench/engine-cpu.sh uses it; -t 2 -tb 2,
# -np STREAMS slots) serves the same adapters, written by the same script as llama.cpp's
# LoRA GGUF (`--gguf`, what convert_lora_to_gguf.py writes), all given to one `--lora`;
# each setup starts it afresh with that setup's adapters (none for 0), and each client
# picks its adapter with llama-server's per-request field, `--extra-body '{"lora": [{"id":
# i, "scale": 1.0}]}'` (adapters a request does not list run at scale 0). llama-server batches only slots whose adapters (and scales) are the
# same (server_slot::can_batch_with), so with n adapters a step runs one adapter's slots.
#
# Env: SETUPS="0 1 4 8" STREAMS=16 TIME=60 INPUT=64 OUTPUT=128 RANK=8 TARGETS=all
#      PEERS=llama-server LLAMA_CPP_BIN GGUF LLAMA_PORT
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
LLAMA_PORT=${LLAMA_PORT:-27951}
PEERS=${PEERS-llama-server}
CACHE=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
GGUF=${GGUF:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}
OUT_DIR=${OUT_DIR:-$ROOT/target/lora-bench}
BIN=${SWITCHYARD_BIN:-$ROOT/target/release/switchyard}
mkdir -p "$OUT_DIR"
case " $PEERS " in *" llama-server "*)
  if [ -z "${LLAMA_CPP_BIN:-}" ]; then
    LLAMA_CPP_BIN=$("$ROOT/scripts/setup-llama-cpp.sh" 2>"$OUT_DIR/llama-cpp-setup.log" | sed -n 's/^LLAMA_CPP_BIN=//p') || true
  fi
  if [ ! -x "${LLAMA_CPP_BIN:-}/llama-server" ] || [ ! -f "$GGUF" ]; then
    echo "llama-server: no $LLAMA_CPP_BIN/llama-server or no $GGUF (scripts/setup-llama-cpp.sh log: $OUT_DIR/llama-cpp-setup.log), not measured" >&2
    PEERS=
  fi ;;
esac
if [ -z "${SKIP_BUILD:-}" ] && [ -z "${SWITCHYARD_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p switchyard)
fi
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PID=
LPID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null
  [ -n "$LPID" ] && kill "$LPID" 2>/dev/null
  true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

max=0
for n in $SETUPS; do [ "$n" -gt "$max" ] && max=$n; done
modules=()
for ((i = 1; i <= max; i++)); do
  python3 "$ROOT/scripts/make-lora-adapter.py" --out "$OUT_DIR/adapters/a$i" --seed "$i" \
    --rank "$RANK" --targets "$TARGETS" --gguf "$OUT_DIR/adapters/a$i.gguf"
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

# One setup's clients against URL, reports as OUT_DIR/TAG-n-MODEL.json: switchyard picks the
# adapter by model name, llama-server (TAG llama-server) by the per-request "lora" field.
run_setup() { # tag n url
  local tag=$1 n=$2 url=$3 models m model per seed pids=() extra
  if [ "$n" -eq 0 ]; then models=(base); else models=(); for ((i = 1; i <= n; i++)); do models+=("a$i"); done; fi
  per=$((STREAMS / ${#models[@]}))
  rm -f "$OUT_DIR/$tag-$n"-*.json
  seed=0
  for m in "${models[@]}"; do
    seed=$((seed + 1))
    extra=()
    if [ "$tag" = llama-server ]; then
      [ "$m" != base ] && extra=(--extra-body "{\"lora\": [{\"id\": $((seed - 1)), \"scale\": 1.0}]}")
      model=smollm2
    else
      model=$m
    fi
    "$BIN" bench random --base-url "$url" --model "$model" --request-rate inf --concurrency "$per" --time "$TIME" \
      --input-len "$INPUT" --output-len "$OUTPUT" --range-ratio 0 --seed "$seed" "${extra[@]}" \
      --no-progress --output "$OUT_DIR/$tag-$n-$m.json" >/dev/null 2>"$OUT_DIR/$tag-$n-$m.err" &
    pids+=($!)
  done
  # A client whose requests all stay unfinished exits non-zero; its setup reports 0 tok/s.
  for p in "${pids[@]}"; do wait "$p" || echo "$tag, $n adapters: a client failed (see $OUT_DIR/$tag-$n-*.err)" >&2; done
}

for n in $SETUPS; do run_setup switchyard "$n" "$URL"; done
kill "$PID" 2>/dev/null || true
wait "$PID" 2>/dev/null || true
PID=

wait_models() { # port pid secs
  local i
  for ((i = 0; i < $3; i++)); do
    kill -0 "$2" 2>/dev/null || return 1
    curl -sf -m 2 "http://127.0.0.1:$1/v1/models" >/dev/null 2>&1 && return 0
    sleep 1
  done
  return 1
}
tags=(switchyard)
case " $PEERS " in *" llama-server "*)
  tags+=(llama-server)
  for n in $SETUPS; do
    files=()
    for ((i = 1; i <= n; i++)); do files+=("$OUT_DIR/adapters/a$i.gguf"); done
    lora=()
    if [ "$n" -gt 0 ]; then lora=(--lora "$(IFS=,; echo "${files[*]}")"); fi
    "$LLAMA_CPP_BIN/llama-server" -m "$GGUF" --alias smollm2 --host 127.0.0.1 --port "$LLAMA_PORT" \
      -t 2 -tb 2 -np "$STREAMS" -c $((1024 * STREAMS)) --no-webui "${lora[@]}" \
      >"$OUT_DIR/llama-server-$n.out" 2>"$OUT_DIR/llama-server-$n.err" &
    LPID=$!
    wait_models "$LLAMA_PORT" "$LPID" 120 || {
      echo "llama-server did not start" >&2
      tail "$OUT_DIR/llama-server-$n.err" >&2
      exit 1
    }
    run_setup llama-server "$n" "http://127.0.0.1:$LLAMA_PORT"
    kill "$LPID" 2>/dev/null || true
    wait "$LPID" 2>/dev/null || true
    LPID=
  done ;;
esac

python3 - "$OUT_DIR" "$STREAMS" "${tags[*]}" $SETUPS <<'PY'
import glob, json, sys
out, streams, tags = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
setups = [int(s) for s in sys.argv[4:]]
rows = {}
for t in tags:
    for n in setups:
        reports = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/{t}-{n}-*.json"))]
        if not reports:
            rows[t, n] = (0.0, -1)
            continue
        tokens = sum(r["tokens"]["output_total"] for r in reports)
        dur = max(r["duration_s"] for r in reports)
        # failed, and still unfinished when the drain timeout ran out
        failed = sum(r["requests"]["failed"] + r["requests"]["unfinished"] for r in reports)
        rows[t, n] = (tokens / dur if dur > 0 else 0.0, failed)
head = f"{'adapters':>8} {'streams':>7}"
for t in tags:
    head += f" {t + ' tok/s':>18} {'vs base':>8} {'failed':>6}"
if len(tags) > 1:
    head += f" {'switchyard / ' + tags[1]:>26}"
print(head)
for n in setups:
    line = f"{n:>8} {streams:>7}"
    for t in tags:
        tps, failed = rows[t, n]
        base = rows.get((t, 0), (0,))[0]
        rel = f"{tps / base:.2f}x" if base else "-"
        line += f" {tps:>18.1f} {rel:>8} {failed:>6}"
    if len(tags) > 1:
        peer = rows[tags[1], n][0]
        line += f" {(rows['switchyard', n][0] / peer if peer else float('nan')):>25.2f}x"
    print(line)
PY
