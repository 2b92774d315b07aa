#!/usr/bin/env bash
# Golden-output SQL tests: runs pg_test/sql/*.sql with pg_regress against a fresh cluster
# (started as the postgres user) and compares with pg_test/expected/*.out.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
source "$root/scripts/pgversion.sh"  # QE_PG=18: against PostgreSQL 18
dir=/tmp/queue_ext_${QE_TAG}regress
port=25442
out=$dir/out
"$root/scripts/cluster.sh" stop "$dir" 2>/dev/null || true
rm -rf "$dir"
"$root/scripts/cluster.sh" start "$dir" "$port"
trap '"$root/scripts/cluster.sh" stop "$dir"' EXIT
psql -q -h 127.0.0.1 -p "$port" -U postgres -c "CREATE DATABASE queue_ext_regress" postgres
mkdir -p "$out"
chmod 777 "$out"
tests=$(cd "$here/sql" && ls *.sql | sed 's/\.sql$//' | sort)
if ! "$PGXS_SRC/test/regress/pg_regress" --bindir="$PGBIN" \
    --use-existing --host=127.0.0.1 --port="$port" --user=postgres --dbname=queue_ext_regress \
    --inputdir="$here" --outputdir="$out" $tests; then
  echo "---- regression.diffs ----"; cat "$out/regression.diffs" 2>/dev/null || true
  echo "---- server log (tail) ----"; tail -40 "$dir/server.log" || true
  exit 1
fi
