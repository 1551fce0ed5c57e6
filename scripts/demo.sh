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
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }
# Waits (bounded) for a line matching $2 in file $1 and prints it.
wait_line() {
    for _ in $(seq 1 200); do
        if line=$(grep -m1 -E "$2" "$1" 2>/dev/null); then printf '%s\n' "$line"; return 0; fi
        sleep 0.05
    done
    cat "$1" >&2; die "timed out waiting for '$2' in $1"
}
secret() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

step "building (cargo build --release --bins)"
cargo build --release --bins --quiet
BIN="$PWD/target/release"

DEMO="$(mktemp -d)"
export HOME="$DEMO" XDG_RUNTIME_DIR="$DEMO/run" XDG_CONFIG_HOME="$DEMO/config" \
       XDG_STATE_HOME="$DEMO/state" XDG_DATA_HOME="$DEMO/data"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
PIDS=()
cleanup() {
    "$BIN/crabboxctl" daemon stop >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DEMO"
}
trap cleanup EXIT

# Tokens live in the environment and 0600 files only, never in argv.
export CRABBOX_SHARED_TOKEN="$(secret)" CRABBOX_SESSION_SECRET="$(secret)"
export CRABBOX_SHARED_OWNER=demo@example.com CRABBOX_DEFAULT_ORG=demo

step "starting crabbox-coordinator on 127.0.0.1 (SQLite in $DEMO)"
"$BIN/crabbox-coordinator" --listen 127.0.0.1:0 --db "$DEMO/coordinator.db" 2>"$DEMO/coordinator.log" &
PIDS+=($!)
PORT=$(wait_line "$DEMO/coordinator.log" 'listening' | sed -E 's/.*listen=127\.0\.0\.1:([0-9]+).*/\1/')
export CRABBOX_COORDINATOR="http://127.0.0.1:$PORT" CRABBOX_COORDINATOR_TOKEN="$CRABBOX_SHARED_TOKEN"
echo "coordinator: $CRABBOX_COORDINATOR"

LEASE=cbx_00000000de00
step "registering lease $LEASE (a registered lease needs no cloud provider)"
install -m 600 /dev/null "$DEMO/auth.headers"
printf 'Authorization: Bearer %s\n' "$CRABBOX_SHARED_TOKEN" >"$DEMO/auth.headers"
curl -sSf -X PUT -H @"$DEMO/auth.headers" -H 'Content-Type: application/json' \
    -d '{"provider":"ssh","target":"linux","host":"127.0.0.1","sshUser":"demo","sshPort":"22","slug":"demo-crab","ttlSeconds":3600,"idleTimeoutSeconds":1800}' \
    "$CRABBOX_COORDINATOR/v1/leases/$LEASE/registration" >/dev/null
echo "registered"

step "crabboxctl daemon start"
"$BIN/crabboxctl" daemon start --no-manager --daemon-bin "$BIN/crabboxd" --log-file "$DEMO/crabboxd.log"

step "a local origin (python3 -m http.server on 127.0.0.1)"
mkdir -p "$DEMO/www" && echo "hello through the crabbox egress bridge" >"$DEMO/www/index.html"
python3 -u -m http.server --bind 127.0.0.1 --directory "$DEMO/www" 0 >"$DEMO/origin.log" 2>&1 &
PIDS+=($!)
OPORT=$(wait_line "$DEMO/origin.log" 'Serving HTTP' | sed -E 's/.*port ([0-9]+).*/\1/')
echo "origin: http://127.0.0.1:$OPORT/"

step "crabboxctl lease keep --id $LEASE"
"$BIN/crabboxctl" lease keep --id "$LEASE"

step "crabboxctl egress host --id $LEASE --allow 127.0.0.1 --allow-private"
"$BIN/crabboxctl" egress host --id "$LEASE" --allow 127.0.0.1 --allow-private
SESSION=$("$BIN/crabboxctl" egress list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["session_id"])')

step "crabboxctl egress ticket --id $LEASE --out <0600 file>; start the lease-side helper"
"$BIN/crabboxctl" egress ticket --id "$LEASE" --out "$DEMO/ticket"
"$BIN/crabbox-egress-client" --coordinator "$CRABBOX_COORDINATOR" --id "$LEASE" --session "$SESSION" \
    --listen 127.0.0.1:0 --ticket-file "$DEMO/ticket" --control "$DEMO/helper.sock" 2>"$DEMO/helper.log" &
PIDS+=($!)
PROXY=$(wait_line "$DEMO/helper.log" 'listening' | sed -E 's/.*listen=(127\.0\.0\.1:[0-9]+).*/\1/')
echo "helper proxy: http://$PROXY"

step "curl -x http://$PROXY http://127.0.0.1:$OPORT/"
for _ in $(seq 1 100); do
    if BODY=$(curl -sSf --max-time 5 -x "http://$PROXY" "http://127.0.0.1:$OPORT/" 2>/dev/null); then break; fi
    sleep 0.1   # the helper answers a fast 503 until its bridge is paired
done
[ -n "${BODY:-}" ] || die "no answer through the bridge"
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
