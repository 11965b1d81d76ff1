#!/usr/bin/env bash
# Soak: unique random prompts at a steady Poisson rate through `switchyard up` (router +
# sim engines) for DURATION seconds, sampling every process's RSS every SAMPLE seconds.
# Goal (issue 15): after warm-up, each process's RSS stays within ±10% of its median,
# and no request fails.
#
# Usage: bench/soak.sh            (env: DURATION=3600 RATE=50 ENGINES=2 SAMPLE=10
#                                  WARMUP=120 OUTPUT_LEN=32 INPUT_LEN=256 ROUTING=roundrobin
#                                  OUT_DIR SWITCHYARD_BIN SKIP_BUILD)
# Prints a table per process (samples, median MiB after warm-up, min/max as % of the
# median, verdict) and the bench's own totals; exits non-zero if a goal is missed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/bench/lib.sh"
DURATION=${DURATION:-3600}
RATE=${RATE:-50}
ENGINES=${ENGINES:-2}
SAMPLE=${SAMPLE:-10}
WARMUP=${WARMUP:-120}
INPUT_LEN=${INPUT_LEN:-256}
OUTPUT_LEN=${OUTPUT_LEN:-32}
ROUTING=${ROUTING:-roundrobin}
OUT_DIR=${OUT_DIR:-$ROOT/target/soak}
BIN=${SWITCHYARD_BIN:-$ROOT/target/release/switchyard}
if [ -z "${SKIP_BUILD:-}" ] && [ -z "${SWITCHYARD_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p switchyard)
fi
[ -x "$BIN" ] || { echo "no switchyard binary at $BIN" >&2; exit 1; }
mkdir -p "$OUT_DIR"
RSS=$OUT_DIR/rss.tsv
: > "$RSS"

"$BIN" up --backend sim --engines "$ENGINES" --host 127.0.0.1 --port 0 \
  --routing-logic "$ROUTING" > "$OUT_DIR/up.out" 2> "$OUT_DIR/up.err" &
UP=$!
trap 'kill $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT
wait_ready_line "$OUT_DIR/up.out" "$UP" 120 || { echo "up did not start" >&2; tail "$OUT_DIR/up.err" >&2; exit 1; }
URL=$(sed -n 's/^READY //p' "$OUT_DIR/up.out" | head -1)
PIDS="$UP $(pgrep -P "$UP" | tr '\n' ' ')"
echo "soak: $URL, router pid $UP, engines $(pgrep -P "$UP" | tr '\n' ' '), ${DURATION}s at ${RATE} req/s" >&2

sampler() {
  local t0=$SECONDS
  while kill -0 "$UP" 2>/dev/null; do
    for p in $PIDS; do
      local kb
      kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
      [ -n "$kb" ] && printf '%s\t%s\t%s\n' "$((SECONDS - t0))" "$p" "$kb" >> "$RSS"
    done
    sleep "$SAMPLE"
  done
}
sampler &
SAMPLER=$!
trap 'kill $SAMPLER $UP 2>/dev/null; wait $UP 2>/dev/null || true' EXIT

"$BIN" bench random --base-url "$URL" --request-rate "$RATE" --time "$DURATION" \
  --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --seed "$RANDOM" --no-progress \
  --output "$OUT_DIR/bench.json" > "$OUT_DIR/bench.out" 2> "$OUT_DIR/bench.err" || true
kill "$SAMPLER" 2>/dev/null || true

python3 - "$RSS" "$WARMUP" "$OUT_DIR/bench.json" "$UP" <<'PY'
import json, statistics, sys
rss_path, warmup, bench_path, router = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
by = {}
for line in open(rss_path):
    t, pid, kb = line.split()
    if float(t) >= warmup:
        by.setdefault(pid, []).append(int(kb) / 1024)
ok = True
print(f"{'process':<18}{'samples':>8}{'median MiB':>12}{'min %':>8}{'max %':>8}  verdict")
for pid, xs in sorted(by.items(), key=lambda kv: kv[0] != router):
    med = statistics.median(xs)
    lo, hi = min(xs) / med * 100 - 100, max(xs) / med * 100 - 100
    flat = lo >= -10 and hi <= 10
    ok &= flat
    name = "router" if pid == router else f"engine {pid}"
    print(f"{name:<18}{len(xs):>8}{med:>12.1f}{lo:>+8.1f}{hi:>+8.1f}  {'flat' if flat else 'NOT FLAT'}")
try:
    rep = json.load(open(bench_path))
except (OSError, ValueError) as e:
    print(f"no bench report: {e}"); sys.exit(1)
req = rep["requests"]
print(f"bench: launched {req['launched']}, completed {req['completed']}, failed {req['failed']}, "
      f"unfinished {req['unfinished']}; {rep['throughput']['requests_per_s']:.1f} req/s, "
      f"TTFT p50 {rep['ttft_ms']['p50']:.1f} ms")
if req["failed"] or req["unfinished"]:
    ok = False
sys.exit(0 if ok else 1)
PY
