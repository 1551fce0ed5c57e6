#!/usr/bin/env bash
# SSH egress benchmark (`egress start --transport ssh`), one run on loopback,
# side by side: direct, squid CONNECT, ssh -D (the egress bench harness's own
# rows), `ssh -R PORT` (OpenSSH's reverse dynamic SOCKS forward) and ours —
# crabboxd serving a remote forward of 127.0.0.1:PORT on its SSH connection
# to a loopback sshd (the "lease"), with the allowlist, pinned dialer and
# counters. Release build. Prints a Markdown table for docs/benchmarks.md.
# Options are passed to the harness, e.g. --bulk-mib 256 --small 500.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --quiet
BIN="$PWD/target/release"
. scripts/lib/loop.sh
loop_home
trap loop_cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    loop_die "nothing listens on 127.0.0.1:$1"
}

# The "lease": a loopback sshd whose user gets a home of its own (SetEnv),
# so current.json lands in the temp home.
S="$DEMO/sshd"; mkdir -p "$S" "$DEMO/lease-home" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$S/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$S/user_key"
cp "$S/user_key.pub" "$S/authorized_keys"
SSHD_PORT=$(free_port)
USER_NAME=$(id -un)
cat >"$S/sshd_config" <<CONF
ListenAddress 127.0.0.1:$SSHD_PORT
HostKey $S/host_key
AuthorizedKeysFile $S/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
GatewayPorts no
MaxSessions 100
MaxStartups 2000
SetEnv HOME=$DEMO/lease-home
CONF
/usr/sbin/sshd -D -f "$S/sshd_config" -E "$S/sshd.log" &
LOOP_PIDS+=($!)
wait_port "$SSHD_PORT"

# OpenSSH's answer: ssh -R PORT (reverse dynamic SOCKS, no allowlist).
SOCKS_R=$(free_port)
ssh -N -R "127.0.0.1:$SOCKS_R" -p "$SSHD_PORT" -i "$S/user_key" \
    -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR \
    "$USER_NAME@127.0.0.1" &
LOOP_PIDS+=($!)
wait_port "$SOCKS_R"

# Ours: a static target (no coordinator at all) and egress start --transport ssh.
mkdir -p "$XDG_CONFIG_HOME/crabbox"
install -m 600 /dev/null "$XDG_CONFIG_HOME/crabbox/crabboxd.toml"
cat >"$XDG_CONFIG_HOME/crabbox/crabboxd.toml" <<CONF
[targets.bench]
host = "127.0.0.1"
user = "$USER_NAME"
port = $SSHD_PORT
key = "$S/user_key"
CONF
CRABBOX_LOG=warn loop_daemon >/dev/null
OURS=$(free_port)
"$BIN/crabboxctl" egress start --id bench --transport ssh --allow 127.0.0.1 --allow-private \
    --listen "127.0.0.1:$OURS" >/dev/null
wait_port "$OURS"
uptime
export EGRESS_BENCH_EXTRA_PROXIES="ssh -R (reverse dynamic SOCKS, loopback)=socks5:127.0.0.1:$SOCKS_R;crabbox --transport ssh (crabboxd remote forward)=127.0.0.1:$OURS"
cargo bench -p crabbox-egress --bench egress -- "$@"
uptime
