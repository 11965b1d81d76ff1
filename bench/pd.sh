#!/usr/bin/env bash
# Prefill/decode disaggregation against aggregated serving with the same engine count
# (issue 16): steady decode streams while long prompts arrive, through `switchyard up`.
#
#   bench/pd.sh                   # sim engines, H100 latency preset: 8 aggregated vs 4P4D
#   BACKEND=gguf bench/pd.sh      # real CPU engines (SmolLM2): 2 aggregated vs 1P1D
#
# Two `switchyard bench random` clients run side by side for TIME seconds:
#   decode: DECODE_STREAMS closed-loop streams, DECODE_INPUT tokens in, DECODE_OUTPUT out;
#   long:   long prompts at LONG_RATE req/s (Poisson), LONG_INPUT tokens in, LONG_OUTPUT out.
# Reported per setup: the decode streams' ITL (p50/p99; the goal is disaggregated ITL p99
# at most 0.5x the aggregated one), the long prompts' TTFT, and output tokens/s of both
# clients together (equal or better); the prefill/decode engines' own prompt-token
# sources show that decode engines computed no prompts.
#
# Env: BACKEND=sim|gguf SETUPS="agg:8 pd:4:4" TIME DECODE_STREAMS DECODE_INPUT DECODE_OUTPUT
#      LONG_RATE LONG_INPUT LONG_OUTPUT SIM_PRESET MAX_BATCHED TIME_SCALE OUT_DIR
#      SWITCHYARD_BIN SKIP_BUILD BASE_PORT
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BACKEND=${BACKEND:-sim}
if [ "$BACKEND" = sim ]; then
  SETUPS=${SETUPS:-"agg:8 pd:4:4"}
  TIME=${TIME:-60}
  DECODE_STREAMS=${DECODE_STREAMS:-64}
  DECODE_INPUT=${DECODE_INPUT:-256}
  DECODE_OUTPUT=${DECODE_OUTPUT:-512}
  LONG_RATE=${LONG_RATE:-2}
  LONG_INPUT=${LONG_INPUT:-8000}
  LONG_OUTPUT=${LONG_OUTPUT:-32}
  MAX_MODEL_LEN=${MAX_MODEL_LEN:-16384}
else
  SETUPS=${SETUPS:-"agg:2 pd:1:1"}
  TIME=${TIME:-90}
  DECODE_STREAMS=${DECODE_STREAMS:-4}
  DECODE_INPUT=${DECODE_INPUT:-64}
  DECODE_OUTPUT=${DECODE_OUTPUT:-256}
  LONG_RATE=${LONG_RATE:-0.1}
  LONG_INPUT=${LONG_INPUT:-1000}
  LONG_OUTPUT=${LONG_OUTPUT:-16}
  MAX_MODEL_LEN=${MAX_MODEL_LEN:-2048}
fi
# vLLM's default token budget per step for online serving on GPUs (8192): a long prompt
# is prefilled in one or two steps, and the decodes batched with them wait that long.
MAX_BATCHED=${MAX_BATCHED:-$([ "$BACKEND" = sim ] && echo 8192 || echo 512)}
SIM_PRESET=${SIM_PRESET:-llama-3.1-8b-h100}
SIM_BLOCKS=${SIM_BLOCKS:-20000}
TIME_SCALE=${TIME_SCALE:-2}
BASE_PORT=${BASE_PORT:-27900}
OUT_DIR=${OUT_DIR:-$ROOT/target/pd}
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
for s in $SETUPS; do
  IFS=: read -r kind a b <<<"$s"
  port=$((BASE_PORT + i)); i=$((i + 1))
  if [ "$kind" = pd ]; then
    engines=(--prefill-engines "$a" --decode-engines "$b")
  else
    engines=(--engines "$a")
  fi
  if [ "$BACKEND" = sim ]; then
    engine=(--backend sim --engine-arg=--sim-preset="$SIM_PRESET" --engine-arg=--time-scale="$TIME_SCALE"
      --engine-arg=--num-gpu-blocks-override="$SIM_BLOCKS")
  else
    engine=()
  fi
  "$BIN" up --host 127.0.0.1 --port "$port" "${engines[@]}" "${engine[@]}" \
    --engine-arg=--max-model-len="$MAX_MODEL_LEN" --engine-arg=--max-num-batched-tokens="$MAX_BATCHED" \
    --log-level warn >"$OUT_DIR/$s.out" 2>"$OUT_DIR/$s.err" &
  PID=$!
  wait_ready_line "$OUT_DIR/$s.out" "$PID" 300 || { echo "$s did not start" >&2; tail "$OUT_DIR/$s.err" >&2; exit 1; }
  url="http://127.0.0.1:$port"
  "$BIN" bench random --base-url "$url" --concurrency "$DECODE_STREAMS" --input-len "$DECODE_INPUT" \
    --output-len "$DECODE_OUTPUT" --range-ratio 0 --time "$TIME" --seed 1 --no-progress \
    --label "$s decode" --output "$OUT_DIR/$s.decode.json" >"$OUT_DIR/$s.decode.log" 2>&1 &
  dec=$!
  "$BIN" bench random --base-url "$url" --request-rate "$LONG_RATE" --input-len "$LONG_INPUT" \
    --output-len "$LONG_OUTPUT" --range-ratio 0 --time "$TIME" --seed 2 --no-progress \
    --label "$s long" --output "$OUT_DIR/$s.long.json" >"$OUT_DIR/$s.long.log" 2>&1 || echo "$s: long client failed" >&2
  wait "$dec" || echo "$s: decode client failed" >&2
  for u in $(sed -n 's/^  engine \(http:[^ ]*\).*$/\1/p' "$OUT_DIR/$s.err"); do
    echo "# engine $u"; curl -sf "$u/metrics" || true
  done >"$OUT_DIR/$s.metrics"
  curl -sf "$url/metrics" >"$OUT_DIR/$s.router.metrics" || true
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
done
echo "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); switchyard $(cd "$ROOT" && git rev-parse --short HEAD); loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
echo "backend $BACKEND$([ "$BACKEND" = sim ] && echo " ($SIM_PRESET, time scale $TIME_SCALE)"), max-num-batched-tokens $MAX_BATCHED, $TIME s;" \
  "decode: $DECODE_STREAMS streams ${DECODE_INPUT}->${DECODE_OUTPUT}; long: $LONG_RATE req/s ${LONG_INPUT}->${LONG_OUTPUT}"
python3 - "$OUT_DIR" $SETUPS <<'PY'
import json, sys
out, setups = sys.argv[1], sys.argv[2:]
print("| setup | decode ITL p50 | decode ITL p99 | decode ITL max | long TTFT p50 | long TTFT p90 | output tok/s | failed | decode engines' prompt tokens computed / transferred |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
base = None
for s in setups:
    try:
        d = json.load(open(f"{out}/{s}.decode.json"))
        l = json.load(open(f"{out}/{s}.long.json"))
    except Exception as e:
        print(f"| {s} | (no report: {e}) |"); continue
    tput = d["throughput"]["output_tokens_per_s"] + l["throughput"]["output_tokens_per_s"]
    failed = d["requests"]["failed"] + l["requests"]["failed"]
    src = {}
    engine = None
    for line in open(f"{out}/{s}.metrics"):
        if line.startswith("# engine "):
            engine = line.split()[2]; continue
        if line.startswith("vllm:prompt_tokens_by_source_total{"):
            name, v = line.rsplit(" ", 1)
            source = name.split('source="')[1].split('"')[0]
            src.setdefault(engine, {}).setdefault(source, 0.0)
            src[engine][source] += float(v)
    pd = ""
    if s.startswith("pd:"):
        n_p = int(s.split(":")[1])
        dec = list(src.values())[n_p:]
        pd = "%d / %d" % (sum(e.get("local_compute", 0) for e in dec),
                          sum(e.get("external_kv_transfer", 0) for e in dec))
    row = (d["itl_ms"]["p50"], d["itl_ms"]["p99"], l["ttft_ms"]["p50"], l["ttft_ms"]["p90"], tput,
           d["itl_ms"]["max"])
    if base is None:
        base = row
        rel = lambda k: ""
    else:
        rel = lambda k: " (%.2fx)" % (row[k] / base[k]) if base[k] else ""
    print(f"| {s} | {row[0]:.1f} ms{rel(0)} | {row[1]:.1f} ms{rel(1)} | {row[5]:.0f} ms{rel(5)} | {row[2]:.0f} ms{rel(2)} | {row[3]:.0f} ms{rel(3)} | {row[4]:.0f}{rel(4)} | {failed} | {pd} |")
PY
