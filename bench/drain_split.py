"""Where a batched drain's time goes: the functions, or the tables they change.

    python3 bench/drain_split.py --port PORT [--pgmq FILE] [--rounds 3] [--jobs 20000] [--batch 100]
                                 [--worker] [--perf DIR]

Four ways to claim a batch of jobs and finish them in one transaction, on one cluster at the
same time: `get_next_jobs` + `complete_jobs` as shipped; the same changes written straight
against queue_ext's tables (what functions that cost nothing would leave: lock and update the
batch, then delete it and insert its archive rows in one statement); pgmq's `read` +
`archive(ids)`; and the headline's floor (UPDATE ... SKIP LOCKED, then DELETE ... ANY on a plain
table). Measured twice: per job from one connection with synchronous_commit off, the backend's
CPU time (from /proc) and the WAL it wrote; and jobs per second with 4 connections draining
together, synchronous_commit on (the headline's setting), with the CPU the whole cluster and the
client threads spent per job meanwhile: at 4 clients on 2 cores the rate is what the CPU per job
allows, and the client's share of it differs by API (ids and lease tokens to read and send back).
With --perf, the last round's 4-client drains are sampled and the cluster's CPU per job is split
into phases. Rounds alternate the order; every way drains the jobs it was given, each exactly
once (checked).

Creates the database bench/enqueue_split.py uses (queue_ext, pgmq's SQL) and the floor's table."""
import argparse
import os
import resource
import signal
import statistics
import subprocess
import threading
import time

import psycopg

from enqueue_split import prepare
from perf_buckets import table
from splitlib import cluster_cpu_seconds, cpu_seconds, postmaster_of

CLAIMED = ("SELECT array_agg(job_id), array_agg(lease_token) FROM queue_ext.get_next_jobs('split', %(n)s)")
COMPLETE = "SELECT count(*) FROM queue_ext.complete_jobs(%(ids)s, %(tokens)s)"
# The same rows changed the same way as get_next_jobs and complete_jobs change them.
CLAIMED_DIRECT = """
    UPDATE queue_ext.job_queue AS j
    SET status = 'running', attempt = j.attempt + 1, lease_token = gen_random_uuid(),
        lease_expires_at = now() + interval '30 seconds', worker_id = NULL,
        started_at = coalesce(j.started_at, now()), claimed_at = now()
    WHERE j.ctid = ANY (ARRAY(
        SELECT c.ctid FROM queue_ext.job_queue AS c
        WHERE c.queue_name = 'split' AND c.status IN ('queued', 'retrying') AND c.rate_limit_key IS NULL
          AND c.run_at <= now()
        ORDER BY c.priority DESC, c.run_at, c.id
        LIMIT %(n)s
        FOR UPDATE SKIP LOCKED))
    RETURNING j.id, j.lease_token"""
COMPLETE_DIRECT = """
    WITH done AS (
        DELETE FROM queue_ext.job_queue AS t
        USING unnest(%(ids)s::uuid[], %(tokens)s::uuid[]) AS i(id, token)
        WHERE t.id = i.id AND t.status = 'running'
          AND (i.token IS NULL OR (t.lease_token = i.token AND t.lease_expires_at > now()))
        RETURNING t.*
    ), archived AS (
        INSERT INTO queue_ext.job_archive (id, queue_name, payload, priority, status, attempt, max_attempts,
            worker_id, result, last_error, errors, progress, progress_details, enqueued_by, created_at, run_at,
            started_at, rate_limit_key, concurrency_key, claimed_at)
        SELECT id, queue_name, payload, priority, 'completed', attempt, max_attempts, worker_id, NULL, last_error,
               errors, 100, progress_details, enqueued_by, created_at, run_at, started_at, rate_limit_key,
               concurrency_key, claimed_at
        FROM done
        RETURNING 1
    )
    SELECT count(*) FROM archived"""
PGMQ_READ = "SELECT array_agg(msg_id) FROM pgmq.read('split', 30, %(n)s)"
PGMQ_ARCHIVE = "SELECT count(*) FROM pgmq.archive('split', %(ids)s::bigint[])"
# The headline's floor table and statements (bench.py).
FLOOR_TABLE = ("CREATE TABLE IF NOT EXISTS drain_floor (id bigserial PRIMARY KEY, status int NOT NULL DEFAULT 0, "
               "payload jsonb NOT NULL); CREATE INDEX IF NOT EXISTS drain_floor_todo ON drain_floor (id) WHERE status = 0")
FLOOR_CLAIM = ("UPDATE drain_floor SET status = 1 WHERE id = ANY(ARRAY(SELECT id FROM drain_floor WHERE status = 0 "
               "ORDER BY id LIMIT %(n)s FOR UPDATE SKIP LOCKED)) RETURNING id, payload")
FLOOR_DELETE = "DELETE FROM drain_floor WHERE id = ANY(%(ids)s)"

WORKER = "drain_split_worker"
FILL = {
    "queue_ext": "SELECT count(*) FROM queue_ext.enqueue_jobs('split', array_fill('{\"n\": 1}'::jsonb, ARRAY[%s]))",
    "pgmq": "SELECT count(*) FROM pgmq.send_batch('split', array_fill('{\"n\": 1}'::jsonb, ARRAY[%s]))",
    "floor": "INSERT INTO drain_floor (payload) SELECT p FROM unnest(array_fill('{\"n\": 1}'::jsonb, ARRAY[%s])) AS p",
}


def get_next_jobs_and_complete_jobs(c, n):
    ids, tokens = c.execute(CLAIMED, {"n": n}, prepare=True).fetchone()
    if not ids:
        return []
    if c.execute(COMPLETE, {"ids": ids, "tokens": tokens}, prepare=True).fetchone()[0] != len(ids):
        raise SystemExit("complete_jobs finished fewer jobs than were claimed")
    return ids


def direct_sql(c, n):
    # As the functions run (their SET clauses): never a sequential scan of the hot table.
    c.execute("SET LOCAL enable_seqscan = off")
    rows = c.execute(CLAIMED_DIRECT, {"n": n}, prepare=True).fetchall()
    if not rows:
        return []
    ids = [r[0] for r in rows]
    done = c.execute(COMPLETE_DIRECT, {"ids": ids, "tokens": [r[1] for r in rows]}, prepare=True).fetchone()[0]
    if done != len(ids):
        raise SystemExit("the direct completion finished fewer jobs than were claimed")
    return ids


def pgmq_read_and_archive(c, n):
    ids = c.execute(PGMQ_READ, {"n": n}, prepare=True).fetchone()[0]
    if not ids:
        return []
    if c.execute(PGMQ_ARCHIVE, {"ids": ids}, prepare=True).fetchone()[0] != len(ids):
        raise SystemExit("pgmq archived fewer messages than were read")
    return ids


def floor(c, n):
    ids = [r[0] for r in c.execute(FLOOR_CLAIM, {"n": n}, prepare=True).fetchall()]
    if ids and c.execute(FLOOR_DELETE, {"ids": ids}, prepare=True).rowcount != len(ids):
        raise SystemExit("the floor deleted fewer rows than it claimed")
    return ids


FUNCTIONS = "get_next_jobs + complete_jobs"
WAYS = {
    FUNCTIONS: ("queue_ext", get_next_jobs_and_complete_jobs),
    "the same changes in plain SQL on queue_ext's tables": ("queue_ext", direct_sql),
    "pgmq read + archive(ids)": ("pgmq", pgmq_read_and_archive),
    "floor: UPDATE SKIP LOCKED + DELETE ANY": ("floor", floor),
}


def fill(dsn, way, jobs):
    store, _ = WAYS[way]
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("TRUNCATE drain_floor, queue_ext.job_queue, queue_ext.job_archive, pgmq.q_split, pgmq.a_split")
        for start in range(0, jobs, 1000):
            c.execute(FILL[store] % min(1000, jobs - start))
        c.execute("VACUUM ANALYZE")


def check_once(way, seen, jobs):
    if len(seen) != jobs or len(set(seen)) != jobs:
        raise SystemExit(f"{way}: {len(seen)} drained ({len(set(seen))} distinct) of {jobs}")


def drainer(dsn, way, worker):
    """Who drains: queue_ext's functions as the headline's workers do when `worker` (an ordinary
    login role in queue_ext_worker); everything else as the superuser (the direct SQL needs
    the tables' privileges)."""
    return f"{dsn} user={WORKER}" if worker and way == FUNCTIONS else dsn


def one_round(dsn, way, jobs, batch, worker):
    """Backend CPU µs and WAL bytes per job for draining `jobs` jobs in batches."""
    _, drain = WAYS[way]
    fill(dsn, way, jobs)
    with psycopg.connect(drainer(dsn, way, worker), autocommit=True) as c:
        c.execute("SET synchronous_commit = off")
        pid = c.info.backend_pid
        lsn = c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        start = cpu_seconds(pid)
        seen = []
        while True:
            with c.transaction():
                ids = drain(c, batch)
            if not ids:
                break
            seen += ids
        used = cpu_seconds(pid) - start
        wal = float(c.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", [lsn]).fetchone()[0])
    check_once(way, seen, jobs)
    return used / jobs * 1e6, wal / jobs


def rate(dsn, way, jobs, batch, worker, clients=4, perf_to=None):
    """Jobs per second for `clients` connections draining `jobs` jobs together, with
    synchronous_commit as configured (on, as in the headline), and where the CPU went: the
    whole cluster's per job, and the client threads' per job. With perf_to, the cluster's
    processes are sampled meanwhile (perf record -a -g) into that file."""
    _, drain = WAYS[way]
    fill(dsn, way, jobs)
    seen = [[] for _ in range(clients)]
    client_cpu = [0.0] * clients
    ready = threading.Barrier(clients + 1)
    drained = threading.Barrier(clients + 1)
    may_close = threading.Event()

    def client(i):
        with psycopg.connect(drainer(dsn, way, worker), autocommit=True) as c:
            ready.wait()
            began = resource.getrusage(resource.RUSAGE_THREAD)
            try:
                while True:
                    with c.transaction():
                        ids = drain(c, batch)
                    if not ids:
                        break
                    seen[i] += ids
            finally:  # a client that failed still lets the others finish (check_once reports it)
                ended = resource.getrusage(resource.RUSAGE_THREAD)
                client_cpu[i] = ended.ru_utime + ended.ru_stime - began.ru_utime - began.ru_stime
                drained.wait()
                may_close.wait()  # the cluster's CPU is read while every backend still runs

    with psycopg.connect(dsn, autocommit=True) as c:
        postmaster = postmaster_of(c)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    perf = None
    if perf_to:
        perf = subprocess.Popen(["perf", "record", "-q", "-a", "-g", "-F", "999", "-o", perf_to],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # perf is sampling before the clients start
    ready.wait()
    began, server_began = time.monotonic(), cluster_cpu_seconds(postmaster)
    drained.wait()
    elapsed, server = time.monotonic() - began, cluster_cpu_seconds(postmaster) - server_began
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait()
    may_close.set()
    for t in threads:
        t.join()
    check_once(way, [i for s in seen for i in s], jobs)
    return jobs / elapsed, server / jobs * 1e6, sum(client_cpu) / jobs * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pgmq", default="bench/peers/cache/pgmq-1.11.1.sql",
                    help="pgmq's SQL install script (bench/peers/setup.sh pgmq prints its path)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--worker", action="store_true",
                    help=f"queue_ext's functions drain as {WORKER}, an ordinary role in queue_ext_worker (as bench/run.sh does)")
    ap.add_argument("--perf", metavar="DIR",
                    help="in the last round, sample the cluster with perf while 4 clients drain, and split its CPU "
                         "per job into phases (bench/perf_buckets.py); the recordings go to DIR")
    args = ap.parse_args()
    dsn = prepare(args.port, args.pgmq)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(FLOOR_TABLE)
        if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [WORKER]).fetchone():
            c.execute(f"CREATE ROLE {WORKER} LOGIN IN ROLE queue_ext_worker")
    cpu, wal, rates, server, client = ({w: [] for w in WAYS} for _ in range(5))
    recordings = {}
    for r in range(args.rounds):
        for way in (list(WAYS) if r % 2 == 0 else list(reversed(WAYS))):
            us, b = one_round(dsn, way, args.jobs, args.batch, args.worker)
            cpu[way].append(us)
            wal[way].append(b)
            if args.perf and r == args.rounds - 1:
                recordings[way] = os.path.join(args.perf, f"drain-{len(recordings)}.data")
            per_second, server_us, client_us = rate(dsn, way, args.jobs, args.batch, args.worker,
                                                    perf_to=recordings.get(way) if r == args.rounds - 1 else None)
            rates[way].append(per_second)
            server[way].append(server_us)
            client[way].append(client_us)
    floor_rate = statistics.median(rates["floor: UPDATE SKIP LOCKED + DELETE ANY"])
    who = f"queue_ext's functions as {WORKER}" if args.worker else "everything as the superuser"

    def cell(values, fmt):
        return f"{fmt.format(statistics.median(values))} ({', '.join(fmt.format(x) for x in values)})"

    print(f"{args.jobs:,} jobs per round in batches of {args.batch}, {who}, {args.rounds} rounds, medians (every round)")
    print("| way | backend CPU µs/job | WAL B/job | 4 clients, jobs/s | × floor | 4 clients: cluster CPU µs/job "
          "| 4 clients: client CPU µs/job |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for way in WAYS:
        r = statistics.median(rates[way])
        print(f"| {way} | {cell(cpu[way], '{:.1f}')} | {statistics.median(wal[way]):.0f} | {cell(rates[way], '{:,.0f}')} "
              f"| {r / floor_rate:.2f} | {cell(server[way], '{:.1f}')} | {cell(client[way], '{:.1f}')} |")
    for way, path in recordings.items():
        print()
        print("\n".join(table(path, server[way][-1], f"{way}, 4 clients, the cluster's processes", comm="postgres")))


if __name__ == "__main__":
    main()
