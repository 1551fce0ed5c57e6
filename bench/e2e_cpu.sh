#!/usr/bin/env bash
# CPU time and minor page faults per executable while bench/e2e.sh runs:
# samples utime+stime and minflt of every crabboxd, crabbox-egress-client and
# crabbox-coordinator process from /proc/<pid>/stat every 0.2 s and prints the
# total per executable path (so two stacks from different builds, E2E_BIN and
# BASE_BIN, are told apart), then e2e.sh's table. Same options and
# environment as bench/e2e.sh, e.g.
#   E2E_NO_BUILD=1 E2E_BIN=/tmp/after BASE_BIN=/tmp/before ./bench/e2e_cpu.sh \
#     --bulk-mib 512 --small 0 --concurrent 0 --rounds 8 --no-fairness --only crabboxd
# A process's last sample is at most 0.2 s before it exits: compare totals of
# long runs, not single rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp) err=$(mktemp)
trap 'rm -f "$out" "$err"' EXIT
./bench/e2e.sh "$@" >"$out" 2>"$err" &
e2e=$!
declare -A first last ffirst flast
while kill -0 "$e2e" 2>/dev/null; do
    for p in $(pgrep -f 'crabboxd|crabbox-egress-client|crabbox-coordinator' || true); do
        exe=$(readlink "/proc/$p/exe" 2>/dev/null) || continue
        case "$exe" in */crabboxd | */crabbox-egress-client | */crabbox-coordinator) ;; *) continue ;; esac
        # Fields 10 (minflt), 14 (utime) and 15 (stime); the name in field 2 has no spaces here.
        read -r ticks faults < <(awk '{print $14+$15, $10}' "/proc/$p/stat" 2>/dev/null) || continue
        key="$exe:$p"
        [ -n "${first[$key]:-}" ] || { first[$key]=$ticks; ffirst[$key]=$faults; }
        last[$key]=$ticks
        flast[$key]=$faults
    done
    sleep 0.2
done
wait "$e2e" || { cat "$err" >&2; exit 1; }
hz=$(getconf CLK_TCK)
declare -A cpu flt
for key in "${!first[@]}"; do
    exe=${key%:*}
    cpu[$exe]=$(( ${cpu[$exe]:-0} + (${last[$key]} - ${first[$key]}) * 1000 / hz ))
    flt[$exe]=$(( ${flt[$exe]:-0} + ${flast[$key]} - ${ffirst[$key]} ))
done
echo "| executable | CPU (ms) | minor faults |"
echo "| --- | --- | --- |"
for exe in $(printf '%s\n' "${!cpu[@]}" | sort); do
    echo "| $exe | ${cpu[$exe]} | ${flt[$exe]} |"
done
echo
cat "$out"
