#!/bin/sh
# Egress benchmark: one run on loopback, side by side (direct, squid CONNECT,
# ssh -D, crabbox v1 and v2 across a WebSocket relay process). Prints a
# Markdown table for docs/benchmarks.md.
#
# Needs: apt-get install -y squid openssh-server (paths whose tools are
# missing are skipped). Options: --bulk-mib N (1024) --small N (500) --concurrent N (1000).
set -eu
cd "$(dirname "$0")/../.."
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true
exec cargo bench -p crabbox-egress --bench egress -- "$@"
