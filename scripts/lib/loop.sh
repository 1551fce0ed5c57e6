# Shared by scripts/demo.sh and bench/e2e.sh: start the embedded default on
# this machine (our coordinator on SQLite, crabboxd, an egress host bridge,
# the lease-side helper), all in a temp home that `loop_cleanup` removes.
# Source it after setting BIN (the directory of release binaries).

loop_die() { printf '%s\n' "$*" >&2; exit 1; }

# Waits (bounded) for a line matching $2 in file $1 and prints it.
loop_wait_line() {
    for _ in $(seq 1 400); do
        if line=$(grep -m1 -E "$2" "$1" 2>/dev/null); then printf '%s\n' "$line"; return 0; fi
        sleep 0.05
    done
    cat "$1" >&2; loop_die "timed out waiting for '$2' in $1"
}

loop_secret() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

# Creates the temp home and exports the XDG variables into it.
loop_home() {
    DEMO="$(mktemp -d)"
    # cargo, run later with the temp HOME, must still find its toolchain.
    export RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
    export HOME="$DEMO" XDG_RUNTIME_DIR="$DEMO/run" XDG_CONFIG_HOME="$DEMO/config" \
           XDG_STATE_HOME="$DEMO/state" XDG_DATA_HOME="$DEMO/data"
    mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
    LOOP_PIDS=()
}

loop_cleanup() {
    "$BIN/crabboxctl" daemon stop >/dev/null 2>&1 || true
    for p in "${LOOP_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$DEMO"
}

# Starts crabbox-coordinator on 127.0.0.1:0; exports CRABBOX_COORDINATOR and
# the token (environment and 0600 files only, never argv).
loop_coordinator() {
    export CRABBOX_SHARED_TOKEN="$(loop_secret)" CRABBOX_SESSION_SECRET="$(loop_secret)"
    export CRABBOX_SHARED_OWNER=demo@example.com CRABBOX_DEFAULT_ORG=demo
    "$BIN/crabbox-coordinator" --listen 127.0.0.1:0 --db "$DEMO/coordinator.db" 2>"$DEMO/coordinator.log" &
    LOOP_PIDS+=($!)
    local port
    port=$(loop_wait_line "$DEMO/coordinator.log" 'listening' | sed -E 's/.*listen=127\.0\.0\.1:([0-9]+).*/\1/')
    export CRABBOX_COORDINATOR="http://127.0.0.1:$port" CRABBOX_COORDINATOR_TOKEN="$CRABBOX_SHARED_TOKEN"
    install -m 600 /dev/null "$DEMO/auth.headers"
    printf 'Authorization: Bearer %s\n' "$CRABBOX_SHARED_TOKEN" >"$DEMO/auth.headers"
}

# Registers lease $1 (a registered lease needs no cloud provider).
loop_register() {
    curl -sSf -X PUT -H @"$DEMO/auth.headers" -H 'Content-Type: application/json' \
        -d '{"provider":"ssh","target":"linux","host":"127.0.0.1","sshUser":"demo","sshPort":"22","slug":"demo-crab","ttlSeconds":3600,"idleTimeoutSeconds":1800}' \
        "$CRABBOX_COORDINATOR/v1/leases/$1/registration" >/dev/null
}

loop_daemon() {
    "$BIN/crabboxctl" daemon start --no-manager --daemon-bin "$BIN/crabboxd" --log-file "$DEMO/crabboxd.log"
}

# Starts the egress host for lease $1 allowing 127.0.0.1 (private, so the
# explicit opt-in), then the helper with a minted ticket; sets PROXY.
# Extra helper flags may follow.
loop_egress() {
    local lease=$1; shift
    "$BIN/crabboxctl" egress host --id "$lease" --allow 127.0.0.1 --allow-private
    local session
    session=$("$BIN/crabboxctl" egress list --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["session_id"])')
    "$BIN/crabboxctl" egress ticket --id "$lease" --out "$DEMO/ticket"
    "$BIN/crabbox-egress-client" --coordinator "$CRABBOX_COORDINATOR" --id "$lease" --session "$session" \
        --listen 127.0.0.1:0 --ticket-file "$DEMO/ticket" --control "$DEMO/helper.sock" "$@" 2>"$DEMO/helper.log" &
    LOOP_PIDS+=($!)
    PROXY=$(loop_wait_line "$DEMO/helper.log" 'listening' | sed -E 's/.*listen=(127\.0\.0\.1:[0-9]+).*/\1/')
}
