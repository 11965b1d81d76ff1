#!/usr/bin/env bash
# KV cache server throughput, side by side in one run on loopback:
#   switchyard   `switchyard cache-server` (release build)
#   lmcache      LMCache's own `lmcache_server` (python -m lmcache.v1.server HOST PORT cpu;
#                installed by scripts/setup-lmcache.sh)
# Load: `switchyard bench cache` (the same client for both): CLIENTS connections PUT
# CHUNKS chunks of CHUNK_BYTES (default 5,898,240 bytes: one 256-token chunk of
# SmolLM2-135M's K and V in f16, 2 x 30 layers x 256 tokens x 3 heads x 64 x 2 bytes),
# then GET each back and compare it byte for byte. Each cell is repeated REPS times with
# the target order rotated; medians are reported.
# Then memory under oversubscription: a `switchyard cache-server --max-bytes 256 MiB`
# takes 10x that in PUTs (8 clients); its resident memory is sampled throughout.
#
# Usage: bench/cache-server.sh   (env: CLIENTS="1 8 64" CHUNKS=64 CHUNK_BYTES REPS=3
#                                 TARGETS="switchyard lmcache" OUT_DIR SWITCHYARD_BIN SKIP_BUILD)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${CLIENTS:-"1 8 64"}
CHUNKS=${CHUNKS:-64}
CHUNK_BYTES=${CHUNK_BYTES:-5898240}
REPS=${REPS:-3}
TARGETS=${TARGETS:-"switchyard lmcache"}
OUT_DIR=${OUT_DIR:-$ROOT/target/cache-server-bench}
BIN=${SWITCHYARD_BIN:-$ROOT/target/release/switchyard}
mkdir -p "$OUT_DIR"
RAW=$OUT_DIR/raw.tsv
NOTES=$OUT_DIR/notes.txt
: >"$NOTES"
note() { echo "$*" | tee -a "$NOTES" >&2; }

if [ -z "${SKIP_BUILD:-}" ] && [ -z "${SWITCHYARD_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p switchyard)
fi
[ -x "$BIN" ] || { echo "no switchyard binary at $BIN" >&2; exit 1; }
LMCACHE_PYTHON=${LMCACHE_PYTHON:-$("$ROOT/scripts/setup-lmcache.sh" | sed -n 's/^LMCACHE_PYTHON=//p' | tail -n 1)}

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port pid secs
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    kill -0 "$2" 2>/dev/null || return 1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

declare -A URL SPID
for t in $TARGETS; do
  case $t in
    switchyard)
      "$BIN" cache-server --host 127.0.0.1 --port 0 --http-port 0 --max-bytes $((8 << 30)) \
        --log-level warn >"$OUT_DIR/$t.out" 2>"$OUT_DIR/$t.err" &
      pid=$!; PIDS+=("$pid")
      wait_ready_line "$OUT_DIR/$t.out" "$pid" 30 || { note "$t: did not start"; continue; }
      URL[$t]=$(grep -o 'lm://[^ ]*' "$OUT_DIR/$t.out" | head -n 1) ;;
    lmcache)
      port=$(free_port)
      "$LMCACHE_PYTHON" -m lmcache.v1.server 127.0.0.1 "$port" cpu >"$OUT_DIR/$t.out" 2>"$OUT_DIR/$t.err" &
      pid=$!; PIDS+=("$pid")
      wait_port "$port" "$pid" 120 || { note "$t: did not start: $(tail -n 2 "$OUT_DIR/$t.err" | tr '\n' ' ')"; continue; }
      URL[$t]=lm://127.0.0.1:$port ;;
    *) echo "unknown target $t" >&2; exit 2 ;;
  esac
  SPID[$t]=$pid
  note "$t: ${URL[$t]} (pid $pid)"
done
ACTIVE=("${!URL[@]}")
note "machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); loadavg at start: $(cut -d' ' -f1-3 /proc/loadavg)"
note "versions: switchyard $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'), lmcache $("$LMCACHE_PYTHON" -c 'import importlib.metadata as m; print(m.version("lmcache"))' 2>/dev/null || echo '?')"

printf 'rep\tclients\ttarget\tput_gbps\tget_gbps\tverified\terrors\trss_kb\n' >"$RAW"
n=${#ACTIVE[@]}
for ((rep = 1; rep <= REPS; rep++)); do
  for c in $CLIENTS; do
    for ((i = 0; i < n; i++)); do
      t=${ACTIVE[$(((i + rep - 1) % n))]}
      json=$OUT_DIR/$t-$c-$rep.json
      "$BIN" bench cache --url "${URL[$t]}" --clients "$c" --chunk-bytes "$CHUNK_BYTES" --chunks "$CHUNKS" \
        --timeout 120 --output "$json" >/dev/null 2>"$OUT_DIR/bench.err" || note "$t c=$c rep $rep: $(tail -n 1 "$OUT_DIR/bench.err")"
      python3 - "$json" "$rep" "$c" "$t" "$(rss_kb "${SPID[$t]}")" >>"$RAW" <<'PY'
import json, sys
path, rep, c, t, rss = sys.argv[1:]
try:
    r = json.load(open(path))
except Exception:
    r = {"put_gbps": 0, "get_gbps": 0, "verified": 0, "errors": -1}
print(f"{rep}\t{c}\t{t}\t{r['put_gbps']:.4f}\t{r['get_gbps']:.4f}\t{r['verified']}\t{r['errors']}\t{rss}")
PY
      tail -n 1 "$RAW" >&2
    done
  done
done

# Memory under a 10x oversubscribed write load.
MAX=$((256 << 20))
"$BIN" cache-server --host 127.0.0.1 --port 0 --http-port 0 --max-bytes $MAX --log-level warn \
  >"$OUT_DIR/bounded.out" 2>"$OUT_DIR/bounded.err" &
BPID=$!; PIDS+=("$BPID")
wait_ready_line "$OUT_DIR/bounded.out" "$BPID" 30
BURL=$(grep -o 'lm://[^ ]*' "$OUT_DIR/bounded.out" | head -n 1)
BHTTP=$(sed -n 's/^READY //p' "$OUT_DIR/bounded.out" | head -n 1)
OVER=$((10 * MAX / CHUNK_BYTES + 1))
"$BIN" bench cache --url "$BURL" --clients 8 --chunk-bytes "$CHUNK_BYTES" --chunks "$OVER" --put-only \
  --timeout 120 --output "$OUT_DIR/bounded.json" >/dev/null 2>&1 &
LOADPID=$!
peak=0
while kill -0 "$LOADPID" 2>/dev/null; do
  r=$(rss_kb "$BPID"); [ "$r" -gt "$peak" ] && peak=$r
  sleep 0.2
done
wait "$LOADPID" || note "bounded: the load reported errors"
held=$(curl -s "$BHTTP/metrics" | awk '/^switchyard_cache_server_bytes /{print $2}')
evicted=$(curl -s "$BHTTP/metrics" | awk '/^switchyard_cache_server_evictions_total /{print $2}')
note "oversubscribed: --max-bytes $MAX, $OVER chunks of $CHUNK_BYTES written ($((OVER * CHUNK_BYTES / 1048576)) MiB, 8 clients): peak RSS $((peak / 1024)) MiB, held $held bytes, evicted $evicted chunks, RSS after $(($(rss_kb "$BPID") / 1024)) MiB"

python3 - "$RAW" "$NOTES" <<'PY'
import csv, statistics, sys
raw, notes = sys.argv[1:]
rows = list(csv.DictReader(open(raw), delimiter="\t"))
cells = {}
for r in rows:
    d = cells.setdefault((int(r["clients"]), r["target"]), {"put": [], "get": [], "bad": 0, "n": 0, "rss": 0})
    d["put"].append(float(r["put_gbps"])); d["get"].append(float(r["get_gbps"]))
    d["bad"] += int(r["errors"]) != 0 or int(r["verified"]) == 0
    d["n"] += 1; d["rss"] = max(d["rss"], int(r["rss_kb"]))
med = statistics.median
print(open(notes).read().strip()); print()
print("| clients | target | PUT GB/s | GET GB/s | runs | failed runs | server RSS MiB (max) |")
print("|---:|---|---:|---:|---:|---:|---:|")
for (c, t) in sorted(cells):
    d = cells[(c, t)]
    print(f"| {c} | {t} | {med(d['put']):.3f} | {med(d['get']):.3f} | {d['n']} | {d['bad']} | {d['rss'] // 1024} |")
print()
for c in sorted({c for c, _ in cells}):
    s, l = cells.get((c, "switchyard")), cells.get((c, "lmcache"))
    if s and l and med(l["put"]) > 0 and med(l["get"]) > 0:
        print(f"- {c} clients: switchyard/lmcache PUT {med(s['put']) / med(l['put']):.2f}x, GET {med(s['get']) / med(l['get']):.2f}x")
PY
