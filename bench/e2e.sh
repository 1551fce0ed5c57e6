#!/usr/bin/env bash
# End-to-end egress benchmark: the whole daemon path — curl-like client →
# crabbox-egress-client → crabbox-coordinator → crabboxd's egress host →
# origin — measured in the same run as direct, squid CONNECT and ssh -D by
# the egress bench harness (bench/egress). Prints a Markdown table.
# Options are passed to the harness, e.g. --bulk-mib 256 --small 500 --rounds 3.
# BASE_BIN=<dir of release binaries> also starts a second whole stack from
# those binaries (e.g. a copy of target/release taken before a change), so
# "before" and "after" are measured side by side, interleaved, in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
# E2E_NO_BUILD=1 skips the build (binaries already in target/release).
[ -n "${E2E_NO_BUILD:-}" ] || cargo build --release --bins --quiet
# E2E_BIN=<dir> takes the "after" stack's binaries from elsewhere than target/release.
BIN="${E2E_BIN:-$PWD/target/release}"
. scripts/lib/loop.sh
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

# Starts coordinator + crabboxd + egress host + helper from binaries in $BIN
# in a home of its own and prints the helper's proxy address.
stack() {
    loop_home
    loop_coordinator
    local lease=cbx_00000000be00
    loop_register "$lease"
    # Quiet logs for the daemon only (the others announce their ports at info).
    CRABBOX_LOG=warn loop_daemon >/dev/null
    loop_egress "$lease" --max-connections 4096 >/dev/null
    # Wait until the helper's bridge is paired with the daemon's host.
    for _ in $(seq 1 100); do
        "$BIN/crabboxctl" egress status --id "$lease" --json | grep -q '"clientConnected": *true' && break
        sleep 0.1
    done
}

EXTRA=""
BASE_PID=""
fifo=""
# Set before anything starts, so an exit at any point (a failed `stack`, a
# before stack that never answers) ends what was started.
cleanup() {
    if [ -n "$BASE_PID" ]; then kill "$BASE_PID" 2>/dev/null || true; wait "$BASE_PID" 2>/dev/null || true; fi
    if [ -n "$fifo" ]; then rm -f "$fifo"; fi
    if [ -n "${DEMO:-}" ]; then loop_cleanup; fi
}
trap cleanup EXIT
if [ -n "${BASE_BIN:-}" ]; then
    fifo=$(mktemp -u) && mkfifo -m 600 "$fifo"
    (
        BIN="$BASE_BIN"
        DEMO=""
        trap '[ -z "$DEMO" ] || loop_cleanup' EXIT
        stack
        echo "$PROXY" >"$fifo"
        sleep infinity &
        # loop_cleanup waits for every child: end the sleep first.
        trap 'kill $!; exit 0' TERM
        wait
    ) &
    BASE_PID=$!
    # Opened read-write so the open never blocks; the read gives up after
    # 60 s if the before stack died before answering.
    exec 3<>"$fifo"
    if ! read -r -t 60 base_proxy <&3; then
        echo "the before stack ($BASE_BIN) did not start within 60 s" >&2
        exit 1
    fi
    exec 3<&-
    EXTRA="crabbox v2 via crabbox-coordinator + crabboxd (before)=$base_proxy;"
fi
stack
export EGRESS_BENCH_EXTRA_PROXY="${EXTRA}crabbox v2 via crabbox-coordinator + crabboxd=$PROXY"
# EGRESS_BENCH_EXE=<built harness> runs it directly (no cargo, no build lock).
if [ -n "${EGRESS_BENCH_EXE:-}" ]; then "$EGRESS_BENCH_EXE" --bench "$@"; else
    cargo bench -p crabbox-egress --bench egress -- "$@"; fi
