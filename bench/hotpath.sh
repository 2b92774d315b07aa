#!/usr/bin/env bash
# Where the time of each core path goes, per call, with the default configuration.
#
#   bash bench/hotpath.sh [--perf] [seconds per path, default 10]
#
# One throwaway cluster with pg_stat_statements tracking nested statements. Each path runs
# in pgbench (prepared statements) on one connection with synchronous_commit = off, so the figures are the CPU
# cost inside Postgres (no WAL flush wait, no client threads competing): microseconds per
# call, and below it every statement the call ran, with its share. pgmq's SQL is installed
# beside (bench/peers/setup.sh fetches it) and measured the same way when present.
# With --perf, each path then runs again as the benchmark runs it (synchronous_commit on) while
# perf samples its backend, and bench/perf_buckets.py splits the backend's CPU per job into the
# phases of a statement's life: what pg_stat_statements cannot see (executor start-up and
# shutdown, commit, the client protocol, PL/pgSQL itself, SET clauses).
set -euo pipefail
cd "$(dirname "$0")/.."
with_perf=0
if [ "${1:-}" = --perf ]; then
  with_perf=1
  shift
  command -v perf >/dev/null || { echo "hotpath.sh --perf: perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
fi
secs=${1:-10}
port=${QE_HOTPATH_PORT:-25463}
dir=/tmp/queue_ext_hotpath
bash scripts/cluster.sh stop "$dir" >/dev/null 2>&1 || true
rm -rf "$dir"
bash scripts/cluster.sh start "$dir" "$port" \
  "shared_preload_libraries = 'queue_ext,pg_stat_statements'" \
  "pg_stat_statements.track = all" "pg_stat_statements.max = 2000" \
  "synchronous_commit = off" "shared_buffers = 256MB" >/dev/null
trap 'bash scripts/cluster.sh stop "$dir" >/dev/null 2>&1 || true' EXIT
psql=(psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres)
"${psql[@]}" -c "CREATE EXTENSION pg_stat_statements" -c "CREATE EXTENSION queue_ext" \
  -c "SELECT queue_ext.create_queue('hp')" >/dev/null
pgmq_sql=$(ls bench/peers/cache/pgmq-*.sql 2>/dev/null | head -1 || true)
if [ -n "$pgmq_sql" ]; then
  "${psql[@]}" -c "CREATE SCHEMA pgmq" -f "$pgmq_sql" -c "SELECT pgmq.create('hp')" >/dev/null 2>&1 || pgmq_sql=""
fi

tmp=$(mktemp -d)
cat >"$tmp/enqueue.sql" <<'EOF'
SELECT queue_ext.enqueue_job('hp', '{"n": 1}');
EOF
cat >"$tmp/claim_complete.sql" <<'EOF'
SELECT job_id, lease_token FROM queue_ext.get_next_job('hp') \gset
SELECT queue_ext.complete_job(:job_id, NULL, :lease_token);
EOF
cat >"$tmp/complete_and_get_next.sql" <<'EOF'
SELECT job_id AS j, lease_token AS t FROM queue_ext.complete_and_get_next(:j, 'hp', NULL, :t) \gset
EOF
cat >"$tmp/enqueue_batch.sql" <<'EOF'
SELECT count(*) FROM queue_ext.enqueue_jobs('hp', array_fill('{"n": 1}'::jsonb, ARRAY[1000]));
EOF
cat >"$tmp/drain_batch.sql" <<'EOF'
BEGIN;
SELECT array_agg(job_id) AS ids, array_agg(lease_token) AS toks FROM queue_ext.get_next_jobs('hp', 100) \gset
SELECT queue_ext.complete_jobs(:ids, :toks);
COMMIT;
EOF
cat >"$tmp/pgmq_send.sql" <<'EOF'
SELECT pgmq.send('hp', '{"n": 1}');
EOF
cat >"$tmp/pgmq_read_archive.sql" <<'EOF'
SELECT msg_id FROM pgmq.read('hp', 30, 1) \gset
SELECT pgmq.archive('hp', :msg_id::bigint);
EOF
cat >"$tmp/pgmq_send_batch.sql" <<'EOF'
SELECT count(*) FROM pgmq.send_batch('hp', array_fill('{"n": 1}'::jsonb, ARRAY[1000]));
EOF
cat >"$tmp/pgmq_drain_batch.sql" <<'EOF'
BEGIN;
SELECT array_agg(msg_id) AS ids FROM pgmq.read('hp', 30, 100) \gset
SELECT count(*) FROM pgmq.archive('hp', :ids::bigint[]);
COMMIT;
EOF

fill() {  # enough jobs for a drain path to never run dry
  "${psql[@]}" -c "TRUNCATE queue_ext.job_queue, queue_ext.job_archive, queue_ext.job_status_log" \
    -c "SELECT count(*) FROM queue_ext.enqueue_jobs('hp', array_fill('{\"n\": 1}'::jsonb, ARRAY[$1]))" \
    -c "VACUUM ANALYZE" >/dev/null
}

run() {  # name, script, jobs per transaction, pgbench options
  local name=$1 script=$2 per=$3
  shift 3
  "${psql[@]}" -c "SELECT pg_stat_statements_reset()" >/dev/null
  local tps
  tps=$(pgbench -n -h 127.0.0.1 -p "$port" -U postgres -M prepared -c 1 -T "$secs" "$@" -f "$script" postgres 2>/dev/null |
        awk '/^tps/ {print $3}')
  printf '\n## %s: %.0f calls/s, %.1f us per job (1 connection, synchronous_commit off)\n' \
    "$name" "$tps" "$(echo "1000000 / ($tps * $per)" | bc -l)"
  "${psql[@]}" -P pager=off -c "
    WITH s AS (
      SELECT toplevel, calls, total_exec_time, mean_exec_time,
             regexp_replace(left(query, 110), '\s+', ' ', 'g') AS query
      FROM pg_stat_statements WHERE query NOT LIKE '%pg_stat_statements%'
    ), top AS (SELECT sum(total_exec_time) AS t FROM s WHERE toplevel)
    SELECT CASE WHEN toplevel THEN 'call' ELSE '  inside' END AS level, calls,
           round((mean_exec_time * 1000)::numeric, 1) AS us_each,
           round((100 * total_exec_time / nullif(top.t, 0))::numeric, 1) AS pct_of_calls, query
    FROM s, top
    ORDER BY toplevel DESC, total_exec_time DESC LIMIT 24"
  if [ "$with_perf" = 1 ]; then
    profile "$name" "$script" "$per" "$@"
  fi
}

cpu_ticks() {  # user + system clock ticks of a process so far
  awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$1/stat"
}

profile() {  # name, script, jobs per transaction, pgbench options: where the backend's CPU goes
  local name=$1 script=$2 per=$3
  shift 3
  local pid="" ticks0 ticks1 t0 t1 txns
  rm -f "$tmp"/perfbench.*
  # -l: a line per transaction with its end time, to count those inside the recording.
  (cd "$tmp" && PGOPTIONS="-c synchronous_commit=on" pgbench -n -h 127.0.0.1 -p "$port" -U postgres -M prepared \
    -c 1 -T "$((secs + 2))" -l --log-prefix=perfbench "$@" -f "$script" postgres >/dev/null 2>&1) &
  local bench=$!
  for _ in $(seq 50); do
    pid=$("${psql[@]}" -Atc "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench' LIMIT 1")
    [ -n "$pid" ] && break
    sleep 0.1
  done
  sleep 1
  t0=$(date +%s.%N)
  ticks0=$(cpu_ticks "$pid")
  perf record -q -F 1999 -g -p "$pid" -o "$tmp/perf.data" -- sleep "$((secs - 1))" 2>/dev/null
  ticks1=$(cpu_ticks "$pid")
  t1=$(date +%s.%N)
  wait "$bench" || true
  txns=$(awk -v a="$t0" -v b="$t1" '{t = $5 + $6 / 1e6} t >= a && t <= b {n++} END {print n + 0}' "$tmp"/perfbench.*)
  local us
  us=$(echo "($ticks1 - $ticks0) * 1000000 / $(getconf CLK_TCK) / ($txns * $per)" | bc -l)
  printf '\n%s, synchronous_commit on, perf: ' "$name"
  python3 bench/perf_buckets.py "$tmp/perf.data" --us-per-job "$us"
}

echo "# queue_ext hot paths: $(date -u '+%F %H:%M UTC'), $(nproc) cpus, queue_ext $("${psql[@]}" -Atc "SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'")"
fill 0
run "enqueue_job" "$tmp/enqueue.sql" 1
fill 200000
run "get_next_job + complete_job" "$tmp/claim_complete.sql" 1
fill 200000
claim_one() { "${psql[@]}" -Atc "SELECT job_id, lease_token FROM queue_ext.get_next_job('hp')" | tr '|' ' '; }
# Each run starts from a job of its own: the last one a run claimed stays running.
read -r j t < <(claim_one)
with_perf=0 run "complete_and_get_next" "$tmp/complete_and_get_next.sql" 1 -D "j=$j" -D "t=$t"
if [ "$with_perf" = 1 ]; then
  read -r j t < <(claim_one)
  profile "complete_and_get_next" "$tmp/complete_and_get_next.sql" 1 -D "j=$j" -D "t=$t"
fi
fill 0
run "enqueue_jobs, 1,000 per call" "$tmp/enqueue_batch.sql" 1000
fill 500000
run "get_next_jobs(100) + complete_jobs" "$tmp/drain_batch.sql" 100
if [ -n "$pgmq_sql" ]; then
  pgmq_fill() {
    "${psql[@]}" -c "SELECT pgmq.purge_queue('hp')" -c "TRUNCATE pgmq.a_hp" >/dev/null
    if [ "$1" -gt 0 ]; then
      "${psql[@]}" -c "SELECT count(*) FROM pgmq.send_batch('hp', array_fill('{\"n\": 1}'::jsonb, ARRAY[$1]))" >/dev/null
    fi
    "${psql[@]}" -c "VACUUM ANALYZE" >/dev/null
  }
  pgmq_fill 0
  run "pgmq.send" "$tmp/pgmq_send.sql" 1
  pgmq_fill 200000
  run "pgmq.read + pgmq.archive" "$tmp/pgmq_read_archive.sql" 1
  pgmq_fill 0
  run "pgmq.send_batch, 1,000 per call" "$tmp/pgmq_send_batch.sql" 1000
  pgmq_fill 500000
  run "pgmq.read(100) + pgmq.archive(ids)" "$tmp/pgmq_drain_batch.sql" 100
fi
rm -rf "$tmp"
