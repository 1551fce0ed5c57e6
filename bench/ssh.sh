#!/usr/bin/env bash
# SSH plane benchmark: one real sshd on loopback; in the same run, compare
#   crabboxctl exec --id box -- true   (the daemon's SshMux)
#   ssh through an OpenSSH ControlMaster, and a fresh ssh per command
# (p50/p99 over N runs), 64 MiB upload and download (crabboxctl cp vs
# ssh 'cat > f' / ssh cat), 100 parallel execs (errors, wall time), time to
# the first command on a cold mux, and the daemon's RSS with 0, 1 and 11
# open muxes (the per-mux increment). Transfers run in short interleaved
# rounds (ours, OpenSSH, ours, OpenSSH…) and report medians and the ratio,
# so a machine shared with other work skews both sides alike. Needs root
# (sshd). Prints a Markdown table.
#   BENCH_RUNS (default 200), BENCH_ROUNDS (transfer rounds, default 5),
#   BENCH_PROFILE (release), BENCH_NO_BUILD (use the built binaries),
#   BENCH_BIN (a directory holding crabboxd and crabboxctl to measure instead)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${BENCH_RUNS:-200}"
ROUNDS="${BENCH_ROUNDS:-5}"
PROFILE="${BENCH_PROFILE:-release}"
if [ -n "${BENCH_BIN:-}" ]; then
    BIN="$BENCH_BIN"
elif [ -n "${BENCH_NO_BUILD:-}" ]; then
    BIN="$PWD/target/$PROFILE"
elif [ "$PROFILE" = release ]; then
    cargo build --release -p crabboxd -p crabboxctl --bins --quiet
    BIN="$PWD/target/release"
else
    cargo build -p crabboxd -p crabboxctl --bins --quiet
    BIN="$PWD/target/debug"
fi
[ "$(id -u)" = 0 ] || { echo "bench/ssh.sh needs root (sshd)" >&2; exit 1; }
mkdir -p /run/sshd

T="$(mktemp -d)"
SSHD_PID=""; DAEMON_PID=""
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null || true
    [ -n "$SSHD_PID" ] && kill "$SSHD_PID" 2>/dev/null || true
    ssh -S "$T/cm" -O exit x >/dev/null 2>&1 || true
    wait 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT

ssh-keygen -q -t ed25519 -N '' -f "$T/host"
ssh-keygen -q -t ed25519 -N '' -f "$T/client"
cp "$T/client.pub" "$T/authorized_keys"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$T/sshd_config" <<CFG
ListenAddress 127.0.0.1:$PORT
HostKey $T/host
AuthorizedKeysFile $T/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
MaxStartups 200:30:400
CFG
/usr/sbin/sshd -D -e -f "$T/sshd_config" 2>"$T/sshd.log" &
SSHD_PID=$!
for _ in $(seq 1 200); do grep -q 'Server listening' "$T/sshd.log" && break; sleep 0.05; done

export HOME="$T/home" XDG_RUNTIME_DIR="$T/run" XDG_CONFIG_HOME="$T/config" XDG_STATE_HOME="$T/state"
mkdir -p "$XDG_RUNTIME_DIR" "$XDG_CONFIG_HOME/crabbox" && chmod 700 "$XDG_RUNTIME_DIR"
cat >"$XDG_CONFIG_HOME/crabbox/crabboxd.toml" <<TOML
[targets.box]
host = "127.0.0.1"
user = "$(id -un)"
port = $PORT
key = "$T/client"
TOML
# Ten more targets on the same sshd: one mux each, for the per-mux RSS.
for i in $(seq 0 9); do
    printf '\n[targets.m%s]\nhost = "127.0.0.1"\nuser = "%s"\nport = %s\nkey = "%s"\n' \
        "$i" "$(id -un)" "$PORT" "$T/client" >>"$XDG_CONFIG_HOME/crabbox/crabboxd.toml"
done
CRABBOX_LOG=warn "$BIN/crabboxd" 2>"$T/crabboxd.log" &
DAEMON_PID=$!
SOCK="$XDG_RUNTIME_DIR/crabbox/crabboxd.sock"
for _ in $(seq 1 200); do [ -S "$SOCK" ] && break; sleep 0.05; done
CTL=("$BIN/crabboxctl" --socket "$SOCK")
SSH=(ssh -i "$T/client" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no
     -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -p "$PORT")

now() { date +%s%N; }
ms() { awk -v ns="$1" 'BEGIN { printf "%.1f", ns / 1e6 }'; }
# p50 and p99 (ms) of the nanosecond samples in file $1.
pcts() {
    sort -n "$1" | awk '{ a[NR] = $1 } END {
        p50 = a[int(NR * 0.50) > 0 ? int(NR * 0.50) : 1]; p99 = a[int(NR * 0.99) > 0 ? int(NR * 0.99) : 1]
        printf "%.1f %.1f\n", p50 / 1e6, p99 / 1e6 }'
}
# One sample of "$@" (nanoseconds) appended to file $1.
sample() {
    local f="$1" t0; shift
    t0=$(now); "$@" >/dev/null </dev/null; echo $(( $(now) - t0 )) >>"$f"
}
timed() { local t0; t0=$(now); "$@" >/dev/null; ms $(( $(now) - t0 )); }

rss() { awk '/VmRSS/ { print $2 }' "/proc/$DAEMON_PID/status"; }
median() { sort -n | awk '{ a[NR] = $1 } END { printf "%.1f", (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
sleep 1
RSS0=$(rss)

# Cold: the first command starts the mux (connect, host key, auth).
COLD=$(timed "${CTL[@]}" exec --id box -- true)
FRESH_FIRST=$(timed "${SSH[@]}" root@127.0.0.1 true)

"${SSH[@]}" -o ControlMaster=yes -o ControlPath="$T/cm" -o ControlPersist=600 -fN root@127.0.0.1
# Interleaved: ours, ControlMaster, fresh ssh, ours, … so load shifts on
# a shared machine hit all three rows alike.
: >"$T/t-mux"; : >"$T/t-cm"; : >"$T/t-fresh"
for _ in $(seq 1 "$RUNS"); do
    sample "$T/t-mux" "${CTL[@]}" exec --id box -- true
    sample "$T/t-cm" "${SSH[@]}" -o ControlPath="$T/cm" root@127.0.0.1 true
    sample "$T/t-fresh" "${SSH[@]}" root@127.0.0.1 true
done
read -r MUX50 MUX99 < <(pcts "$T/t-mux")
read -r CM50 CM99 < <(pcts "$T/t-cm")
read -r FR50 FR99 < <(pcts "$T/t-fresh")
EXEC_RATIO=$(awk -v a="$MUX50" -v b="$CM50" 'BEGIN { printf "%.2f", a / b }')

head -c $((64 << 20)) /dev/urandom >"$T/big"
mkdir -p "$T/remote"
SSHCM="$(printf '%q ' "${SSH[@]}") -o ControlPath=$T/cm root@127.0.0.1"
: >"$T/up"; : >"$T/up-ssh"; : >"$T/down"; : >"$T/down-ssh"; : >"$T/up-exec"
for _ in $(seq 1 "$ROUNDS"); do
    timed "${CTL[@]}" cp -q "$T/big" "box:$T/remote/up" >>"$T/up"; echo >>"$T/up"
    timed sh -c "$SSHCM 'cat > $T/remote/up-ssh' < $T/big" >>"$T/up-ssh"; echo >>"$T/up-ssh"
    rm -f "$T/dl"
    timed "${CTL[@]}" cp -q "box:$T/remote/up" "$T/dl" >>"$T/down"; echo >>"$T/down"
    cmp -s "$T/big" "$T/dl" || { echo "download differs" >&2; exit 1; }
    timed sh -c "$SSHCM 'cat $T/remote/up' > $T/dl-ssh" >>"$T/down-ssh"; echo >>"$T/down-ssh"
    timed sh -c "$(printf '%q ' "${CTL[@]}") exec --id box -- sh -c 'cat > $T/remote/up-exec' < $T/big" >>"$T/up-exec"; echo >>"$T/up-exec"
done
cmp -s "$T/big" "$T/remote/up-exec" || { echo "exec upload differs" >&2; exit 1; }
cmp -s "$T/big" "$T/remote/up" || { echo "upload differs" >&2; exit 1; }
UP=$(median <"$T/up"); UP_SSH=$(median <"$T/up-ssh")
DOWN=$(median <"$T/down"); DOWN_SSH=$(median <"$T/down-ssh")
UP_RATIO=$(awk -v a="$UP" -v b="$UP_SSH" 'BEGIN { printf "%.2f", b / a }')
DOWN_RATIO=$(awk -v a="$DOWN" -v b="$DOWN_SSH" 'BEGIN { printf "%.2f", b / a }')
UP_EXEC=$(median <"$T/up-exec")
UP_EXEC_RATIO=$(awk -v a="$UP_EXEC" -v b="$UP_SSH" 'BEGIN { printf "%.2f", b / a }')

# RSS: one mux open now; open ten more.
RSS1=$(rss)
for i in $(seq 0 9); do "${CTL[@]}" exec --id "m$i" -- true >/dev/null; done
sleep 1
RSS11=$(rss)
PER_MUX=$(( (RSS11 - RSS1) / 10 ))

export CTL_BIN="$BIN/crabboxctl" SOCK
t0=$(now)
ERRORS=$(seq 1 100 | xargs -P 100 -I{} sh -c '"$CTL_BIN" --socket "$SOCK" exec --id box -- true >/dev/null 2>&1 || echo x' | wc -l)
PAR=$(ms $(( $(now) - t0 )))

cat <<MD
SSH plane, $(date -u +%Y-%m-%d), $(ssh -V 2>&1 | cut -d, -f1), loopback, profile $PROFILE, $RUNS runs each, load $(cut -d' ' -f1-3 /proc/loadavg)

| what | crabboxd | OpenSSH |
|---|---|---|
| exec \`true\` p50 / p99, warm, interleaved | $MUX50 / $MUX99 ms; ours ÷ ControlMaster at p50 = ${EXEC_RATIO}× | ControlMaster $CM50 / $CM99 ms; fresh ssh $FR50 / $FR99 ms |
| first command, cold | $COLD ms | fresh ssh $FRESH_FIRST ms |
| 64 MiB upload, median of $ROUNDS interleaved | $UP ms (cp); OpenSSH ÷ ours = ${UP_RATIO}× | $UP_SSH ms (ssh 'cat > f', ControlMaster) |
| 64 MiB upload as exec stdin, median of $ROUNDS interleaved | $UP_EXEC ms (exec 'cat > f'); OpenSSH ÷ ours = ${UP_EXEC_RATIO}× | $UP_SSH ms (ssh 'cat > f', ControlMaster) |
| 64 MiB download, median of $ROUNDS interleaved | $DOWN ms (cp); OpenSSH ÷ ours = ${DOWN_RATIO}× | $DOWN_SSH ms (ssh cat, ControlMaster) |
| 100 parallel execs | $ERRORS errors, $PAR ms wall | |
| daemon RSS: 0 / 1 / 11 open muxes | $RSS0 / $RSS1 / $RSS11 KiB; per extra mux $PER_MUX KiB | |
MD
