#!/usr/bin/env bash
# Isolation specs: races between concurrent sessions (claims, lease expiry and fencing,
# dedupe, dependency release, per-key limits), run by PostgreSQL's own isolationtester
# through pg_isolation_regress against a fresh cluster (started as the postgres user).
# Each spec in pg_test/isolation/specs/ interleaves the steps of two or three sessions in
# the orders its permutations name; the output is compared with expected/*.out.
#
#   bash pg_test/isolation/run.sh [spec ...]     (default: every spec)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$root/scripts/pgversion.sh"  # QE_PG=18: against PostgreSQL 18
dir=/tmp/queue_ext_${QE_TAG}isolation
port=25550
db=queue_ext_isolation
out=$dir/out
tester=$PGXS_SRC/test/isolation/pg_isolation_regress
"$root/scripts/cluster.sh" stop "$dir" 2>/dev/null || true
rm -rf "$dir"
# Not preloaded: no dispatcher runs, so nothing but the specs' own steps sweeps expired
# leases or claims jobs, and every interleaving is the one the permutation names.
"$root/scripts/cluster.sh" start "$dir" "$port" "shared_preload_libraries = ''"
trap '"$root/scripts/cluster.sh" stop "$dir"' EXIT
psql -q -X -h 127.0.0.1 -p "$port" -U postgres -c "CREATE DATABASE $db" postgres
psql -q -X -h 127.0.0.1 -p "$port" -U postgres -c "CREATE EXTENSION queue_ext" "$db"
psql -q -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -f "$here/helpers.sql" "$db"
mkdir -p "$out"
chmod 777 "$out"
if [ $# -gt 0 ]; then
  tests="$*"
else
  tests=$(cd "$here/specs" && ls *.spec | sed 's/\.spec$//' | sort)
fi
# A step blocked longer than this is a hang: isolationtester cancels it and the spec fails.
export PGISOLATIONTIMEOUT=30
if ! "$tester" --bindir="$PGBIN" --use-existing --host=127.0.0.1 --port="$port" --user=postgres --dbname="$db" \
    --inputdir="$here" --outputdir="$out" $tests; then
  echo "---- regression.diffs ----"; cat "$out/regression.diffs" 2>/dev/null || true
  echo "---- server log (tail) ----"; tail -40 "$dir/server.log" || true
  exit 1
fi
