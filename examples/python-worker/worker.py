"""A queue_ext worker in Python (psycopg 3).

    DATABASE_URL=postgresql://app@localhost/app QUEUE=emails CONCURRENCY=4 python3 worker.py

CONCURRENCY threads each hold a connection and run one job at a time. Idle threads sleep
until `NOTIFY queue_ext_jobs, '<queue>'` (sent after an enqueue commits) or POLL_SECONDS
pass: the poll catches retries whose backoff has ended, which nobody announces. A long job's
lease is extended by a heartbeat every HEARTBEAT_SECONDS. A job that raises is failed with
fail_job (queue_ext retries it after backoff, up to the queue's max_attempts).

SIGTERM or SIGINT: claim nothing more, give running jobs SHUTDOWN_GRACE seconds to finish,
then fail the rest with retry_in => 0 so another worker takes them at once. No job is left
`running` behind the process. Prints one JSON line per finished attempt.
"""
import json
import os
import signal
import socket
import sys
import threading
import time

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

DSN = os.environ.get("DATABASE_URL", "postgresql:///postgres")
QUEUE = os.environ.get("QUEUE", "default")
CONCURRENCY = int(os.environ.get("CONCURRENCY", "4"))
POLL_SECONDS = float(os.environ.get("POLL_SECONDS", "5"))
HEARTBEAT_SECONDS = float(os.environ.get("HEARTBEAT_SECONDS", "30"))
SHUTDOWN_GRACE = float(os.environ.get("SHUTDOWN_GRACE", "10"))
WORKER_ID = os.environ.get("WORKER_ID", f"py-{socket.gethostname()}-{os.getpid()}")

stopping = threading.Event()  # set by SIGTERM: claim nothing more
abandon = threading.Event()   # set when the grace period is over: give running jobs back
wake = threading.Event()      # set by a NOTIFY for our queue
_print_lock = threading.Lock()


class Abandoned(Exception):
    pass


def handle(job: dict) -> dict:
    """The work itself: replace with yours. This one sleeps payload["ms"] milliseconds and
    fails its first payload["fail_attempts"] attempts. Long work should watch `abandon`."""
    payload = job["payload"]
    if abandon.wait(payload.get("ms", 0) / 1000):
        raise Abandoned("worker shut down before the job finished")
    if job["attempt"] <= payload.get("fail_attempts", 0):
        raise RuntimeError(f"simulated failure on attempt {job['attempt']}")
    return {"worker": WORKER_ID}


def log(**fields):
    with _print_lock:
        print(json.dumps(fields, default=str), flush=True)


def run(conn: psycopg.Connection, job: dict):
    job_id, token = job["job_id"], job["lease_token"]
    finished = threading.Event()

    def heartbeat():
        while not finished.wait(HEARTBEAT_SECONDS):
            try:
                conn.execute("SELECT queue_ext.heartbeat(%s, %s)", (job_id, token))
            except psycopg.Error as err:  # 55000: the lease was lost; the outcome will say so
                log(event="heartbeat_failed", job_id=job_id, error=str(err))
                return

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        result = handle(job)
    except Exception as err:
        finished.set()
        beat.join()
        retry_in = "0" if isinstance(err, Abandoned) else None
        state = conn.execute("SELECT queue_ext.fail_job(%s, %s, lease_token => %s, retry_in => %s) AS s",
                             (job_id, str(err), token, retry_in)).fetchone()["s"]
        log(event="failed", job_id=job_id, attempt=job["attempt"], state=state, error=str(err))
    else:
        finished.set()
        beat.join()
        conn.execute("SELECT queue_ext.complete_job(%s, %s, lease_token => %s)", (job_id, Jsonb(result), token))
        log(event="completed", job_id=job_id, attempt=job["attempt"])


def slot():
    with psycopg.connect(DSN, autocommit=True, row_factory=dict_row) as conn:
        while not stopping.is_set():
            job = conn.execute("SELECT job_id, payload, attempt, lease_token FROM queue_ext.get_next_job(%s, %s)",
                               (QUEUE, WORKER_ID)).fetchone()
            if job is None:
                wake.wait(POLL_SECONDS)
                wake.clear()
                continue
            try:
                run(conn, job)
            except psycopg.Error as err:  # e.g. 55000 when the lease expired mid-job
                log(event="report_failed", job_id=job["job_id"], error=str(err))


def listen():
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute("LISTEN queue_ext_jobs")
        while not stopping.is_set():
            for note in conn.notifies(timeout=1.0):
                if note.payload == QUEUE:
                    wake.set()


def main():
    def on_signal(signum, frame):
        stopping.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=listen, daemon=True).start()
    slots = [threading.Thread(target=slot) for _ in range(CONCURRENCY)]
    for t in slots:
        t.start()
    log(event="started", worker=WORKER_ID, queue=QUEUE, concurrency=CONCURRENCY)
    while not stopping.wait(0.5):
        pass
    deadline = time.monotonic() + SHUTDOWN_GRACE
    for t in slots:
        t.join(max(0.0, deadline - time.monotonic()))
    abandon.set()
    for t in slots:
        t.join()
    log(event="stopped", worker=WORKER_ID)


if __name__ == "__main__":
    sys.exit(main())
