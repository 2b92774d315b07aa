#!/usr/bin/env bash
# queue_ext, pgmq and graphile-worker side by side: the enqueue, drain and latency cells of
# bench/run.sh with both peers (the peers are fetched when missing: bench/peers/setup.sh).
#   bash bench/peers.sh [--reps N] [--quick]
# QE_PEERS_DIR / QE_PEERS_PORT move its throwaway cluster (and the webhook sink, on PORT+1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export QE_BENCH_DIR=${QE_PEERS_DIR:-/tmp/queue_ext_bench_peers}
export QE_BENCH_PORT=${QE_PEERS_PORT:-25480}
exec bash "$here/run.sh" --only enqueue,drain,latency,peers "$@"
