#!/usr/bin/env bash
# egress start over SSH: start -> first proxied byte, cold and warm, against
# the reference's manual scp + nohup flow; headless Chromium page load through
# the bridge against direct. Needs root (network namespace, sshd) and chromium.
# CRABBOX_BENCH_ROUNDS (default 5) sets the rounds; PROFILE (default release;
# `dev` for the debug build with optimised dependencies). Results:
# docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
cargo build --workspace --profile "$profile" --quiet
cargo bench --quiet --profile "$profile" -p crabbox-tests --bench egress_start
