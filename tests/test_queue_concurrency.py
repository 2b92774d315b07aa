"""Concurrency with real connections to a real cluster: no job claimed twice, none lost,
retries and lease expiry under contention, rollbacks, dedupe and dependencies racing."""
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from pgcluster import Cluster

_names = itertools.count()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("concurrency", 25444, ["max_connections = 200"])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    yield c
    c.stop()


@pytest.fixture
def conn(cluster):
    with cluster.connect() as c:
        yield c


def new_queue(conn, **settings):
    name = f"cq{next(_names)}"
    named = "".join(f", {k} => %s" for k in settings)
    conn.execute(f"SELECT queue_ext.create_queue(%s{named})", [name, *settings.values()])
    return name


def fill(conn, queue, n, batch=1000):
    ids = []
    for start in range(0, n, batch):
        payloads = [f'{{"n": {i}}}' for i in range(start, min(n, start + batch))]
        ids += [r[0] for r in conn.execute("SELECT * FROM queue_ext.enqueue_jobs(%s, %s::jsonb[])", [queue, payloads])]
    return ids


def run_threads(n, target):
    with ThreadPoolExecutor(n) as pool:
        return [f.result() for f in [pool.submit(target, i) for i in range(n)]]


def test_eight_workers_claim_ten_thousand_jobs_exactly_once(cluster, conn):
    queue = new_queue(conn)
    ids = fill(conn, queue, 10_000)

    def worker(i):
        got = []
        with cluster.connect() as c:
            while True:
                rows = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, %s, %s)",
                                 [queue, 1 if i % 2 else 10, f"w{i}"]).fetchall()
                if not rows:
                    return got
                for job_id, token in rows:
                    c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job_id, token])
                    got.append(job_id)

    claimed = run_threads(8, worker)
    flat = [j for per in claimed for j in per]
    assert len(flat) == len(set(flat)) == 10_000, "no job claimed twice"
    assert set(flat) == set(ids), "no job lost"
    assert all(len(per) > 0 for per in claimed), "all eight workers took part"
    assert conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = %s AND status = 'completed'",
                        [queue]).fetchone()[0] == 10_000
    assert conn.execute("""SELECT count(*) FROM queue_ext.job_status_history
                           WHERE queue_name = %s AND from_status = 'running' AND to_status = 'completed'""",
                        [queue]).fetchone()[0] == 10_000


def test_concurrent_retries_complete_each_job_once(cluster, conn):
    queue = new_queue(conn, backoff_base="0 seconds", max_attempts=3)
    ids = fill(conn, queue, 2_000)

    def worker(i):
        with cluster.connect() as c:
            idle_since = None
            while True:
                row = c.execute("SELECT job_id, lease_token, attempt FROM queue_ext.get_next_job(%s, %s)",
                                [queue, f"w{i}"]).fetchone()
                if row is None:
                    left = c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0]
                    if left == 0:
                        return
                    idle_since = idle_since or time.time()
                    assert time.time() - idle_since < 30
                    time.sleep(0.01)
                    continue
                idle_since = None
                job_id, token, attempt = row
                if attempt == 1:
                    assert c.execute("SELECT queue_ext.fail_job(%s, 'first try fails', %s)", [job_id, token]).fetchone()[0] == "retrying"
                else:
                    c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job_id, token])

    run_threads(8, worker)
    rows = conn.execute("""SELECT attempt, jsonb_array_length(errors), count(*) FROM queue_ext.job_archive
                           WHERE queue_name = %s GROUP BY 1, 2""", [queue]).fetchall()
    assert rows == [(2, 1, 2_000)], rows
    completions = conn.execute("""SELECT count(*), count(DISTINCT job_id) FROM queue_ext.job_status_history
                                  WHERE queue_name = %s AND to_status = 'completed'""", [queue]).fetchone()
    assert completions == (2_000, 2_000)
    assert set(r[0] for r in conn.execute("SELECT id FROM queue_ext.job_archive WHERE queue_name = %s", [queue])) == set(ids)


def test_lease_expiry_under_contention_loses_nothing(cluster, conn):
    queue = new_queue(conn, max_attempts=10)
    ids = fill(conn, queue, 500)
    stale = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, 100, 'sleepy', lease => '1 second')",
                         [queue]).fetchall()
    time.sleep(1.2)  # these leases have now expired
    stop = threading.Event()

    def sweeper(_):
        with cluster.connect() as c:
            n = 0
            while not stop.is_set():
                n += c.execute("SELECT queue_ext.cleanup_stuck_jobs()").fetchone()[0]
            return n

    def worker(i):
        done = 0
        with cluster.connect() as c:
            while True:
                row = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s, %s)", [queue, f"w{i}"]).fetchone()
                if row is None:
                    if c.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0] == 0:
                        return done
                    time.sleep(0.01)
                    continue
                c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [row[0], row[1]])
                done += 1

    with ThreadPoolExecutor(10) as pool:
        sweeps = [pool.submit(sweeper, i) for i in range(3)]
        workers = [pool.submit(worker, i) for i in range(6)]
        completed = sum(w.result() for w in workers)
        stop.set()
        swept = sum(s.result() for s in sweeps)
    # The dispatcher (preloaded here) sweeps every second too: whoever swept, each expired
    # lease was returned exactly once.
    returned = conn.execute("""SELECT count(*), count(DISTINCT job_id) FROM queue_ext.job_status_history
                               WHERE queue_name = %s AND error = 'lease expired'""", [queue]).fetchone()
    assert returned == (100, 100), returned
    assert swept <= 100
    assert completed == 500
    # The sleepy worker's results are refused: its leases were taken away.
    for job_id, token in stale[:5]:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="already completed|stale"):
            conn.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job_id, token])
    assert set(r[0] for r in conn.execute("SELECT id FROM queue_ext.job_archive WHERE queue_name = %s", [queue])) == set(ids)


def test_rolled_back_enqueue_leaves_nothing(cluster, conn):
    queue = new_queue(conn)
    with cluster.connect() as c:
        c.autocommit = False
        c.execute("SELECT queue_ext.enqueue_job(%s, '{}')", [queue])
        c.execute("SELECT queue_ext.enqueue_jobs(%s, ARRAY['{}', '{}']::jsonb[])", [queue])
        c.rollback()
    assert conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM queue_ext.job_status_history WHERE queue_name = %s", [queue]).fetchone()[0] == 0


def test_concurrent_producers(cluster, conn):
    queue = new_queue(conn)

    def producer(i):
        with cluster.connect() as c:
            return [c.execute("SELECT queue_ext.enqueue_job(%s, %s::jsonb)", [queue, f'{{"p": {i}}}']).fetchone()[0]
                    for _ in range(1000)]

    ids = [j for per in run_threads(8, producer) for j in per]
    assert len(set(ids)) == 8000
    assert conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0] == 8000


def test_one_hundred_concurrent_enqueues_with_one_dedupe_key_make_one_job(cluster, conn):
    queue = new_queue(conn)
    barrier = threading.Barrier(100)

    def producer(i):
        with cluster.connect() as c:
            barrier.wait()
            return c.execute("SELECT queue_ext.enqueue_job(%s, %s::jsonb, dedupe_key => 'order-42')",
                             [queue, f'{{"attempt": {i}}}']).fetchone()[0]

    ids = run_threads(100, producer)
    assert len(set(ids)) == 1
    assert conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0] == 1
    # Once finished, the key is free again.
    job = conn.execute("SELECT job_id FROM queue_ext.get_next_job(%s)", [queue]).fetchone()[0]
    conn.execute("SELECT queue_ext.complete_job(%s)", [job])
    again = conn.execute("SELECT queue_ext.enqueue_job(%s, '{}', dedupe_key => 'order-42')", [queue]).fetchone()[0]
    assert again != job


def test_fan_in_of_a_thousand_dependencies_completed_concurrently(cluster, conn):
    queue = new_queue(conn)
    parents = fill(conn, queue, 1000)
    child = conn.execute("SELECT queue_ext.enqueue_job(%s, '{\"fan\": \"in\"}', depends_on => %s)",
                         [queue, parents]).fetchone()[0]
    assert conn.execute("SELECT status::text FROM queue_ext.job_status(%s)", [child]).fetchone()[0] == "waiting"

    def worker(i):
        with cluster.connect() as c:
            while True:
                row = c.execute("SELECT job_id FROM queue_ext.get_next_job(%s)", [queue]).fetchone()
                if row is None or row[0] == child:
                    return
                c.execute("SELECT queue_ext.complete_job(%s)", [row[0]])

    run_threads(8, worker)
    status = conn.execute("SELECT status::text FROM queue_ext.job_status(%s)", [child]).fetchone()[0]
    assert status in ("queued", "running"), "released exactly when the last of 1,000 parents completed"
    assert conn.execute("SELECT count(*) FROM queue_ext.job_dependencies WHERE job_id = %s", [child]).fetchone()[0] == 0


def test_dependency_failure_cancels_dependents_transitively(cluster, conn):
    queue = new_queue(conn, max_attempts=1)
    a = conn.execute("SELECT queue_ext.enqueue_job(%s, '{}')", [queue]).fetchone()[0]
    b = conn.execute("SELECT queue_ext.enqueue_job(%s, '{}', depends_on => ARRAY[%s]::uuid[])", [queue, a]).fetchone()[0]
    c = conn.execute("SELECT queue_ext.enqueue_job(%s, '{}', depends_on => ARRAY[%s]::uuid[])", [queue, b]).fetchone()[0]
    job = conn.execute("SELECT job_id FROM queue_ext.get_next_job(%s)", [queue]).fetchone()[0]
    assert job == a, "dependents are not runnable"
    conn.execute("SELECT queue_ext.fail_job(%s, 'boom')", [a])
    rows = dict(conn.execute("SELECT id, last_error FROM queue_ext.job_archive WHERE id IN (%s, %s) AND status = 'cancelled'",
                             [b, c]).fetchall())
    assert rows[b] == f"dependency {a} is dead" and rows[c] == f"dependency {b} was cancelled"
    late = conn.execute("SELECT queue_ext.enqueue_job(%s, '{}', depends_on => ARRAY[%s]::uuid[])", [queue, a]).fetchone()[0]
    assert conn.execute("SELECT status::text FROM queue_ext.job_status(%s)", [late]).fetchone()[0] == "cancelled"


def test_state_changes_are_published_with_notify(cluster, conn):
    queue = new_queue(conn, notify_events=True)
    quiet = new_queue(conn)  # events are off unless asked for
    with cluster.connect() as listener:
        listener.execute("LISTEN queue_ext_events")
        job = conn.execute("SELECT queue_ext.enqueue_job(%s, '{}')", [queue]).fetchone()[0]
        conn.execute("SELECT queue_ext.enqueue_job(%s, '{}')", [quiet])
        claimed = conn.execute("SELECT job_id FROM queue_ext.get_next_job(%s)", [queue]).fetchone()[0]
        conn.execute("SELECT queue_ext.update_progress(%s, 40, '{\"step\": 2}')", [claimed])
        conn.execute("SELECT queue_ext.complete_job(%s)", [claimed])
        with cluster.connect() as rolled:
            rolled.autocommit = False
            rolled.execute("SELECT queue_ext.enqueue_job(%s, '{}')", [queue])
            rolled.rollback()
        import json
        events = []
        deadline = time.time() + 5
        for note in listener.notifies(timeout=2, stop_after=4):
            events.append(json.loads(note.payload))
            if time.time() > deadline:
                break
    assert [(e["status"], e.get("progress")) for e in events] == [
        ("queued", None), ("running", None), ("progress", 40), ("completed", None)], events
    assert all(e["id"] == str(job) and e["queue"] == queue for e in events)


def test_eight_workers_batch_claim_and_complete_jobs_exactly_once(cluster, conn):
    queue = new_queue(conn)
    ids = fill(conn, queue, 20_000)

    def worker(i):
        got = []
        with cluster.connect() as c:
            while True:
                rows = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, 100, %s)",
                                 [queue, f"w{i}"]).fetchall()
                if not rows:
                    return got
                states = c.execute("SELECT job_id, status::text FROM queue_ext.complete_jobs(%s::uuid[], %s::uuid[])",
                                   [[r[0] for r in rows], [r[1] for r in rows]]).fetchall()
                assert [s for _, s in states] == ["completed"] * len(rows)
                got += [j for j, _ in states]

    claimed = run_threads(8, worker)
    flat = [j for per in claimed for j in per]
    assert len(flat) == len(set(flat)) == 20_000, "no job completed twice"
    assert set(flat) == set(ids), "no job lost"
    assert conn.execute("SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = %s AND status = 'completed'",
                        [queue]).fetchone()[0] == 20_000


def test_queue_without_history_drains_exactly_once_and_keeps_nothing(cluster, conn):
    """keep_history => false: 8 workers, single and batch claims mixed, a job stays claimed by
    one worker only, and once done nothing of it remains (no archive, no history rows)."""
    queue = new_queue(conn, keep_history=False, notify_events=False)
    ids = fill(conn, queue, 10_000)

    def worker(i):
        got = []
        with cluster.connect() as c:
            while True:
                if i % 2:
                    rows = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, 50, %s)",
                                     [queue, f"w{i}"]).fetchall()
                    if not rows:
                        return got
                    states = c.execute("SELECT status::text FROM queue_ext.complete_jobs(%s::uuid[], %s::uuid[])",
                                       [[r[0] for r in rows], [r[1] for r in rows]]).fetchall()
                    assert [s for (s,) in states] == ["completed"] * len(rows)
                    got += [r[0] for r in rows]
                else:
                    row = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s, %s)",
                                    [queue, f"w{i}"]).fetchone()
                    if row is None:
                        return got
                    assert c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", row).fetchone()[0] == "completed"
                    got.append(row[0])

    flat = [j for per in run_threads(8, worker) for j in per]
    assert len(flat) == len(set(flat)) == 10_000, "no job completed twice"
    assert set(flat) == set(ids), "no job lost"
    left = conn.execute("""SELECT (SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %(q)s),
                                  (SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = %(q)s),
                                  (SELECT count(*) FROM queue_ext.job_status_history WHERE queue_name = %(q)s)""",
                        {"q": queue}).fetchone()
    assert left == (0, 0, 0)


def test_queue_without_history_still_publishes_queued_and_failures(cluster, conn):
    """Its routine rows are not written, so LISTENers get the enqueue (to wake up on) and the
    exceptional transitions, not running/completed."""
    queue = new_queue(conn, keep_history=False, max_attempts=1, notify_events=True)
    with cluster.connect() as listener:
        listener.execute("LISTEN queue_ext_events")
        one = conn.execute("SELECT queue_ext.enqueue_job(%s, '{}')", [queue]).fetchone()[0]
        batch = [r[0] for r in conn.execute("SELECT * FROM queue_ext.enqueue_jobs(%s, ARRAY['{}', '{}']::jsonb[])",
                                            [queue])]
        for _ in range(2):
            job, token = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s)", [queue]).fetchone()
            conn.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, token])
        job, token = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s)", [queue]).fetchone()
        conn.execute("SELECT queue_ext.fail_job(%s, 'boom', %s)", [job, token])
        import json
        events = [json.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=4)]
    assert [(e["id"], e["status"]) for e in events] == [
        (str(one), "queued"), (str(batch[0]), "queued"), (str(batch[1]), "queued"), (str(job), "dead")], events
