#!/usr/bin/env bash
# Upgrade test: installs every released version kept in sql/released/, fills it with jobs in
# every state, runs ALTER EXTENSION queue_ext UPDATE, and checks (1) the database then matches
# a fresh install of the current version object for object (pg_test/describe.sql) and
# (2) the jobs survived and still flow.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
source "$root/scripts/pgversion.sh"  # QE_PG=18: against PostgreSQL 18
dir=/tmp/queue_ext_${QE_TAG}upgrade
port=25447
extdir=$("$PG_CONFIG" --sharedir)/extension
current=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
cp "$root"/sql/released/queue_ext--*.sql "$extdir/"
"$root/scripts/cluster.sh" stop "$dir" 2>/dev/null || true
rm -rf "$dir"
"$root/scripts/cluster.sh" start "$dir" "$port" >/dev/null
trap '"$root/scripts/cluster.sh" stop "$dir" >/dev/null' EXIT
q() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"; }

q -c "CREATE DATABASE fresh" postgres
q -c "CREATE EXTENSION queue_ext" fresh
for released in "$root"/sql/released/queue_ext--*.sql; do
  from=$(basename "$released" .sql | sed 's/^queue_ext--//')
  db="from_${from//./_}"
  echo "upgrade $from -> $current"
  q -c "CREATE DATABASE $db" postgres
  q "$db" >/dev/null <<SQL
CREATE EXTENSION queue_ext VERSION '$from';
SELECT queue_ext.create_queue('old', max_attempts => 1);
SELECT queue_ext.enqueue_job('old', jsonb_build_object('n', n)) FROM generate_series(1, 5) AS n;
SELECT job_id FROM queue_ext.get_next_job('old') \gset
SELECT queue_ext.complete_job(:'job_id');
SELECT job_id FROM queue_ext.get_next_job('old') \gset
SELECT queue_ext.fail_job(:'job_id', 'boom');
SELECT job_id FROM queue_ext.get_next_job('old', lease => '1 hour') \gset
ALTER EXTENSION queue_ext UPDATE;
SQL
  version=$(q -At -c "SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'" "$db")
  [ "$version" = "$current" ] || { echo "upgraded to $version, want $current"; exit 1; }
  q -At -f "$here/describe.sql" fresh >"$dir/fresh.txt"
  q -At -f "$here/describe.sql" "$db" >"$dir/$db.txt"
  if ! diff -u "$dir/fresh.txt" "$dir/$db.txt"; then
    echo "upgrade from $from differs from a fresh $current install (- fresh, + upgraded)"; exit 1
  fi
  # The jobs survived: one completed, one dead, one still running under its lease, two queued
  # that the new version claims and completes, and the new features work on old data.
  got=$(q -At "$db" <<'SQL'
SELECT count(*) FILTER (WHERE status = 'completed') || ' completed, ' FROM queue_ext.job_archive;
SELECT count(*) || ' dead, ' FROM queue_ext.job_dead_letter;
SELECT count(*) FILTER (WHERE status = 'running') || ' running, '
    || count(*) FILTER (WHERE status = 'queued') || ' queued' FROM queue_ext.job_queue;
SELECT queue_ext.complete_job(job_id, NULL, lease_token) FROM queue_ext.get_next_jobs('old', 10);
SELECT queue_ext.set_concurrency_limit('k', 1);
SELECT count(*) FROM (SELECT queue_ext.enqueue_job('old', '{}', concurrency_key => 'k') FROM generate_series(1, 2)) AS e;
SELECT string_agg(status::text, ',' ORDER BY id) FROM queue_ext.job_queue WHERE concurrency_key = 'k';
SQL
)
  want=$'1 completed, \n1 dead, \n1 running, 2 queued\ncompleted\ncompleted\n\n2\nqueued,waiting'
  if [ "$got" != "$want" ]; then
    echo "after the upgrade from $from:"; echo "$got"; echo "want:"; echo "$want"; exit 1
  fi
done
echo "upgrade tests passed: $(wc -l <"$dir/fresh.txt") catalog lines identical to a fresh install"
