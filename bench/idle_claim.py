"""An idle worker's two ways to wait and claim, alternating on one running cluster.

    python3 bench/idle_claim.py --port PORT [--jobs 150] [--rounds 3]

`two calls`: CALL queue_ext.wait_for_jobs, then SELECT get_next_job (two round trips after the
wake-up). `one call`: CALL queue_ext.wait_for_next_job, which claims inside the call. For each
job the worker is already asleep (10 ms before the enqueue); the producer's enqueue_job is timed
and so is the moment the worker holds the claimed job. Prints, per way and round, the medians of
enqueue -> claimed and of enqueue returned -> claimed (the part after the producer's commit: the
wake-up and the claim). Uses the database at --dbname (queue_ext installed), queue `idle_claim`.
"""
import argparse
import statistics
import threading
import time

import psycopg

QUEUE = "idle_claim"


def two_calls(conn):
    conn.execute("CALL queue_ext.wait_for_jobs(ARRAY[%s], '5 seconds')", [QUEUE], prepare=True).fetchone()
    row = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s, 'w')", [QUEUE],
                       prepare=True).fetchone()
    return time.perf_counter(), row


def one_call(conn):
    row = conn.execute("CALL queue_ext.wait_for_next_job(ARRAY[%s], '5 seconds', 'w')", [QUEUE],
                       prepare=True).fetchone()
    return time.perf_counter(), (row[0], row[6])


def measure(worker, producer, way, jobs):
    total, after = [], []
    for _ in range(jobs):
        got = {}
        t = threading.Thread(target=lambda: got.update(r=way(worker)))
        t.start()
        time.sleep(0.01)
        t0 = time.perf_counter()
        producer.execute("SELECT queue_ext.enqueue_job(%s, '{}')", [QUEUE], prepare=True)
        t1 = time.perf_counter()
        t.join(30)
        claimed, (job_id, lease) = got["r"]
        if job_id is None:
            raise SystemExit("a wake-up without a claim: the job was not taken")
        worker.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job_id, lease], prepare=True)
        total.append((claimed - t0) * 1000)
        after.append((claimed - t1) * 1000)
    return statistics.median(total), statistics.median(after)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dbname", default="postgres")
    ap.add_argument("--jobs", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dsn = f"host=127.0.0.1 port={args.port} user=postgres dbname={args.dbname}"
    with psycopg.connect(dsn, autocommit=True) as worker, psycopg.connect(dsn, autocommit=True) as producer:
        if producer.execute("SELECT count(*) FROM queue_ext.queues WHERE queue_name = %s", [QUEUE]).fetchone()[0] == 0:
            producer.execute("SELECT queue_ext.create_queue(%s)", [QUEUE])
        print("| round | way | enqueue -> claimed, p50 ms | enqueue returned -> claimed, p50 ms |")
        print("|---|---|---:|---:|")
        for r in range(args.rounds):
            ways = [("two calls", two_calls), ("one call", one_call)]
            for name, way in (ways if r % 2 == 0 else ways[::-1]):
                total, after = measure(worker, producer, way, args.jobs)
                print(f"| {r + 1} | {name} | {total:.2f} | {after:.2f} |", flush=True)


if __name__ == "__main__":
    main()
