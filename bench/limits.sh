#!/usr/bin/env bash
# What per-key limits and NOTIFY events cost on the claim and enqueue paths (bench/limits.py),
# on a throwaway cluster with default durability.   bash bench/limits.sh [--jobs N] [--reps R]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
dir=${QE_LIMITS_DIR:-/tmp/queue_ext_bench_limits}
port=${QE_LIMITS_PORT:-25456}
"$root/scripts/cluster.sh" stop "$dir" 2>/dev/null || true
rm -rf "$dir"
"$root/scripts/cluster.sh" start "$dir" "$port" "shared_buffers = '256MB'" >/dev/null
trap '"$root/scripts/cluster.sh" stop "$dir" >/dev/null' EXIT
psql -X -q -h 127.0.0.1 -p "$port" -U postgres -c "CREATE EXTENSION queue_ext" postgres
psql -X -At -h 127.0.0.1 -p "$port" -U postgres -c "SELECT 'PostgreSQL ' || current_setting('server_version') || ', synchronous_commit=' || current_setting('synchronous_commit') || ', shared_buffers=' || current_setting('shared_buffers') || ', ' || (SELECT 'queue_ext ' || extversion FROM pg_extension WHERE extname = 'queue_ext')" postgres
python3 "$here/limits.py" --dsn "host=127.0.0.1 port=$port user=postgres dbname=postgres" "$@"
