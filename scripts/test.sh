#!/usr/bin/env bash
# The project's one test command: builds the engine, runs the Rust tests, then
# the Python suite (official openai client + Prometheus parser) against the
# built binary. Exits non-zero on any failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

echo "==> cargo build"
cargo build

echo "==> cargo test --workspace"
cargo test --workspace

echo "==> python test environment"
venv="$("$root/scripts/setup-test-env.sh")"

echo "==> pytest tests/python"
bin="${SWITCHYARD_BIN:-$root/target/debug/switchyard}"
SWITCHYARD_BIN="$bin" "$venv/bin/python" -m pytest -q "$root/tests/python" "$@"
