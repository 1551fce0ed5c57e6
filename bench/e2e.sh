#!/usr/bin/env bash
# End-to-end egress benchmark: the whole daemon path — curl-like client →
# crabbox-egress-client → crabbox-coordinator → crabboxd's egress host →
# origin — measured in the same run as direct, squid CONNECT and ssh -D by
# the egress bench harness (bench/egress). Prints a Markdown table.
# Options are passed to the harness, e.g. --bulk-mib 256 --small 500.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --quiet
BIN="$PWD/target/release"
. scripts/lib/loop.sh
loop_home
trap loop_cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true
loop_coordinator
LEASE=cbx_00000000be00
loop_register "$LEASE"
# Quiet logs for the daemon only (the others announce their ports at info).
CRABBOX_LOG=warn loop_daemon >/dev/null
loop_egress "$LEASE" --max-connections 4096 >/dev/null
# Wait until the helper's bridge is paired with the daemon's host.
for _ in $(seq 1 100); do
    "$BIN/crabboxctl" egress status --id "$LEASE" --json | grep -q '"clientConnected": *true' && break
    sleep 0.1
done
export EGRESS_BENCH_EXTRA_PROXY="crabbox v2 via crabbox-coordinator + crabboxd=$PROXY"
cargo bench -p crabbox-egress --bench egress -- "$@"
