#!/usr/bin/env bash
# Makes `redis-server` available for tests/python/test_kv_offload.py (the redis:// remote
# tier against a real Redis). Uses the binary on PATH (or $REDIS_SERVER_BIN); otherwise
# installs Debian's `redis-server` package with apt-get (needs root), without starting its
# service. Idempotent: a rerun with it present only prints. On stdout exactly
#   REDIS_SERVER_BIN=<path>
set -euo pipefail

log() { echo "setup-redis: $*" >&2; }
die() { echo "setup-redis: ERROR: $*" >&2; exit 1; }

bin="${REDIS_SERVER_BIN:-$(command -v redis-server || true)}"
if [[ -z "$bin" || ! -x "$bin" ]]; then
    command -v apt-get >/dev/null || die "redis-server not found and no apt-get; install Redis and set REDIS_SERVER_BIN"
    ((EUID == 0)) || die "redis-server not found; run as root (apt-get install redis-server) or set REDIS_SERVER_BIN"
    log "installing Debian package redis-server"
    # Keep the package's init script from starting a daemon: a policy-rc.d that denies
    # every start, only for the length of the install, only if none exists.
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
    fi
    out=""
    rc=0
    {
        out="$(apt-get update -qq 2>&1)" &&
            out="$(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server 2>&1)"
    } || rc=$?
    if ((own_policy)); then rm -f "$policy"; fi
    ((rc == 0)) || die "apt-get failed: $(echo "$out" | tail -5)"
    bin="$(command -v redis-server || true)"
    [[ -n "$bin" && -x "$bin" ]] || die "redis-server still not found after installing"
fi
echo "REDIS_SERVER_BIN=$bin"
