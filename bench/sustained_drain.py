"""A long drain, slice by slice: how claims slow down between two visits of autovacuum.

    python3 bench/sustained_drain.py --port PORT [--jobs 1000000] [--slice 100000] [--batch 100]

Fills a queue with --jobs jobs, then drains it from one connection (`get_next_jobs` +
`complete_jobs` in one transaction per batch, synchronous_commit off) and prints the rate of
every slice of --slice jobs, with the autovacuum runs of job_queue so far. A claim walks its
index from the oldest runnable entry, and the entries of the jobs claimed before it stay there
until vacuum removes them: the rate falls slice by slice until autovacuum visits, then
recovers. Run it under two settings of autovacuum_naptime (ALTER SYSTEM, then
pg_reload_conf()) to see what the setting is worth for a queue this busy.

The database (qe_sustained_drain, created once) needs queue_ext installed."""
import argparse
import time

import psycopg

from splitlib import queue_ext_database

DB = "qe_sustained_drain"
QUEUE = "sustained"


def vacuums(c):
    """How many times autovacuum has processed job_queue, and when it last finished."""
    return c.execute("SELECT autovacuum_count, last_autovacuum FROM pg_stat_user_tables "
                     "WHERE relid = 'queue_ext.job_queue'::regclass").fetchone()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--jobs", type=int, default=1_000_000)
    ap.add_argument("--slice", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=100)
    args = ap.parse_args()
    dsn = queue_ext_database(args.port, DB)
    with psycopg.connect(dsn, autocommit=True) as c:
        naptime = c.execute("SHOW autovacuum_naptime").fetchone()[0]
        c.execute("SELECT queue_ext.drop_queue(q.queue_name, force => true) FROM queue_ext.queues AS q "
                  "WHERE q.queue_name = %s", [QUEUE])
        c.execute("SELECT queue_ext.create_queue(%s)", [QUEUE])
        for start in range(0, args.jobs, 10_000):
            c.execute("SELECT count(*) FROM queue_ext.enqueue_jobs(%s, array_fill('{\"n\": 1}'::jsonb, ARRAY[%s]))",
                      [QUEUE, min(10_000, args.jobs - start)])
        c.execute("VACUUM ANALYZE queue_ext.job_queue")
        c.execute("SET synchronous_commit = off")
        first_vacuums = vacuums(c)[0]
        print(f"{args.jobs:,} jobs, batches of {args.batch}, autovacuum_naptime {naptime}")
        print("| jobs drained | jobs/s in the slice | seconds | autovacuum runs of job_queue so far |")
        print("|---:|---:|---:|---:|")
        done = sliced = 0
        began = slice_began = time.monotonic()
        while True:
            with c.transaction():
                n = drain_batch(c, args.batch)
            done += n
            if done - sliced >= args.slice or (n == 0 and done > sliced):
                now = time.monotonic()
                print(f"| {done:,} | {(done - sliced) / (now - slice_began):,.0f} | {now - began:.1f} "
                      f"| {vacuums(c)[0] - first_vacuums} |", flush=True)
                sliced, slice_began = done, now
            if n == 0:
                break
        left = c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [QUEUE]).fetchone()[0]
    if done != args.jobs or left:
        raise SystemExit(f"{done:,} drained of {args.jobs:,}, {left:,} left")


def drain_batch(c, batch):
    """Claims and completes one batch; how many jobs it finished."""
    ids, tokens = c.execute("SELECT array_agg(job_id), array_agg(lease_token) FROM queue_ext.get_next_jobs(%s, %s)",
                            [QUEUE, batch], prepare=True).fetchone()
    if not ids:
        return 0
    return c.execute("SELECT count(*) FROM queue_ext.complete_jobs(%s, %s)", [ids, tokens], prepare=True).fetchone()[0]


if __name__ == "__main__":
    main()
