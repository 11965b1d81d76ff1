#!/usr/bin/env bash
# Makes `prometheus` and `promtool` available for tests/python/test_observability.py,
# which loads the rule files and dashboards under deploy/helm/switchyard/files/ into a
# real Prometheus. Uses binaries already on PATH (or named by $PROMETHEUS_BIN and
# $PROMTOOL_BIN); otherwise installs Debian's `prometheus` package with apt-get (needs
# root), without starting its service. Idempotent: a rerun with both present only
# prints. Quiet on success; on stdout exactly
#   PROMETHEUS_BIN=<path>
#   PROMTOOL_BIN=<path>
set -euo pipefail

log() { echo "setup-prometheus: $*" >&2; }
die() { echo "setup-prometheus: ERROR: $*" >&2; exit 1; }

find_bins() {
    prometheus_bin="${PROMETHEUS_BIN:-$(command -v prometheus || true)}"
    promtool_bin="${PROMTOOL_BIN:-$(command -v promtool || true)}"
    [[ -n "$prometheus_bin" && -x "$prometheus_bin" && -n "$promtool_bin" && -x "$promtool_bin" ]]
}

if ! find_bins; then
    command -v apt-get >/dev/null || die "prometheus/promtool not found and no apt-get; install Prometheus and set PROMETHEUS_BIN and PROMTOOL_BIN"
    ((EUID == 0)) || die "prometheus/promtool not found; run as root (apt-get install prometheus) or set PROMETHEUS_BIN and PROMTOOL_BIN"
    log "installing Debian package prometheus"
    # Keep the package's init script from starting a daemon on :9090: a policy-rc.d
    # that denies every start, only for the length of the install, only if none exists.
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
            out="$(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus 2>&1)"
    } || rc=$?
    if ((own_policy)); then rm -f "$policy"; fi
    if ((rc != 0)); then
        echo "$out" | tail -40 >&2
        die "apt-get install prometheus failed (exit $rc)"
    fi
    unset PROMETHEUS_BIN PROMTOOL_BIN
    find_bins || die "installed the prometheus package but prometheus/promtool are still not on PATH"
fi

echo "PROMETHEUS_BIN=$prometheus_bin"
echo "PROMTOOL_BIN=$promtool_bin"
