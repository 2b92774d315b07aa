"""The dispatcher's SQL without its HTTP: what a turn costs, and how much of it is per turn.

    python3 bench/dispatch_turns.py --port PORT [--batches 16,48,128,256] [--jobs 20000] [--rounds 3]

Runs the dispatcher's own statements from one connection, as its SQL thread runs them: per
transaction, the previous batch's outcomes recorded as delivered (`_dispatch_record_rows`, with
the benchmark sink's reply) and the next batch claimed (`_dispatch_claim_rows`), with
synchronous_commit off. Each batch size is a round of its own; rounds alternate the order.
Prints the backend's CPU per job (from /proc) for each batch size, then a least-squares split of
a turn's CPU into a part per turn and a part per job: where the dispatcher's SQL thread goes as
its batches shrink or grow.

The database (qe_dispatch_turns, created once) must have no dispatcher, or it would claim the
same jobs: set queue_ext.database to the other databases, or run the cluster without queue_ext
in shared_preload_libraries."""
import argparse
import statistics
import time

import psycopg

from splitlib import cpu_seconds, queue_ext_database

DB = "qe_dispatch_turns"
QUEUE = "turns"
REPLY_HEADERS = '{"content-length": "0", "date": "Wed, 02 Dec 2026 16:00:00 GMT"}'


def database(port):
    dsn = queue_ext_database(port, DB)
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as c:
        time.sleep(0.5)  # a dispatcher the launcher starts for it shows up meanwhile
        if c.execute("SELECT 1 FROM pg_stat_activity WHERE datname = %s AND backend_type LIKE '%%dispatcher%%'",
                     [DB]).fetchone():
            raise SystemExit(f"{DB} has a dispatcher, which would claim the same jobs: leave it out of "
                             "queue_ext.database, or run without queue_ext in shared_preload_libraries")
    return dsn


def fresh_queue(c, jobs):
    """The webhook queue QUEUE afresh, with `jobs` runnable jobs, its history gone, vacuumed."""
    c.execute("SELECT queue_ext.drop_queue(q.queue_name, force => true) FROM queue_ext.queues AS q "
              "WHERE q.queue_name = %s", [QUEUE])
    c.execute("DELETE FROM queue_ext.job_archive WHERE queue_name = %s", [QUEUE])
    c.execute("DELETE FROM queue_ext.webhook_deliveries WHERE queue_name = %s", [QUEUE])
    c.execute("SELECT queue_ext.create_queue(%s, webhook_url => 'http://127.0.0.1:9/hook')", [QUEUE])
    for start in range(0, jobs, 1000):
        c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs(%s, array_fill('{\"t0\": 1.5}'::jsonb, ARRAY[%s]))",
                  [QUEUE, min(1000, jobs - start)])
    c.execute("VACUUM ANALYZE queue_ext.job_queue")


def one_round(dsn, batch, jobs):
    """Backend CPU and wall time per job for `jobs` jobs delivered in turns of `batch`."""
    with psycopg.connect(dsn, autocommit=True) as c:
        fresh_queue(c, jobs)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET synchronous_commit = off")
        pid = c.info.backend_pid
        start, began = cpu_seconds(pid), time.perf_counter()
        recorded, previous = 0, []
        while True:
            with c.transaction():
                if previous:
                    n = len(previous)
                    applied = c.execute(
                        "SELECT queue_ext._dispatch_record_rows(%s::uuid[], %s::uuid[], %s::text[], %s::int[], "
                        "%s::text[], %s::text[], %s::int[], %s::text[], %s::float8[], %s::jsonb[], %s::text[], "
                        "%s::float8[])",
                        [[r[0] for r in previous], [r[1] for r in previous], [QUEUE] * n, [r[2] for r in previous],
                         [r[3] for r in previous], ["delivered"] * n, [200] * n, [None] * n, [1.5] * n,
                         [REPLY_HEADERS] * n, [""] * n, [None] * n], prepare=True).fetchone()[0]
                    if applied != n:
                        raise SystemExit(f"{applied} of {n} outcomes applied")
                    recorded += n
                # As under load: requests of this queue in flight, so it is claimed from at once.
                previous = c.execute(
                    "SELECT job_id, lease_token, attempt, url FROM queue_ext._dispatch_claim_rows("
                    "'queue_ext-dispatcher', %s, ARRAY[%s], ARRAY[1], NULL, interval '30 seconds', ARRAY[%s])",
                    [batch, QUEUE, QUEUE], prepare=True).fetchall()
            if not previous:
                break
        cpu = (cpu_seconds(pid) - start) / recorded * 1e6
        wall = (time.perf_counter() - began) / recorded * 1e6
    if recorded != jobs:
        raise SystemExit(f"{recorded} of {jobs} jobs recorded")
    return cpu, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--batches", default="16,48,128,256")
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dsn = database(args.port)
    seen = {b: [] for b in batches}
    for r in range(args.rounds):
        for b in (batches if r % 2 == 0 else batches[::-1]):
            seen[b].append(one_round(dsn, b, args.jobs))
    print(f"{args.jobs:,} jobs per round, {args.rounds} rounds, medians (every round in brackets)")
    print("| jobs per turn | backend CPU µs/job | wall µs/job |")
    print("|---:|---:|---:|")
    for b in batches:
        cpus = [c for c, _ in seen[b]]
        walls = [w for _, w in seen[b]]
        print(f"| {b} | {statistics.median(cpus):.1f} [{', '.join(f'{c:.1f}' for c in cpus)}] "
              f"| {statistics.median(walls):.1f} |")
    if len(batches) >= 2:
        # CPU per turn = fixed + per_job * batch, fitted on the medians.
        xs = batches
        ys = [statistics.median([c for c, _ in seen[b]]) * b for b in batches]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        per_job = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        fixed = my - per_job * mx
        print(f"fit: a turn costs {fixed:.0f} µs of backend CPU plus {per_job:.1f} µs per job")


if __name__ == "__main__":
    main()
