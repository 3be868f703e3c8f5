#!/usr/bin/env bash
# Fails when the relay's instructions per push on a SQLite spool rise more than
# 10 % above the budget in tests/bench/instructions.budget. The figure is a
# callgrind count over a fixed run (one keep-alive connection, fixed pushes),
# not a timing, so it holds on a busy machine. Arguments, optional: PUSHES and
# WARM_UP (default 500 after 100).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v valgrind >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi

cargo bench --bench instructions -- guard "$@"
