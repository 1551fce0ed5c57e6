#!/usr/bin/env bash
# The main job on the embedded default, end to end, on this machine only:
# builds the workspace, starts crabboxd on a private socket in a temp home,
# and talks to it with crabboxctl. Everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "building (cargo build --release --bins)"
cargo build --release --bins --quiet
BIN="$PWD/target/release"

HOME_DIR="$(mktemp -d)"
export XDG_RUNTIME_DIR="$HOME_DIR/run" XDG_CONFIG_HOME="$HOME_DIR/config" \
       XDG_STATE_HOME="$HOME_DIR/state" HOME="$HOME_DIR"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
SOCK="$XDG_RUNTIME_DIR/crabbox/crabboxd.sock"
cleanup() {
    "$BIN/crabboxctl" daemon stop >/dev/null 2>&1 || true
    rm -rf "$HOME_DIR"
}
trap cleanup EXIT

step "crabboxctl daemon start (socket $SOCK)"
"$BIN/crabboxctl" daemon start --no-manager --daemon-bin "$BIN/crabboxd" --log-file "$HOME_DIR/crabboxd.log"

step "crabboxctl status"
"$BIN/crabboxctl" status
step "crabboxctl tasks"
"$BIN/crabboxctl" tasks
step "crabboxctl doctor"
"$BIN/crabboxctl" doctor || true
step "crabboxctl daemon stop"
"$BIN/crabboxctl" daemon stop
step "daemon log"
cat "$HOME_DIR/crabboxd.log"
