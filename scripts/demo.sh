#!/usr/bin/env bash
# The main job end to end on the embedded default, on this machine only:
#   our coordinator (SQLite in a temp dir) → crabboxd (egress host bridge)
#   ← the lease-side helper (crabbox-egress-client on loopback) ← curl
# A page is fetched through the helper's proxy; the connection to the origin
# leaves from the daemon after its allowlist check. Everything runs in a temp
# home and is removed on exit. Needs: cargo, curl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "building (cargo build --release --bins)"
cargo build --release --bins --quiet
BIN="$PWD/target/release"
. scripts/lib/loop.sh
loop_home
trap loop_cleanup EXIT

step "starting crabbox-coordinator on 127.0.0.1 (SQLite in $DEMO)"
loop_coordinator
echo "coordinator: $CRABBOX_COORDINATOR"

LEASE=cbx_00000000de00
step "registering lease $LEASE (a registered lease needs no cloud provider)"
loop_register "$LEASE"

step "crabboxctl daemon start"
loop_daemon

step "a local origin (python3 -m http.server on 127.0.0.1)"
mkdir -p "$DEMO/www" && echo "hello through the crabbox egress bridge" >"$DEMO/www/index.html"
python3 -u -m http.server --bind 127.0.0.1 --directory "$DEMO/www" 0 >"$DEMO/origin.log" 2>&1 &
LOOP_PIDS+=($!)
OPORT=$(loop_wait_line "$DEMO/origin.log" 'Serving HTTP' | sed -E 's/.*port ([0-9]+).*/\1/')
echo "origin: http://127.0.0.1:$OPORT/"

step "crabboxctl lease keep --id $LEASE"
"$BIN/crabboxctl" lease keep --id "$LEASE"

step "crabboxctl egress host --id $LEASE --allow 127.0.0.1 --allow-private; ticket; helper"
loop_egress "$LEASE"
echo "helper proxy: http://$PROXY"

step "curl -x http://$PROXY http://127.0.0.1:$OPORT/"
for _ in $(seq 1 100); do
    if BODY=$(curl -sSf --max-time 5 -x "http://$PROXY" "http://127.0.0.1:$OPORT/" 2>/dev/null); then break; fi
    sleep 0.1   # the helper answers a fast 503 until its bridge is paired
done
[ -n "${BODY:-}" ] || loop_die "no answer through the bridge"
echo "$BODY"

step "crabboxctl egress status --id $LEASE"
"$BIN/crabboxctl" egress status --id "$LEASE"
step "crabboxctl tasks"
"$BIN/crabboxctl" tasks

step "crabboxctl lease release --id $LEASE (ends every task of the lease)"
"$BIN/crabboxctl" lease release --id "$LEASE"
sleep 0.5
"$BIN/crabboxctl" tasks
step "crabboxctl daemon stop"
"$BIN/crabboxctl" daemon stop
