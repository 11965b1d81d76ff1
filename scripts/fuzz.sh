#!/usr/bin/env bash
# Run every cargo-fuzz target for a while (not part of CI): the GGUF header reader, the
# KV-event decoder, the bench's SSE parser, the tokenizer and the engine's request path.
#   scripts/fuzz.sh [SECONDS_PER_TARGET=120] [TARGET...]
# Needs the nightly toolchain; installs cargo-fuzz once. Corpora live in fuzz/corpus/
# (seeds/ holds the starting inputs and the smallest 150 of each corpus, kept in the repo;
# corpus/ is the local working corpus); a crash is written to fuzz/artifacts/TARGET/ and must
# become a regression test before it is fixed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root/fuzz"
secs="${1:-120}"; shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gguf_header kv_events sse tokenizer request)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# The tokenizer target reads the default model; fetch it the way the engine does.
if [[ " ${targets[*]} " == *" tokenizer "* ]] && [ -z "${SWITCHYARD_FUZZ_MODEL:-}" ]; then
  export SWITCHYARD_FUZZ_MODEL="$HOME/.cache/switchyard/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -f "$SWITCHYARD_FUZZ_MODEL" ]; then
    echo "tokenizer target: no $SWITCHYARD_FUZZ_MODEL; run \`switchyard up\` once (it fetches the model) or set SWITCHYARD_FUZZ_MODEL" >&2
    exit 2
  fi
fi
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  echo "==> $t (${secs}s)"
  if ! cargo +nightly fuzz run --sanitizer none -O "$t" "corpus/$t" "${seeds[@]}" -- \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 2>&1 | tail -n 40; then
    echo "!! $t: a crash; see fuzz/artifacts/$t/"; status=1
  fi
done
exit $status
