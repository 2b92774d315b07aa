"""What a different hot table would buy the batched paths: measured, not guessed.

    python3 bench/hot_table_variants.py --port PORT [--pgmq FILE] [--rounds 8] [--jobs 50000] [--only VARIANT,...]

The batched enqueue and drain are the paths where queue_ext stays below pgmq, and the cost is
in the tables: rows and indexes, not the functions around them (bench/enqueue_split.py and
bench/drain_split.py measure that). This script measures the redesigns that could close the
gap before anyone builds one. Each variant gets the same statements, in plain SQL straight
against its tables, so only the table design differs:

  shipped_api queue_ext's enqueue_jobs, get_next_jobs and complete_jobs, as its users call them
  shipped     queue_ext.job_queue and job_archive as they are: one table for every queue, the
              claim index led by queue_name, every column a job has
  per_queue   the same columns and indexes in a table of its own for one queue: no queue_name in
              the row or in any index (pgmq's layout: a table per queue)
  narrow      a table per queue holding only what the claim and the completion read or change
              (id, payload, priority, state, run_at, attempt, max_attempts, lease, created_at,
              enqueued_by); everything else would live in a side table, written only when used
  narrow_no_id
              narrow, with the claim index on (priority, run_at) alone: a batch's jobs share both,
              so btree deduplication stores them as one key and a posting list; but jobs with
              equal keys are then claimed in heap order, not in the order they were enqueued
  pgmq        pgmq 1.11.1's own tables (a queue table and its archive), the same plain SQL
  pgmq_api    pgmq's send_batch, read and archive(ids), as its users call them

Per variant, from one connection with synchronous_commit off (each variant empties its tables first),
the backend's CPU time (/proc) and the WAL per job (the two API rows include their functions'
work; the others are the tables' cost alone): enqueue as INSERT ... SELECT of 1,000 rows
a statement; drain as a transaction per batch of 100 that locks and marks the oldest runnable
jobs, then deletes them and inserts their archive rows. Rounds alternate the order of the
variants. Every drain is checked: each job enqueued is archived exactly once.

Creates the database qe_hot_variants afresh on each run, with queue_ext, the variants' tables and pgmq's SQL."""
import argparse
import os
import statistics

import psycopg

from splitlib import cpu_seconds, fresh_database_with_pgmq

DB = "qe_hot_variants"
HERE = os.path.dirname(os.path.abspath(__file__))
PAYLOAD = '{"n": 1, "kind": "hot_table_variants"}'
ENQUEUE_ROWS = 1000
DRAIN_BATCH = 100

# What the claim and the completion read or change: all a narrow table keeps.
NARROW = ("id", "payload", "priority", "status", "run_at", "attempt", "max_attempts", "lease_token",
          "lease_expires_at", "enqueued_by", "created_at")
CLAIMABLE = "WHERE status IN ('queued', 'retrying')"
# Per variant built here: the hot table's columns (a filter on job_queue's), its indexes, and its
# archive's columns (on job_archive's, or the narrow hot table's plus the completion's own).
VARIANTS = {
    "per_queue": (lambda n: n != "queue_name",
                  [f"INDEX ON {{t}} (priority DESC, run_at, id) {CLAIMABLE} AND rate_limit_key IS NULL",
                   f"INDEX ON {{t}} (rate_limit_key, priority DESC, run_at, id) {CLAIMABLE} AND rate_limit_key IS NOT NULL",
                   "INDEX ON {t} (concurrency_key, id) WHERE status = 'waiting' AND concurrency_key IS NOT NULL",
                   "UNIQUE INDEX ON {t} (enqueued_by, dedupe_key) WHERE dedupe_key IS NOT NULL",
                   "INDEX ON {t} (lease_expires_at) WHERE lease_expires_at IS NOT NULL"],
                  "job_archive", lambda n: n != "queue_name"),
    "narrow": (lambda n: n in NARROW,
               [f"INDEX ON {{t}} (priority DESC, run_at, id) {CLAIMABLE}",
                "INDEX ON {t} (lease_expires_at) WHERE lease_expires_at IS NOT NULL"],
               "job_queue", lambda n: n in NARROW),
    "narrow_no_id": (lambda n: n in NARROW,
                     [f"INDEX ON {{t}} (priority DESC, run_at) {CLAIMABLE}",
                      "INDEX ON {t} (lease_expires_at) WHERE lease_expires_at IS NOT NULL"],
                     "job_queue", lambda n: n in NARROW),
}


def columns_of(c, table, keep):
    """queue_ext's own column definitions (type, NOT NULL, default) as its catalog has them,
    so that the variants follow the schema."""
    rows = c.execute("""
        SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute AS a
        LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum""", [f"queue_ext.{table}"]).fetchall()
    return [f"{name} {kind}" + (" NOT NULL" if not_null else "") + (f" DEFAULT {default}" if default else "")
            for name, kind, not_null, default in rows if keep(name)]


def create_variants(c):
    """Each variant's hot table and archive. shipped_copy: copies of job_queue and job_archive
    with everything but their trigger and row level security; the others: job_queue's columns,
    primary key and CHECK, with the variant's own indexes."""
    for table in ("job_queue", "job_archive"):
        c.execute(f"CREATE TABLE hv_shipped_copy{'' if table == 'job_queue' else '_archive'} "
                  f"(LIKE queue_ext.{table} INCLUDING ALL)")
    live_state = c.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                           "WHERE conrelid = 'queue_ext.job_queue'::regclass AND contype = 'c'").fetchone()[0]
    for variant, (hot_keeps, indexes, archive_of, archive_keeps) in VARIANTS.items():
        hot, archive = TABLES[variant]
        c.execute(f"CREATE TABLE {hot} ({', '.join(columns_of(c, 'job_queue', hot_keeps))}, "
                  f"PRIMARY KEY (id), {live_state})")
        for index in indexes:
            c.execute("CREATE " + index.format(t=hot))
        extra = [] if archive_of == "job_archive" else ["finished_at timestamptz NOT NULL DEFAULT now()", "result jsonb"]
        c.execute(f"CREATE TABLE {archive} ({', '.join(columns_of(c, archive_of, archive_keeps) + extra)}, "
                  "PRIMARY KEY (id))")
        c.execute(f"CREATE INDEX ON {archive} (finished_at)")


ENQUEUE_ARRAY = f"array_fill('{PAYLOAD}'::jsonb, ARRAY[{ENQUEUE_ROWS}])"
SHIPPED_ARCHIVED = ("id, queue_name, payload, priority, status, attempt, max_attempts, worker_id, last_error, errors, "
                    "progress_details, enqueued_by, created_at, run_at, started_at, rate_limit_key, concurrency_key, "
                    "claimed_at")
NARROW_ARCHIVED = "id, payload, priority, status, attempt, max_attempts, enqueued_by, created_at, run_at"


def ours(table, archive, shared, wide):
    """Enqueue, claim and completion in plain SQL on one of our variants' tables. `shared`: a
    table for every queue (queue_name in the row and the claim); `wide`: with every column a
    job has (a claim also sets started_at and claimed_at)."""
    name, value, in_queue = ("queue_name, ", "'hv', ", "s.queue_name = 'hv' AND ") if shared else ("", "", "")
    order = "s.priority DESC, s.run_at" + ("" if table.endswith("no_id") else ", s.id")
    enqueue = f"""
        INSERT INTO {table} (id, {name}payload, priority, status, run_at, max_attempts, enqueued_by)
        SELECT queue_ext.uuid_generate_v7(), {value}p, 'normal', 'queued', now(), 5, current_user
        FROM unnest({ENQUEUE_ARRAY}) AS p"""
    claim = f"""
        WITH c AS (
            UPDATE {table} AS j
            SET status = 'running', attempt = j.attempt + 1, lease_token = queue_ext._lease_token(),
                lease_expires_at = now() + interval '30 seconds'
                {", started_at = coalesce(j.started_at, now()), claimed_at = now()" if wide else ""}
            WHERE j.ctid = ANY (ARRAY(
                SELECT s.ctid FROM {table} AS s
                WHERE {in_queue}s.status IN ('queued', 'retrying') {"AND s.rate_limit_key IS NULL" if wide else ""}
                  AND s.run_at <= now()
                ORDER BY {order}
                LIMIT {DRAIN_BATCH}
                FOR UPDATE SKIP LOCKED))
            RETURNING j.id, j.lease_token)
        SELECT array_agg(id), array_agg(lease_token) FROM c"""
    columns = (SHIPPED_ARCHIVED if shared else SHIPPED_ARCHIVED.replace("queue_name, ", "")) if wide else NARROW_ARCHIVED
    complete = f"""
        WITH done AS (
            DELETE FROM {table} AS t
            USING unnest(%(ids)s::uuid[], %(tokens)s::uuid[]) AS i(id, token)
            WHERE t.id = i.id AND t.status = 'running' AND t.lease_token = i.token
              -- As queue_ext's own statements write it: a form the lease index does not match,
              -- so that the generic plan probes the primary key per id.
              AND coalesce(t.lease_expires_at, '-infinity') > now()
            RETURNING t.*
        ), archived AS (
            INSERT INTO {archive} ({columns}) SELECT {columns.replace('status', "'completed'")} FROM done RETURNING 1
        )
        SELECT count(*) FROM archived"""
    return enqueue, claim, complete


# Per variant: its enqueue statement, its claim, and its completion (given ids and tokens).
STATEMENTS = {
    "shipped_api": (f"SELECT count(*) FROM queue_ext.enqueue_jobs('hv', {ENQUEUE_ARRAY})",
                    f"SELECT array_agg(job_id), array_agg(lease_token) FROM queue_ext.get_next_jobs('hv', {DRAIN_BATCH})",
                    "SELECT count(*) FROM queue_ext.complete_jobs(%(ids)s::uuid[], %(tokens)s::uuid[])"),
    "shipped": ours("queue_ext.job_queue", "queue_ext.job_archive", shared=True, wide=True),
    "shipped_copy": ours("hv_shipped_copy", "hv_shipped_copy_archive", shared=True, wide=True),
    "per_queue": ours("hv_per_queue", "hv_per_queue_archive", shared=False, wide=True),
    "narrow": ours("hv_narrow", "hv_narrow_archive", shared=False, wide=False),
    "narrow_no_id": ours("hv_narrow_no_id", "hv_narrow_no_id_archive", shared=False, wide=False),
    # What pgmq's send_batch, read and archive(ids) do to its tables, without the functions.
    "pgmq": (f"INSERT INTO pgmq.q_hv (vt, message) SELECT clock_timestamp(), p FROM unnest({ENQUEUE_ARRAY}) AS p",
             f"""
        WITH c AS (
            UPDATE pgmq.q_hv AS m SET vt = clock_timestamp() + interval '30 seconds', read_ct = m.read_ct + 1,
                                      last_read_at = clock_timestamp()
            WHERE m.msg_id = ANY (ARRAY(
                SELECT s.msg_id FROM pgmq.q_hv AS s WHERE s.vt <= clock_timestamp()
                ORDER BY s.msg_id LIMIT {DRAIN_BATCH} FOR UPDATE SKIP LOCKED))
            RETURNING m.msg_id)
        SELECT array_agg(msg_id), NULL::uuid[] FROM c""",
             """
        WITH done AS (DELETE FROM pgmq.q_hv WHERE msg_id = ANY (%(ids)s::bigint[])
                      RETURNING msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers),
             archived AS (INSERT INTO pgmq.a_hv (msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers)
                          SELECT msg_id, vt, read_ct, enqueued_at, last_read_at, message, headers FROM done RETURNING 1)
        SELECT count(*) FROM archived"""),
    "pgmq_api": (f"SELECT count(*) FROM pgmq.send_batch('hv_api', {ENQUEUE_ARRAY})",
                 f"SELECT array_agg(msg_id), NULL::uuid[] FROM pgmq.read('hv_api', 30, {DRAIN_BATCH})",
                 "SELECT count(*) FROM pgmq.archive('hv_api', %(ids)s::bigint[])"),
}
TABLES = {
    "shipped_api": ("queue_ext.job_queue", "queue_ext.job_archive"),
    "shipped": ("queue_ext.job_queue", "queue_ext.job_archive"),
    "shipped_copy": ("hv_shipped_copy", "hv_shipped_copy_archive"),
    "per_queue": ("hv_per_queue", "hv_per_queue_archive"),
    "narrow": ("hv_narrow", "hv_narrow_archive"),
    "narrow_no_id": ("hv_narrow_no_id", "hv_narrow_no_id_archive"),
    "pgmq": ("pgmq.q_hv", "pgmq.a_hv"),
    "pgmq_api": ("pgmq.q_hv_api", "pgmq.a_hv_api"),
}


def prepare(port, pgmq_sql):
    dsn = fresh_database_with_pgmq(port, DB, pgmq_sql, "hv")
    with psycopg.connect(dsn, autocommit=True) as c:
        create_variants(c)
        c.execute("SELECT pgmq.create('hv_api')")
    return dsn


def empty(c, variant):
    c.execute(f"TRUNCATE {', '.join(TABLES[variant])}")
    c.execute(f"VACUUM ANALYZE {', '.join(TABLES[variant])}")


def measured(c, work):
    """Runs work(); returns its backend CPU seconds and WAL bytes."""
    pid = c.info.backend_pid
    lsn = c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    start = cpu_seconds(pid)
    work()
    used = cpu_seconds(pid) - start
    wal = float(c.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", [lsn]).fetchone()[0])
    return used, wal


def enqueue_round(c, variant, jobs):
    statements = jobs // ENQUEUE_ROWS

    def work():
        for _ in range(statements):
            c.execute(STATEMENTS[variant][0], prepare=True)
    used, wal = measured(c, work)
    return used / jobs * 1e6, wal / jobs


def drain_round(c, variant, jobs):
    """Drains the jobs enqueue_round left; checks each was archived exactly once."""
    _, claim_sql, complete_sql = STATEMENTS[variant]
    hot, archive = TABLES[variant]
    c.execute(f"VACUUM ANALYZE {hot}")
    done = 0

    def work():
        nonlocal done
        while True:
            with c.transaction():
                ids, tokens = c.execute(claim_sql, prepare=True).fetchone()
                if not ids:
                    return
                n = c.execute(complete_sql, {"ids": ids, "tokens": tokens}, prepare=True).fetchone()[0]
                if n != len(ids):
                    raise SystemExit(f"{variant}: archived {n} of a batch of {len(ids)}")
                done += n
    used, wal = measured(c, work)
    id_column = "msg_id" if variant.startswith("pgmq") else "id"
    total, distinct = c.execute(f"SELECT count(*), count(DISTINCT {id_column}) FROM {archive}").fetchone()
    left = c.execute(f"SELECT count(*) FROM {hot}").fetchone()[0]
    if (done, total, distinct, left) != (jobs, jobs, jobs, 0):
        raise SystemExit(f"{variant}: drained {done}, archived {total} ({distinct} distinct), {left} left, "
                         f"of {jobs}")
    return used / jobs * 1e6, wal / jobs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pgmq", default=os.path.join(HERE, "peers", "cache", "pgmq-1.11.1.sql"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=50000)
    ap.add_argument("--only", help="comma-separated variants")
    args = ap.parse_args()
    variants = args.only.split(",") if args.only else list(STATEMENTS)
    dsn = prepare(args.port, args.pgmq)
    results = {v: {"enqueue": [], "enqueue_wal": [], "drain": [], "drain_wal": []} for v in variants}
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET synchronous_commit = off")
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                empty(c, v)
                cpu, wal = enqueue_round(c, v, args.jobs)
                results[v]["enqueue"].append(cpu)
                results[v]["enqueue_wal"].append(wal)
                cpu, wal = drain_round(c, v, args.jobs)
                results[v]["drain"].append(cpu)
                results[v]["drain_wal"].append(wal)
    med = {v: {k: statistics.median(x) for k, x in m.items()} for v, m in results.items()}
    print(f"{args.jobs:,} jobs a round, {args.rounds} rounds alternating; backend CPU per job, medians "
          f"(every round in brackets); WAL per job. × pgmq is like for like, as a rate (pgmq's CPU per job "
          f"over the variant's): an API row against pgmq_api, a tables-only row against pgmq")
    print("| variant | enqueue µs/job | WAL B | drain µs/job | WAL B | enqueue × pgmq | drain × pgmq |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        m = med[v]
        base = med.get("pgmq_api" if v.endswith("_api") else "pgmq")
        # A CPU reading of 0 (too few jobs for the clock's ticks) has no ratio.
        ratios = "".join(f" {base[k] / m[k]:.2f} |" if base and m[k] else " |" for k in ("enqueue", "drain"))
        print(f"| {v} | {m['enqueue']:.2f} {[round(x, 1) for x in results[v]['enqueue']]} | {m['enqueue_wal']:.0f} "
              f"| {m['drain']:.2f} {[round(x, 1) for x in results[v]['drain']]} | {m['drain_wal']:.0f} |" + ratios)

if __name__ == "__main__":
    main()
