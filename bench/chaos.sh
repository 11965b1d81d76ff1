#!/usr/bin/env bash
# Chaos: requests lost and throughput when one of 4 engines goes bad mid-run, for each
# routing logic, side by side with vllm-router and sglang-router under the same faults.
#
# Each case: 4 Switchyard sim engines (default latency preset) behind one router, loaded
# by `switchyard bench random` (CONCURRENCY streams, chat, 256 tokens in, 128 out) for
# DURATION s; at FAULT_AT s the second engine goes bad:
#   none     nothing (the reference for throughput)
#   kill     SIGKILL
#   stop     SIGSTOP (frozen: the kernel still accepts its connections)
#   http500  answers 500 to every generation request (hidden engine knob
#            --fault-http-500-rate 1, switched on by SIGUSR1)
#   slow     every answer, /health included, delayed SLOW_MS (--fault-delay-ms)
# Every router gets the same health checks where it has the flags: every 1 s, 1 s to
# answer, 2 failures eject (switchyard: --health-check-interval 1
# --health-check-timeout-secs 1 --health-failure-threshold 2; the peers:
# --health-check-interval-secs 1 --health-check-timeout-secs 1
# --health-failure-threshold 2); everything else (breakers, retries) at its defaults.
# Routing logics and the peers' nearest policy (none: not run for that peer):
#   roundrobin  -> round_robin             (both)
#   session     -> consistent_hash         (vllm-router; bench sends no session id, so
#                                           Switchyard falls back to least load)
#   leastload   -> power_of_two            (both; the nearest they have)
#   prefixaware -> cache_aware             (both)
#   kvaware     -> none                    (vllm-router's kv_aware needs its event
#                                           sources wired per engine: not done here)
# Reported per case: requests completed, lost (failed, by kind: `connect`,
# `disconnected`, `http_5xx`, `timeout` are before the first byte or hung; `truncated`
# is a stream cut mid-way), hung (still running DRAIN s after the run: stuck on a
# frozen engine), throughput (completed/s) and its ratio to the same router and logic
# without a fault. A request taking over REQUEST_TIMEOUT s counts as lost (`timeout`).
#
# Usage: bench/chaos.sh     (env: DURATION FAULT_AT CONCURRENCY ROUTERS LOGICS FAULTS
#                            SLOW_MS REQUEST_TIMEOUT DRAIN BASE_PORT OUT_DIR
#                            SWITCHYARD_BIN SKIP_BUILD)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-15}
FAULT_AT=${FAULT_AT:-5}
CONCURRENCY=${CONCURRENCY:-32}
ROUTERS=${ROUTERS:-"switchyard vllm-router sglang-router"}
LOGICS=${LOGICS:-"roundrobin session leastload prefixaware kvaware"}
FAULTS=${FAULTS:-"none kill stop http500 slow"}
SLOW_MS=${SLOW_MS:-5000}
REQUEST_TIMEOUT=${REQUEST_TIMEOUT:-20}
DRAIN=${DRAIN:-5}
BASE_PORT=${BASE_PORT:-27600}
OUT_DIR=${OUT_DIR:-$ROOT/target/chaos}
CACHE=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
VENV=$CACHE/peers-venv
BIN=${SWITCHYARD_BIN:-$ROOT/target/release/switchyard}
MODEL=switchyard-sim
EVENTS='{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:0","replay_endpoint":"tcp://*:0","topic":"kv"}'

mkdir -p "$OUT_DIR"
RAW=$OUT_DIR/raw.tsv
NOTES=$OUT_DIR/notes.txt
: >"$NOTES"
note() { echo "$*" | tee -a "$NOTES" >&2; }

# ---------------------------------------------------------------- prerequisites
if [ -z "${SKIP_BUILD:-}" ] && [ -z "${SWITCHYARD_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p switchyard)
fi
[ -x "$BIN" ] || { echo "no switchyard binary at $BIN" >&2; exit 1; }

PEERS_OK=1
if [[ " $ROUTERS " == *" vllm-router "* || " $ROUTERS " == *" sglang-router "* ]]; then
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import vllm_router, sglang_router' 2>/dev/null; then
    mkdir -p "$CACHE"
    { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q vllm-router sglang-router; } \
      >"$OUT_DIR/pip.log" 2>&1 || { PEERS_OK=0; note "peer install failed: $(tail -n 3 "$OUT_DIR/pip.log" | tr '\n' ' ')"; }
  fi
fi
peer_version() { "$VENV/bin/pip" show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }

# ---------------------------------------------------------------- processes
PIDS=()
kill_all() {
  local p
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  PIDS=()
}
trap kill_all EXIT INT TERM

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

peer_policy() { # router logic -> policy, or empty when the peer has none
  case "$1:$2" in
    *:roundrobin) echo round_robin ;;
    *:prefixaware) echo cache_aware ;;
    *:leastload) echo power_of_two ;;
    vllm-router:session) echo consistent_hash ;;
    *) echo ;;
  esac
}

# start 4 engines (the second with the fault's knob) and the router; sets ENGINE_PIDS,
# ROUTER_PORT; false when something did not start
start_stack() { # router logic fault
  local router=$1 logic=$2 fault=$3 i port extra pid urls=()
  ENGINE_PIDS=()
  for i in 1 2 3 4; do
    port=$((BASE_PORT + i))
    extra=()
    [ "$logic" = kvaware ] && extra+=(--kv-events-config "$EVENTS")
    if [ $i = 2 ]; then
      case $fault in
        http500) extra+=(--fault-http-500-rate 1 --fault-on-signal) ;;
        slow) extra+=(--fault-delay-ms "$SLOW_MS" --fault-on-signal) ;;
      esac
    fi
    "$BIN" engine --backend sim --host 127.0.0.1 --port $port --log-level warn "${extra[@]}" \
      >"$OUT_DIR/engine$i.out" 2>"$OUT_DIR/engine$i.err" &
    pid=$!; PIDS+=("$pid"); ENGINE_PIDS+=("$pid")
    urls+=("http://127.0.0.1:$port")
  done
  for i in 0 1 2 3; do
    wait_ready_line "$OUT_DIR/engine$((i + 1)).out" "${ENGINE_PIDS[$i]}" 30 || return 1
  done
  ROUTER_PORT=$BASE_PORT
  case $router in
    switchyard)
      "$BIN" router --host 127.0.0.1 --port $ROUTER_PORT --static-backends "$(IFS=,; echo "${urls[*]}")" \
        --routing-logic "$logic" --health-check-interval 1 --health-check-timeout-secs 1 \
        --health-failure-threshold 2 --log-level warn >"$OUT_DIR/router.out" 2>"$OUT_DIR/router.err" &
      ;;
    vllm-router | sglang-router)
      local module=${router//-/_} level=warn
      [ "$router" = vllm-router ] && level=warning
      "$VENV/bin/python" -m "$module.launch_router" --host 127.0.0.1 --port $ROUTER_PORT \
        --worker-urls "${urls[@]}" --policy "$(peer_policy "$router" "$logic")" \
        --health-check-interval-secs 1 --health-check-timeout-secs 1 --health-failure-threshold 2 \
        --log-level $level --prometheus-host 127.0.0.1 --prometheus-port $((BASE_PORT + 10)) \
        >"$OUT_DIR/router.out" 2>"$OUT_DIR/router.err" &
      ;;
  esac
  pid=$!; PIDS+=("$pid")
  wait_completion $ROUTER_PORT "$pid" 60
}

strike() { # fault pid
  case $1 in
    none) ;;
    kill) kill -9 "$2" ;;
    stop) kill -STOP "$2" ;;
    http500 | slow) kill -USR1 "$2" ;;
  esac
}

note "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), kernel $(uname -r); loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
note "versions: switchyard $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'), vllm-router $(peer_version vllm-router), sglang-router $(peer_version sglang-router)"
note "load: bench random, $CONCURRENCY streams, ${DURATION}s, fault at ${FAULT_AT}s on engine 2 of 4; slow = ${SLOW_MS} ms"

printf 'router\tlogic\tfault\tlaunched\tcompleted\tfailed\tunfinished\trps\terrors\n' >"$RAW"
for router in $ROUTERS; do
  for logic in $LOGICS; do
    if [ "$router" != switchyard ]; then
      [ "$PEERS_OK" = 1 ] || continue
      [ -n "$(peer_policy "$router" "$logic")" ] || continue
    fi
    for fault in $FAULTS; do
      if ! start_stack "$router" "$logic" "$fault"; then
        note "$router $logic $fault: did not start: $(tail -n 2 "$OUT_DIR/router.err" | tr '\n' ' ')"
        kill_all; continue
      fi
      json=$OUT_DIR/$router-$logic-$fault.json
      "$BIN" bench random --base-url "http://127.0.0.1:$ROUTER_PORT" --model $MODEL \
        --concurrency "$CONCURRENCY" --time "$DURATION" --request-timeout "$REQUEST_TIMEOUT" \
        --drain-timeout "$DRAIN" --no-progress --output "$json" >"$OUT_DIR/bench.out" 2>&1 &
      bench=$!
      sleep "$FAULT_AT"
      strike "$fault" "${ENGINE_PIDS[1]}"
      wait $bench || true
      kill_all
      row=$(python3 - "$json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
q = r["requests"]
errs = ",".join(f"{k}:{v}" for k, v in sorted(r["errors"].items())) or "-"
print(q["launched"], q["completed"], q["failed"], q["unfinished"],
      round(r["throughput"]["requests_per_s"], 2), errs, sep="\t")
EOF
      ) || row="0	0	0	0	0	no-report"
      printf '%s\t%s\t%s\t%s\n' "$router" "$logic" "$fault" "$row" >>"$RAW"
      note "$router $logic $fault: $(echo "$row" | awk -F'\t' '{printf "completed %s lost %s (%s) hung %s, %s req/s", $2, $3, $6, $4, $5}')"
    done
  done
done

# ---------------------------------------------------------------- table
python3 - "$RAW" "$FAULTS" <<'EOF' | tee "$OUT_DIR/table.md"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
faults = sys.argv[2].split()
cell = {(r["router"], r["logic"], r["fault"]): r for r in rows}
print("| router | logic | " + " | ".join(faults) + " |")
print("|---|---|" + "---|" * len(faults))
seen = []
for r in rows:
    k = (r["router"], r["logic"])
    if k not in seen:
        seen.append(k)
for router, logic in seen:
    base = cell.get((router, logic, "none"))
    base_rps = float(base["rps"]) if base else 0.0
    out = []
    for f in faults:
        c = cell.get((router, logic, f))
        if not c:
            out.append("n/a")
            continue
        rps = float(c["rps"])
        ratio = f" ({rps / base_rps:.2f}x)" if base_rps and f != "none" else ""
        lost = c["failed"] if c["errors"] in ("-", "") else f'{c["failed"]} ({c["errors"]})'
        hung = f', hung {c["unfinished"]}' if c["unfinished"] != "0" else ""
        out.append(f"lost {lost}{hung}; {rps:.1f} req/s{ratio}")
    print(f"| {router} | {logic} | " + " | ".join(out) + " |")
EOF
