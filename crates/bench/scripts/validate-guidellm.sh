#!/usr/bin/env bash
# Validate `switchyard bench` against guidellm (PyPI), a tool no one here wrote: both
# drive the same release sim engine (20 ms per step + 50 µs per prefill token) at the same
# load (prefix caching off, so repeated prompts cost the same; closed loop at concurrency C, same prompt tokens as the server counts them,
# 32 output tokens), then their TTFT, ITL and throughput are printed side by side.
#
# Needs: a release build (cargo build --release), python3, PyPI access once (guidellm
# goes into ~/.cache/switchyard/bench-venv, idempotent), and a Hugging Face tokenizer
# directory for guidellm's synthetic prompts (TOKENIZER=..., default SmolLM2's from
# scripts/setup-vllm.sh). Usage: crates/bench/scripts/validate-guidellm.sh [C...] (default 1 4 16)
set -euo pipefail
cd "$(dirname "$0")/../../.."
VENV=~/.cache/switchyard/bench-venv
TOKENIZER=${TOKENIZER:-$HOME/.cache/switchyard/vllm/smollm2-hf}
[ -x "$VENV/bin/guidellm" ] || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q guidellm==0.8.1; }
B=target/release/switchyard
OUT=$(mktemp -d)
$B engine --backend sim --host 127.0.0.1 --port 0 --sim-preset zero \
  --sim-step-overhead-us 20000 --sim-prefill-us-per-token 50 --no-enable-prefix-caching \
  --served-model-name smollm2 >"$OUT/engine.out" 2>&1 &
EPID=$!
trap 'kill $EPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q READY "$OUT/engine.out" && break; sleep 0.1; done
URL=$(awk '/READY/{print $2}' "$OUT/engine.out")
CS=("$@")
[ ${#CS[@]} -gt 0 ] || CS=(1 4 16)
for C in "${CS[@]}"; do
  N=$((C * 15))
  HF_HUB_OFFLINE=1 "$VENV/bin/guidellm" run --backend kind=openai_http,target="$URL",model=smollm2 \
    --profile kind=concurrent,streams="$C" --constraint kind=max_requests,count="$N" \
    --data kind=synthetic_text,prompt_tokens=200,output_tokens=32 \
    --tokenizer kind=huggingface_auto,model="$TOKENIZER" \
    --output kind=json,path="$OUT/guidellm-c$C.json" --disable-progress >"$OUT/guidellm-c$C.log" 2>&1
  # guidellm's 200 SmolLM2 tokens are ~357 sim tokens with the chat template; match them.
  PROMPT=$(python3 -c "import json;print(int(json.load(open('$OUT/guidellm-c$C.json'))['benchmarks'][0]['metrics']['prompt_token_count']['successful']['median']))")
  $B bench random --base-url "$URL" --num-requests "$N" --concurrency "$C" --input-len $((PROMPT - 10)) \
    --output-len 32 --no-progress --output "$OUT/switchyard-c$C.json" >/dev/null
  python3 - "$OUT/guidellm-c$C.json" "$OUT/switchyard-c$C.json" "$C" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))["benchmarks"][0]["metrics"]
s = json.load(open(sys.argv[2]))
def gm(k, f): return g[k]["successful"][f]
rows = [
    ("prompt tokens p50", gm("prompt_token_count", "median"), s["tokens"]["prompt_total"] / s["requests"]["completed"]),
    ("TTFT mean ms", gm("time_to_first_token_ms", "mean"), s["ttft_ms"]["mean"]),
    ("TTFT p50 ms", gm("time_to_first_token_ms", "median"), s["ttft_ms"]["p50"]),
    ("ITL mean ms", gm("inter_token_latency_ms", "mean"), s["tpot_ms"]["mean"]),
    ("E2E mean ms", gm("request_latency", "mean") * 1000, s["e2e_ms"]["mean"]),
    ("requests/s", gm("requests_per_second", "mean"), s["throughput"]["requests_per_s"]),
    ("output tok/s", gm("output_tokens_per_second", "mean"), s["throughput"]["output_tokens_per_s"]),
]
print(f"concurrency {sys.argv[3]}: {'':18} {'guidellm':>10} {'switchyard':>10} {'ratio':>7}")
for name, a, b in rows:
    print(f"  {name:<30} {a:>10.2f} {b:>10.2f} {b / a:>7.3f}")
PY
done
