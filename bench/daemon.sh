#!/usr/bin/env bash
# Idle cost and API latency of crabboxd (release build): RSS, CPU over an
# idle period, warm GetStatus RTT p50/p99. Prints a markdown table.
#   CRABBOX_BENCH_IDLE_SECS (default 60), CRABBOX_BENCH_CALLS (default 5000)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p crabboxd -p crabboxctl --bins
cargo bench -p crabbox-tests --bench daemon_idle
