#!/usr/bin/env bash
# Runs the benchmark on a throwaway cluster (queue_ext preloaded, default durability:
# synchronous_commit on, fsync on) with a local webhook sink, and its peers (pgmq, graphile-worker)
# side by side on the same cluster, each in its own database. Pass --quick for the smoke test.
#   bash bench/run.sh [--quick] [--reps N] [--retained N]
#                     [--only enqueue,drain,latency,webhooks,history,pgmq,graphile,peers]
# The default runs everything (history: 5 million finished jobs retained; it takes minutes) and
# ends with the headline table: queue_ext as created with its defaults against pgmq and a
# bare-SQL floor (a plain table through the same client) at 4 clients, with the ratios and
# targets (also written to bench/results/*-headline.md). The floor runs in every enqueue and
# drain cell; `floor` in --only means enqueue,drain.
# --quick runs queue_ext's workloads but history, no peers, and needs no network; peers or
# history named in --only run small. Peers missing on this machine are fetched first from their
# registries (bench/peers/setup.sh: the pgmq crate via cargo, graphile-worker via npm ci).
# QE_BENCH_DIR / QE_BENCH_PORT move the throwaway cluster (and the sink, on PORT+1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
dir=${QE_BENCH_DIR:-/tmp/queue_ext_bench}
port=${QE_BENCH_PORT:-25450}
sink_port=$((port + 1))
# Two runs on one directory would stop and delete each other's cluster mid-run: take turns.
exec 9>"$dir.lock"
if ! flock -n 9; then
  echo "bench/run.sh: another run holds $dir.lock; waiting for it to finish" >&2
  flock 9
fi
# The peers this run compares with, fetched before the cluster starts when missing.
peers=$(python3 "$here/bench.py" --plan "$@")
pgmq_sql=
if [ -n "$peers" ]; then
  # shellcheck disable=SC2086
  pgmq_sql=$(bash "$here/peers/setup.sh" $peers | tail -n 1)
fi
"$root/scripts/cluster.sh" stop "$dir" 2>/dev/null || true
rm -rf "$dir"
# queue_ext runs with its defaults but one: the SSRF guard refuses loopback targets unless
# allowed, and the sink listens on 127.0.0.1.
# QE_BENCH_SETTING adds one postgresql.conf line, e.g. "queue_ext.dispatcher_synchronous_commit = off".
"$root/scripts/cluster.sh" start "$dir" "$port" "queue_ext.http_allowlist = '127.0.0.1'" \
  ${QE_BENCH_SETTING:+"$QE_BENCH_SETTING"}
# The sink is compiled (std-only Rust, builds in seconds) so that the benchmark measures the
# dispatcher, not a Python HTTP server; bench/sink.py is the same sink in Python.
# QE_BENCH_SINK=python uses that one instead. The same crate builds the webhook cell's floor:
# loopback HTTP to the sink with no database (bench/sink-rs/src/http_floor.rs).
sink_target=${CARGO_TARGET_DIR:-$root/target}/bench-sink
cargo build -q --release --manifest-path "$here/sink-rs/Cargo.toml" --target-dir "$sink_target"
if [ "${QE_BENCH_SINK:-rust}" = python ]; then
  python3 "$here/sink.py" "$sink_port" &
else
  "$sink_target/release/queue_ext_bench_sink" "$sink_port" &
fi
sink_pid=$!
trap 'kill $sink_pid 2>/dev/null || true; "$root/scripts/cluster.sh" stop "$dir"' EXIT
psql -q -h 127.0.0.1 -p "$port" -U postgres -c "CREATE EXTENSION queue_ext" postgres
q() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
for peer in $peers; do
  case "$peer" in
    pgmq)
      q -c "CREATE DATABASE pgmq_bench" postgres
      q -f "$pgmq_sql" pgmq_bench >/dev/null
      ;;
    graphile)
      q -c "CREATE DATABASE graphile_bench" postgres
      node "$here/peers/graphile.mjs" migrate "postgres://postgres@127.0.0.1:$port/graphile_bench" >/dev/null
      ;;
  esac
done
python3 "$here/bench.py" --dsn "host=127.0.0.1 port=$port user=postgres dbname=postgres" \
  --port "$port" --sink-port "$sink_port" --sink-pid "$sink_pid" \
  --http-floor "$sink_target/release/queue_ext_bench_http_floor" "$@"
