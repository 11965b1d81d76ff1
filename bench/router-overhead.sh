#!/usr/bin/env bash
# Router overhead, side by side, in one run on loopback.
#
# One zero-latency sim engine; four ways to reach it:
#   direct         the engine itself (no router)
#   switchyard     `switchyard router` (roundrobin)
#   vllm-router    PyPI vllm-router   (python -m vllm_router.launch_router, round_robin)
#   sglang-router  PyPI sglang-router (python -m sglang_router.launch_router, round_robin)
#   baseline       `switchyard router` from another build, $BASELINE_BIN (e.g. the commit
#                  before a refactor), to check for regressions side by side
#   switchyard-keys  `switchyard router` with the front door on: a keys file of 1,000 keys,
#                  the caller's with a rate limit (never reached); every target gets the
#                  same `Authorization: Bearer` header, so only this one checks it.
#                  TARGETS="direct switchyard switchyard-keys" for the cost of the checks
# Cases: a non-streamed completion (max_tokens 4) and a streamed one with 16 token
# chunks (max_tokens 16, i.e. 16 data frames + [DONE]), both ignore_eos, each at 1 and
# 64 connections, loaded by wrk (one thread) with a Lua script doing the POST.
# Each cell: WARMUP s of warm-up, then DURATION s measured; the whole grid is repeated
# REPS times with the target order rotated each time, and medians are reported.
# CPU per request: utime+stime (+cutime+cstime) from /proc/PID/stat of the process
# that owns the listening socket (and its descendants), before/after the measured run,
# divided by the requests wrk completed.
#
# Usage: bench/router-overhead.sh            (env: DURATION WARMUP REPS CONNS TARGETS
#                                             BASE_PORT OUT_DIR SWITCHYARD_BIN SKIP_BUILD
#                                             BASELINE_BIN)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
REPS=${REPS:-3}
CONNS=${CONNS:-"1 64"}
TARGETS=${TARGETS:-"direct switchyard vllm-router sglang-router"}
BASE_PORT=${BASE_PORT:-27400}
OUT_DIR=${OUT_DIR:-$ROOT/target/router-overhead}
CACHE=${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}
VENV=$CACHE/peers-venv
BIN=${SWITCHYARD_BIN:-$ROOT/target/release/switchyard}
MODEL=switchyard-sim
CLK_TCK=$(getconf CLK_TCK)

mkdir -p "$OUT_DIR"
RAW=$OUT_DIR/raw.tsv
NOTES=$OUT_DIR/notes.txt
: > "$NOTES"
note() { echo "$*" | tee -a "$NOTES" >&2; }

# ---------------------------------------------------------------- prerequisites
if [ -z "${SKIP_BUILD:-}" ] && [ -z "${SWITCHYARD_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q)
fi
[ -x "$BIN" ] || { echo "no switchyard binary at $BIN" >&2; exit 1; }

if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null
  else
    echo "wrk is missing: apt-get install wrk" >&2; exit 1
  fi
fi

PEERS_OK=1
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import vllm_router, sglang_router' 2>/dev/null; then
  mkdir -p "$CACHE"
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q vllm-router sglang-router; } \
    >"$OUT_DIR/pip.log" 2>&1 || { PEERS_OK=0; note "peer install failed: $(tail -n 3 "$OUT_DIR/pip.log" | tr '\n' ' ')"; }
fi
peer_version() { "$VENV/bin/pip" show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }

# ---------------------------------------------------------------- processes
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
# the API key the routers here are started with (wait_completion sends it too)
AUTH_KEY=sk-bench-0500-0123456789abcdef
# the pid that owns the listening socket on a port
listener_pid() { ss -ltnpH "sport = :$1" | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2; }
# utime+stime+cutime+cstime (ticks) of a pid and its descendants
cpu_ticks() {
  local total=0 p kids t
  local todo=("$1")
  while [ ${#todo[@]} -gt 0 ]; do
    p=${todo[0]}; todo=("${todo[@]:1}")
    if [ -r "/proc/$p/stat" ]; then
      t=$(sed 's/^.*) //' "/proc/$p/stat" | awk '{print $12+$13+$14+$15}')
      total=$((total + t))
      kids=$(ps -o pid= --ppid "$p" 2>/dev/null || true)
      for k in $kids; do todo+=("$k"); done
    fi
  done
  echo "$total"
}

ENGINE_PORT=$BASE_PORT
declare -A PORT SPID
"$BIN" engine --backend sim --sim-preset zero --host 127.0.0.1 --port "$ENGINE_PORT" \
  --log-level warn >"$OUT_DIR/engine.out" 2>"$OUT_DIR/engine.err" &
ENGINE_PID=$!; PIDS+=("$ENGINE_PID")
wait_ready_line "$OUT_DIR/engine.out" "$ENGINE_PID" 30 || { echo "engine did not start" >&2; cat "$OUT_DIR/engine.err" >&2; exit 1; }
PORT[direct]=$ENGINE_PORT; SPID[direct]=$ENGINE_PID
UP=http://127.0.0.1:$ENGINE_PORT

ACTIVE=()
for t in $TARGETS; do
  case $t in
    direct) ACTIVE+=(direct); continue ;;
    switchyard|baseline|switchyard-keys)
      extra=()
      if [ $t = switchyard ]; then port=$((BASE_PORT + 1)); rbin=$BIN
      elif [ $t = switchyard-keys ]; then port=$((BASE_PORT + 5)); rbin=$BIN
        { echo "keys:"; for i in $(seq 0 999); do
            printf '  - name: user-%d\n    key: sk-bench-%04d-0123456789abcdef\n' "$i" "$i"
            printf '    limits: {requests_per_minute: 1000000000000, tokens_per_minute: 1000000000000000}\n'
          done; } >"$OUT_DIR/keys.yaml"
        extra=(--api-keys-file "$OUT_DIR/keys.yaml")
      else
        port=$((BASE_PORT + 4)); rbin=${BASELINE_BIN:-}
        [ -x "$rbin" ] || { note "baseline: not measured (set BASELINE_BIN)"; continue; }
      fi
      "$rbin" router --host 127.0.0.1 --port $port --static-backends "$UP" --static-models $MODEL \
        --routing-logic roundrobin --log-level warn ${extra[@]+"${extra[@]}"} >"$OUT_DIR/$t.out" 2>"$OUT_DIR/$t.err" &
      pid=$!; PIDS+=("$pid")
      wait_ready_line "$OUT_DIR/$t.out" "$pid" 30 && wait_completion $port "$pid" 30 || pid= ;;
    vllm-router|sglang-router)
      [ "$PEERS_OK" = 1 ] || { note "$t: not measured (install failed)"; continue; }
      if [ $t = vllm-router ]; then
        port=$((BASE_PORT + 2))
        "$VENV/bin/python" -m vllm_router.launch_router --host 127.0.0.1 --port $port \
          --worker-urls "$UP" --policy round_robin --log-level warning \
          --prometheus-host 127.0.0.1 --prometheus-port $((BASE_PORT + 12)) \
          >"$OUT_DIR/$t.out" 2>"$OUT_DIR/$t.err" &
      else
        port=$((BASE_PORT + 3))
        "$VENV/bin/python" -m sglang_router.launch_router --host 127.0.0.1 --port $port \
          --worker-urls "$UP" --policy round_robin --log-level warn \
          --prometheus-host 127.0.0.1 --prometheus-port $((BASE_PORT + 13)) \
          >"$OUT_DIR/$t.out" 2>"$OUT_DIR/$t.err" &
      fi
      pid=$!; PIDS+=("$pid")
      wait_completion $port "$pid" 60 || pid= ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
  if [ -z "$pid" ]; then
    note "$t: not measured (did not start: $(tail -n 2 "$OUT_DIR/$t.err" 2>/dev/null | tr '\n' ' '))"
    continue
  fi
  serving=$(listener_pid $port)
  PORT[$t]=$port; SPID[$t]=${serving:-$pid}
  note "$t: port $port, launched pid $pid, serving pid ${SPID[$t]} ($(ps -o comm= -p "${SPID[$t]}"), $(ls /proc/${SPID[$t]}/task | wc -l) threads)"
  ACTIVE+=("$t")
done

# ---------------------------------------------------------------- load
LUA_DIR=$OUT_DIR/lua; mkdir -p "$LUA_DIR"
mklua() { # name body
  cat >"$LUA_DIR/$1.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $AUTH_KEY"
wrk.body = '$2'
done = function(s, lat, req)
  io.write(string.format("RESULT %d %d %d %d %d %d\n", s.requests, s.duration, s.errors.status,
    s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout,
    lat:percentile(50), lat:percentile(99)))
end
EOF
}
mklua nonstream "{\"model\":\"$MODEL\",\"prompt\":\"The quick brown fox jumps over the lazy dog\",\"max_tokens\":4,\"ignore_eos\":true}"
mklua stream16 "{\"model\":\"$MODEL\",\"prompt\":\"The quick brown fox jumps over the lazy dog\",\"max_tokens\":16,\"ignore_eos\":true,\"stream\":true}"

# sanity: every target answers the stream case with 16 data frames + [DONE]
for t in "${ACTIVE[@]}"; do
  n=$(curl -sN -m 5 -H 'content-type: application/json' -H "authorization: Bearer $AUTH_KEY" \
    -d "{\"model\":\"$MODEL\",\"prompt\":\"x\",\"max_tokens\":16,\"ignore_eos\":true,\"stream\":true}" \
    "http://127.0.0.1:${PORT[$t]}/v1/completions" | grep -c '^data: ' || true)
  note "$t: stream16 gives $n data frames (16 tokens + [DONE] = 17 expected)"
done

note "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), kernel $(uname -r); loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
note "versions: switchyard $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'), vllm-router $(peer_version vllm-router), sglang-router $(peer_version sglang-router), $(wrk -v 2>&1 | head -n 1 | cut -d' ' -f1-2)"

printf 'rep\tcase\tconns\ttarget\trequests\tduration_us\tstatus_err\tsock_err\tp50_us\tp99_us\trouter_ticks\tengine_ticks\n' >"$RAW"
n=${#ACTIVE[@]}
for ((rep = 1; rep <= REPS; rep++)); do
  for case in nonstream stream16; do
    for c in $CONNS; do
      for ((i = 0; i < n; i++)); do
        t=${ACTIVE[$(((i + rep - 1) % n))]}
        url=http://127.0.0.1:${PORT[$t]}/v1/completions
        wrk -t1 -c"$c" -d"${WARMUP}s" -s "$LUA_DIR/$case.lua" "$url" >/dev/null
        r0=$(cpu_ticks "${SPID[$t]}"); e0=$(cpu_ticks "$ENGINE_PID")
        res=$(wrk -t1 -c"$c" -d"${DURATION}s" -s "$LUA_DIR/$case.lua" "$url" | awk '/^RESULT/{$1=""; print}')
        r1=$(cpu_ticks "${SPID[$t]}"); e1=$(cpu_ticks "$ENGINE_PID")
        [ "$t" = direct ] && rt=0 || rt=$((r1 - r0))
        read -r req dur se soe p50 p99 <<<"$res"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$case" "$c" "$t" \
          "$req" "$dur" "$se" "$soe" "$p50" "$p99" "$rt" "$((e1 - e0))" >>"$RAW"
        printf 'rep %d %-9s c=%-3s %-14s %8.0f req/s  p50 %6.3f ms  p99 %7.3f ms  errors %s/%s\n' \
          "$rep" "$case" "$c" "$t" "$(echo "$req $dur" | awk '{print $1*1e6/$2}')" \
          "$(echo "$p50" | awk '{print $1/1000}')" "$(echo "$p99" | awk '{print $1/1000}')" "$se" "$soe" >&2
      done
    done
  done
done
note "loadavg at end: $(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------- report
python3 - "$RAW" "$CLK_TCK" "$NOTES" <<'PY'
import csv, statistics, sys
raw, tck, notes = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
order = ["direct", "switchyard", "switchyard-keys", "baseline", "vllm-router", "sglang-router"]
cells = {}
for r in rows:
    req, dur = int(r["requests"]), int(r["duration_us"])
    k = (r["case"], int(r["conns"]), r["target"])
    d = cells.setdefault(k, {"rps": [], "p50": [], "p99": [], "cpu": [], "eng": [], "err": 0, "n": 0})
    d["rps"].append(req * 1e6 / dur)
    d["p50"].append(int(r["p50_us"]) / 1000)
    d["p99"].append(int(r["p99_us"]) / 1000)
    d["cpu"].append(int(r["router_ticks"]) * 1e6 / tck / max(req, 1))
    d["eng"].append(int(r["engine_ticks"]) * 1e6 / tck / max(req, 1))
    d["err"] += int(r["status_err"]) + int(r["sock_err"])
    d["n"] += 1
med = statistics.median
cases = [("nonstream", "non-streamed, max_tokens 4"), ("stream16", "streamed, 16 chunks")]
conns = sorted({k[1] for k in cells})
print(open(notes).read().strip())
print()
print("| case | conns | target | req/s | p50 ms | p99 ms | p50 added vs direct, ms | router CPU µs/req | engine CPU µs/req | runs | errors |")
print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for cs, label in cases:
    for c in conns:
        base = cells.get((cs, c, "direct"))
        for t in order:
            d = cells.get((cs, c, t))
            if not d:
                continue
            added = "" if t == "direct" or not base else f"{med(d['p50']) - med(base['p50']):+.3f}"
            cpu = "—" if t == "direct" else f"{med(d['cpu']):.0f}"
            print(f"| {label} | {c} | {t} | {med(d['rps']):,.0f} | {med(d['p50']):.3f} | {med(d['p99']):.3f} | "
                  f"{added} | {cpu} | {med(d['eng']):.0f} | {d['n']} | {d['err']} |")
print()
print("Ratios (medians): switchyard throughput / better peer's; switchyard CPU vs goals (≤30 µs non-streamed, ≤100 µs per 16-chunk stream, ≤+0.05 ms p50 at 1 connection)")
for cs, label in cases:
    goal = 30 if cs == "nonstream" else 100
    for c in conns:
        us = cells.get((cs, c, "switchyard"))
        if not us:
            continue
        peers = [(t, med(cells[(cs, c, t)]["rps"])) for t in ("vllm-router", "sglang-router") if (cs, c, t) in cells]
        line = f"- {label}, {c} conn: "
        if peers:
            bt, br = max(peers, key=lambda x: x[1])
            line += f"throughput {med(us['rps']) / br:.2f}x {bt}; "
        cpu = med(us["cpu"])
        line += f"CPU {cpu:.0f} µs/req (goal ≤{goal}: {'met' if cpu <= goal else 'MISSED'})"
        base = cells.get((cs, c, "direct"))
        if c == 1 and base:
            added = med(us["p50"]) - med(base["p50"])
            line += f"; p50 added {added:+.3f} ms (goal ≤+0.050: {'met' if added <= 0.05 else 'MISSED'})"
        print(line)
        keys = cells.get((cs, c, "switchyard-keys"))
        if keys:
            extra = med(keys["cpu"]) - cpu
            print(f"  with keys and a rate limit: CPU {extra:+.1f} µs/req (goal ≤+3: {'met' if extra <= 3 else 'MISSED'}), "
                  f"throughput {med(keys['rps']) / med(us['rps']):.2f}x")
        bl = cells.get((cs, c, "baseline"))
        if bl:
            print(f"  vs baseline: throughput {med(us['rps']) / med(bl['rps']):.2f}x, "
                  f"CPU {cpu / max(med(bl['cpu']), 1e-9):.2f}x, p50 {med(us['p50']) / max(med(bl['p50']), 1e-9):.2f}x")
PY
