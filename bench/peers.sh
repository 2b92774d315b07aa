#!/usr/bin/env bash
# queue_ext, pgmq and graphile-worker side by side on one throwaway cluster (bench/peers.py).
#   bash bench/peers.sh [--reps N] [--quick]
# Fetches the peers from their registries when missing: pgmq's SQL via cargo (crates.io),
# graphile-worker via npm ci (bench/peers/package-lock.json).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
dir=${QE_PEERS_DIR:-/tmp/queue_ext_bench_peers}
port=${QE_PEERS_PORT:-55480}

(cd "$here/peers" && [ -d node_modules/graphile-worker ] || npm ci --no-audit --no-fund --loglevel=error)
cargo fetch -q --manifest-path "$here/peers/pgmq-sql/Cargo.toml"
pgmq_sql=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/pgmq-0.33.7 | head -1)/src/install/embedded/sql/pgmq.sql
[ -f "$pgmq_sql" ] || { echo "pgmq.sql not found after cargo fetch"; exit 1; }

"$root/scripts/cluster.sh" stop "$dir" 2>/dev/null || true
rm -rf "$dir"
"$root/scripts/cluster.sh" start "$dir" "$port" "shared_buffers = '256MB'" >/dev/null
trap '"$root/scripts/cluster.sh" stop "$dir" >/dev/null' EXIT
q() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }
for db in qe_bench pgmq_bench graphile_bench; do q -c "CREATE DATABASE $db" postgres; done
q -c "CREATE EXTENSION queue_ext" qe_bench
q -f "$pgmq_sql" pgmq_bench >/dev/null
node "$here/peers/graphile.mjs" migrate "postgres://postgres@127.0.0.1:$port/graphile_bench" >/dev/null
q -At -c "SELECT 'PostgreSQL ' || current_setting('server_version') || ', synchronous_commit=' || current_setting('synchronous_commit') || ', shared_buffers=' || current_setting('shared_buffers') || ', max_connections=' || current_setting('max_connections') || ', jit=' || current_setting('jit')" postgres
echo "queue_ext $(q -At -c "SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'" qe_bench), pgmq 1.11.1 (plain-SQL install, pgmq crate 0.33.7), graphile-worker $(node -p "require('$here/peers/node_modules/graphile-worker/package.json').version")"
cd "$here" && python3 peers.py --port "$port" "$@"
