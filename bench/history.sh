#!/usr/bin/env bash
# Throughput with 0 and with 5 million finished jobs retained (bench/history.py), on a
# throwaway cluster.   bash bench/history.sh [--retained N] [--reps R]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
dir=${QE_HISTORY_DIR:-/tmp/queue_ext_bench_history}
port=${QE_HISTORY_PORT:-55482}
"$root/scripts/cluster.sh" stop "$dir" 2>/dev/null || true
rm -rf "$dir"
"$root/scripts/cluster.sh" start "$dir" "$port" "shared_buffers = '256MB'" "max_wal_size = '4GB'" >/dev/null
trap '"$root/scripts/cluster.sh" stop "$dir" >/dev/null' EXIT
psql -X -q -h 127.0.0.1 -p "$port" -U postgres -c "CREATE EXTENSION queue_ext" postgres
cd "$here" && python3 history.py --dsn "host=127.0.0.1 port=$port user=postgres dbname=postgres" "$@"
