#!/usr/bin/env bash
# Runs the benchmark on a throwaway cluster (queue_ext preloaded, default durability:
# synchronous_commit on, fsync on) with a local webhook sink. Pass --quick for the smoke test.
#   bash bench/run.sh [--quick] [--reps N] [--only enqueue,drain,latency,webhooks,floor]
# QE_BENCH_DIR / QE_BENCH_PORT move the throwaway cluster (and the sink, on PORT+1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
dir=${QE_BENCH_DIR:-/tmp/queue_ext_bench}
port=${QE_BENCH_PORT:-55450}
sink_port=$((port + 1))
# Two runs on one directory would stop and delete each other's cluster mid-run: take turns.
exec 9>"$dir.lock"
if ! flock -n 9; then
  echo "bench/run.sh: another run holds $dir.lock; waiting for it to finish" >&2
  flock 9
fi
"$root/scripts/cluster.sh" stop "$dir" 2>/dev/null || true
rm -rf "$dir"
"$root/scripts/cluster.sh" start "$dir" "$port" "queue_ext.http_allowlist = '127.0.0.1'" "queue_ext.max_in_flight = 512"
python3 "$here/sink.py" "$sink_port" &
sink_pid=$!
trap 'kill $sink_pid 2>/dev/null || true; "$root/scripts/cluster.sh" stop "$dir"' EXIT
psql -q -h 127.0.0.1 -p "$port" -U postgres -c "CREATE EXTENSION queue_ext" postgres
python3 "$here/bench.py" --dsn "host=127.0.0.1 port=$port user=postgres dbname=postgres" \
  --port "$port" --sink-port "$sink_port" "$@"
