"""Where a single enqueue's time goes: the function, or the table it writes.

    python3 bench/enqueue_split.py --port PORT [--pgmq FILE] [--rounds 3] [--seconds 8]

Four ways to store one job, each call its own transaction, on one cluster at the same time:
`enqueue_job` as shipped; the same row INSERTed straight into queue_ext.job_queue (what a
function that cost nothing would leave); pgmq's `send`; and a plain 3-column table (the
headline's floor). Measured twice: the backend's CPU time and WAL per call from one
connection with synchronous_commit off (from /proc), and calls per second from 4 client
threads with synchronous_commit on (the headline's setting). Rounds alternate the order.

The cluster must have queue_ext installed and preloaded (scripts/install.sh); this script
creates the database `enqueue_split` with queue_ext, pgmq's SQL (bench/peers/setup.sh pgmq)
and the plain table, and empties them between rounds."""
import argparse
import statistics
import threading
import time

import psycopg

DB = "enqueue_split"
PAYLOAD = "'{\"n\": 1}'::jsonb"
WAYS = {
    "enqueue_job": f"SELECT queue_ext.enqueue_job('split', {PAYLOAD})",
    "INSERT into job_queue": (
        "INSERT INTO queue_ext.job_queue (id, queue_name, payload, priority, status, run_at, max_attempts, "
        f"enqueued_by) VALUES (queue_ext.uuid_generate_v7(), 'split', {PAYLOAD}, 'normal', 'queued', now(), 3, "
        "current_user::text)"),
    "pgmq send": f"SELECT pgmq.send('split', {PAYLOAD})",
    "plain INSERT (floor)": f"INSERT INTO split_floor (payload) VALUES ({PAYLOAD})",
}


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def prepare(port, pgmq_sql):
    admin = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB}")
        c.execute(f"CREATE DATABASE {DB}")
    dsn = f"host=127.0.0.1 port={port} user=postgres dbname={DB}"
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION queue_ext")
        c.execute("SELECT queue_ext.create_queue('split')")
        c.execute("CREATE TABLE split_floor (id bigserial PRIMARY KEY, payload jsonb NOT NULL, "
                  "created_at timestamptz NOT NULL DEFAULT now())")
        c.execute(open(pgmq_sql).read())
        c.execute("SELECT pgmq.create('split')")
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
    ap.add_argument("--calls", type=int, default=5000, help="calls per CPU measurement")
    args = ap.parse_args()
    dsn = prepare(args.port, args.pgmq)
    cpu, wal, rates = ({w: [] for w in WAYS} for _ in range(3))
    for r in range(args.rounds):
        for way in (list(WAYS) if r % 2 == 0 else list(reversed(WAYS))):
            us, b = cost_per_call(dsn, WAYS[way], args.calls)
            cpu[way].append(us)
            wal[way].append(b)
            rates[way].append(rate(dsn, WAYS[way], args.seconds))
        empty(dsn)
    floor = statistics.median(rates["plain INSERT (floor)"])
    print(f"| way ({args.rounds} rounds, medians) | backend CPU µs/call | WAL B/call | 4 clients, calls/s | × floor |")
    print("|---|---:|---:|---:|---:|")
    for way in WAYS:
        r = statistics.median(rates[way])
        print(f"| {way} | {statistics.median(cpu[way]):.0f} | {statistics.median(wal[way]):.0f} "
              f"| {r:,.0f} | {r / floor:.2f} |")
    print("rounds, calls/s: " + "; ".join(f"{w} {' '.join(f'{x:.0f}' for x in rates[w])}" for w in WAYS))


if __name__ == "__main__":
    main()
