#!/usr/bin/env bash
# Whole-machine CPU per path: runs bench/e2e.sh once for each path named in
# E2E_PATHS (comma-separated `--only` parts, default
# "direct,squid,1 hop,3 hops,crabboxd") and prints, for each run, the busy
# and idle CPU time of the whole machine from /proc/stat (every process of
# the path, the harness's client and origin included, start-up included),
# with the run's throughput. Busy time per byte says what a path costs the
# machine; idle time on a machine the path saturates says how often every
# process of the path waited on another. Same options and environment as
# bench/e2e.sh, without --only, e.g.
#   E2E_NO_BUILD=1 ./bench/e2e_busy.sh --bulk-mib 1024 --small 0 --concurrent 0 --rounds 4 --no-fairness
set -euo pipefail
cd "$(dirname "$0")/.."
IFS=, read -r -a paths <<<"${E2E_PATHS:-direct,squid,1 hop,3 hops,crabboxd}"
# Busy and idle jiffies of the whole machine (idle counts iowait).
jiffies() {
    local _cpu user nice system idle iowait irq softirq steal _rest
    read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
    echo "$((user + nice + system + irq + softirq + steal)) $((idle + iowait))"
}
hz=$(getconf CLK_TCK)
echo "| path | busy CPU (ms) | idle CPU (ms) | bulk (MiB/s) |"
echo "| --- | --- | --- | --- |"
for path in "${paths[@]}"; do
    read -r busy0 idle0 < <(jiffies)
    table=$(./bench/e2e.sh "$@" --only "$path" | grep -v '^round')
    read -r busy1 idle1 < <(jiffies)
    # The table's rows after its two header lines: one per path the part matched.
    echo "$table" | tail -n +3 | while IFS='|' read -r _ name bulk _; do
        echo "|${name}| $(((busy1 - busy0) * 1000 / hz)) | $(((idle1 - idle0) * 1000 / hz)) |${bulk}|"
    done
done
