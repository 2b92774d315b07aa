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
# QE_BENCH_SETTING adds one postgresql.conf line, e.g. "queue_ext.dispatcher_synchronous_commit = off".
"$root/scripts/cluster.sh" start "$dir" "$port" "queue_ext.http_allowlist = '127.0.0.1'" "queue_ext.max_in_flight = 512" \
  ${QE_BENCH_SETTING:+"$QE_BENCH_SETTING"}
# The sink is compiled (std-only Rust, builds in seconds) so that the benchmark measures the
# dispatcher, not a Python HTTP server; bench/sink.py is the same sink in Python.
# QE_BENCH_SINK=python uses that one instead.
if [ "${QE_BENCH_SINK:-rust}" = python ]; then
  python3 "$here/sink.py" "$sink_port" &
else
  sink_target=${CARGO_TARGET_DIR:-$root/target}/bench-sink
  cargo build -q --release --manifest-path "$here/sink-rs/Cargo.toml" --target-dir "$sink_target"
  "$sink_target/release/queue_ext_bench_sink" "$sink_port" &
fi
sink_pid=$!
trap 'kill $sink_pid 2>/dev/null || true; "$root/scripts/cluster.sh" stop "$dir"' EXIT
psql -q -h 127.0.0.1 -p "$port" -U postgres -c "CREATE EXTENSION queue_ext" postgres
python3 "$here/bench.py" --dsn "host=127.0.0.1 port=$port user=postgres dbname=postgres" \
  --port "$port" --sink-port "$sink_port" "$@"
