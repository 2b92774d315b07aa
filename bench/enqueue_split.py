"""Where an enqueue's time goes: the function, or the table it writes.

    python3 bench/enqueue_split.py --port PORT [--pgmq FILE] [--rounds 3] [--seconds 8] [--batch N]

Four ways to store jobs, each call its own transaction, on one cluster at the same time:
`enqueue_job` as shipped; the same row INSERTed straight into queue_ext.job_queue (what a
function that cost nothing would leave); pgmq's `send`; and a plain 3-column table (the
headline's floor). With --batch N, N jobs per call: `enqueue_jobs`, INSERT ... SELECT from
unnest into job_queue, `send_batch`, and the same into the plain table. Measured twice: the
backend's CPU time and WAL per job from one connection with synchronous_commit off (from
/proc), and jobs per second from 4 client threads with synchronous_commit on (the headline's
setting). Rounds alternate the order; the tables are emptied after each way.

The cluster must have queue_ext installed and preloaded (scripts/install.sh); this script
creates the database `enqueue_split` with queue_ext, pgmq's SQL (bench/peers/setup.sh pgmq)
and the plain table, and empties them between rounds."""
import argparse
import statistics
import threading
import time

import psycopg

from splitlib import cpu_seconds, fresh_database_with_pgmq

DB = "enqueue_split"
PAYLOAD = "'{\"n\": 1}'::jsonb"
COLUMNS = "(id, queue_name, payload, priority, status, run_at, max_attempts, enqueued_by)"
ROW = "queue_ext.uuid_generate_v7(), 'split', {p}, 'normal', 'queued', now(), 3, current_user::text"
FLOOR = "plain INSERT (floor)"


def ways(batch):
    """The four statements, each storing `batch` jobs."""
    if batch == 1:
        return {
            "enqueue_job": f"SELECT queue_ext.enqueue_job('split', {PAYLOAD})",
            "INSERT into job_queue": (f"INSERT INTO queue_ext.job_queue {COLUMNS} "
                                      f"VALUES ({ROW.format(p=PAYLOAD)})"),
            "pgmq send": f"SELECT pgmq.send('split', {PAYLOAD})",
            FLOOR: f"INSERT INTO split_floor (payload) VALUES ({PAYLOAD})",
        }
    payloads = f"array_fill({PAYLOAD}, ARRAY[{batch}])"
    return {
        "enqueue_jobs": f"SELECT count(*) FROM queue_ext.enqueue_jobs('split', {payloads})",
        "INSERT into job_queue": (f"INSERT INTO queue_ext.job_queue {COLUMNS} "
                                  f"SELECT {ROW.format(p='u.p')} FROM unnest({payloads}) AS u(p)"),
        "pgmq send_batch": f"SELECT count(*) FROM pgmq.send_batch('split', {payloads})",
        FLOOR: f"INSERT INTO split_floor (payload) SELECT u.p FROM unnest({payloads}) AS u(p)",
    }


def prepare(port, pgmq_sql):
    dsn = fresh_database_with_pgmq(port, DB, pgmq_sql, "split")
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE TABLE split_floor (id bigserial PRIMARY KEY, payload jsonb NOT NULL, "
                  "created_at timestamptz NOT NULL DEFAULT now())")
    return dsn


def empty(dsn):
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("TRUNCATE split_floor, queue_ext.job_queue, pgmq.q_split")
        c.execute("VACUUM ANALYZE")


def cost_per_call(dsn, statement, calls):
    """Backend CPU µs and WAL bytes per call, one connection, synchronous_commit off."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SET synchronous_commit = off")
        for _ in range(50):
            c.execute(statement, prepare=True)
        pid = c.info.backend_pid
        lsn = c.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        start = cpu_seconds(pid)
        for _ in range(calls):
            c.execute(statement, prepare=True)
        used = cpu_seconds(pid) - start
        wal = c.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", [lsn]).fetchone()[0]
    return used / calls * 1e6, float(wal) / calls


def rate(dsn, statement, seconds, clients=4):
    """Calls per second from `clients` threads, synchronous_commit as configured (on)."""
    counts = [0] * clients
    ready = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i):
        with psycopg.connect(dsn, autocommit=True) as c:
            for _ in range(20):
                c.execute(statement, prepare=True)
            ready.wait()
            n = 0
            while time.monotonic() < stop_at[0]:
                c.execute(statement, prepare=True)
                n += 1
            counts[i] = n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds + 0.5
    ready.wait()
    began = time.monotonic()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - began)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pgmq", default="bench/peers/cache/pgmq-1.11.1.sql",
                    help="pgmq's SQL install script (bench/peers/setup.sh pgmq prints its path)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8, help="length of each 4-client run")
    ap.add_argument("--batch", type=int, default=1, help="jobs per call")
    ap.add_argument("--calls", type=int, help="calls per CPU measurement (default: 5,000 jobs' worth, "
                                               "at least 100 calls)")
    args = ap.parse_args()
    if args.batch < 1:
        ap.error("--batch must be at least 1")
    calls = args.calls or max(100, 5000 // args.batch)
    statements = ways(args.batch)
    dsn = prepare(args.port, args.pgmq)
    cpu, wal, rates = ({w: [] for w in statements} for _ in range(3))
    for r in range(args.rounds):
        for way in (list(statements) if r % 2 == 0 else list(reversed(statements))):
            us, b = cost_per_call(dsn, statements[way], calls)
            cpu[way].append(us / args.batch)
            wal[way].append(b / args.batch)
            rates[way].append(rate(dsn, statements[way], args.seconds) * args.batch)
            empty(dsn)
    floor = statistics.median(rates[FLOOR])
    print(f"{args.batch:,} job(s) per call, {args.rounds} rounds, medians")
    print("| way | backend CPU µs/job | WAL B/job | 4 clients, jobs/s | × floor |")
    print("|---|---:|---:|---:|---:|")
    for way in statements:
        r = statistics.median(rates[way])
        print(f"| {way} | {statistics.median(cpu[way]):.{0 if args.batch == 1 else 2}f} "
              f"| {statistics.median(wal[way]):.0f} | {r:,.0f} | {r / floor:.2f} |")
    print("rounds, jobs/s: " + "; ".join(f"{w} {' '.join(f'{x:.0f}' for x in rates[w])}" for w in statements))


if __name__ == "__main__":
    main()
