#!/usr/bin/env bash
# Claim+complete throughput (4 workers, one job per call) with an empty history and with
# 5,000,000 finished jobs retained: the history cell of bench/run.sh on its own.
#   bash bench/history.sh [--retained N] [--reps R]
# QE_HISTORY_DIR / QE_HISTORY_PORT move its throwaway cluster (and the webhook sink, on PORT+1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export QE_BENCH_DIR=${QE_HISTORY_DIR:-/tmp/queue_ext_bench_history}
export QE_BENCH_PORT=${QE_HISTORY_PORT:-25482}
exec bash "$here/run.sh" --only history "$@"
