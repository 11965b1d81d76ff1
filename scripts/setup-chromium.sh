#!/usr/bin/env bash
# Makes headless Chromium available for tests/python/test_dashboard.py, which loads the
# router's /dashboard in it. Uses $CHROMIUM_BIN, /usr/bin/chromium or a chromium on PATH;
# otherwise installs Debian's `chromium` package with apt-get (needs root). Idempotent: a
# rerun with Chromium present only prints. Quiet on success; on stdout exactly
#   CHROMIUM_BIN=<path>
set -euo pipefail

log() { echo "setup-chromium: $*" >&2; }
die() { echo "setup-chromium: ERROR: $*" >&2; exit 1; }

find_bin() {
    for c in "${CHROMIUM_BIN:-}" /usr/bin/chromium "$(command -v chromium || true)"; do
        if [[ -n "$c" && -x "$c" ]]; then
            chromium_bin="$c"
            return 0
        fi
    done
    return 1
}

if ! find_bin; then
    command -v apt-get >/dev/null || die "chromium not found and no apt-get; install Chromium and set CHROMIUM_BIN"
    ((EUID == 0)) || die "chromium not found; run as root (apt-get install chromium) or set CHROMIUM_BIN"
    log "installing Debian package chromium"
    out=""
    rc=0
    {
        out="$(apt-get update -qq 2>&1)" &&
            out="$(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium 2>&1)"
    } || rc=$?
    if ((rc != 0)); then
        echo "$out" | tail -40 >&2
        die "apt-get install chromium failed (exit $rc)"
    fi
    unset CHROMIUM_BIN
    find_bin || die "installed the chromium package but /usr/bin/chromium is still missing"
fi

echo "CHROMIUM_BIN=$chromium_bin"
