#!/usr/bin/env bash
# Creates (once) the Python virtual environment used by tests/python and
# installs the packages the suite needs, only when they are missing, so a rerun
# is fast and works offline. Prints the venv path on stdout.
set -euo pipefail

cache="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
venv="$cache/venv"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    mkdir -p "$cache"
    echo "setup-test-env: creating venv at $venv" >&2
    "$python" -m venv --clear "$venv" >&2
fi

# Import name -> pip requirement. One interpreter checks them all (find_spec
# does not import, so this stays fast).
missing_out="$("$venv/bin/python" - <<'PY'
import importlib.util
for module, req in [("openai", "openai"), ("prometheus_client", "prometheus_client"), ("pytest", "pytest"),
                    ("cffi", "cffi"), ("yaml", "pyyaml"), ("kubernetes_validate", "kubernetes-validate"),
                    ("helm_sdkpy", "helm-sdkpy")]:
    if importlib.util.find_spec(module) is None:
        print(req)
PY
)"
missing=()
helm_sdkpy=0
if [[ -n "$missing_out" ]]; then
    while IFS= read -r req; do
        if [[ "$req" == helm-sdkpy ]]; then helm_sdkpy=1; else missing+=("$req"); fi
    done <<<"$missing_out"
fi

if ((${#missing[@]})); then
    echo "setup-test-env: installing ${missing[*]}" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${missing[@]}" >&2
fi

# helm-sdkpy bundles Helm's Go library (real `helm lint` and `helm install` for
# tests/python/test_helm.py). Its metadata asks for Python 3.12, but it is a
# cffi wrapper around a bundled .so and runs on 3.11: hence
# --ignore-requires-python, and --no-deps (its one dependency, cffi, is above).
if ((helm_sdkpy)); then
    echo "setup-test-env: installing helm-sdkpy" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --ignore-requires-python helm-sdkpy >&2
fi

echo "$venv"
