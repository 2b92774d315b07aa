"""Per-key limits under real concurrency: a rate limit holds across eight workers, a
concurrency limit of one is a strict FIFO group, other keys are not held up."""
import itertools
import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

from pgcluster import Cluster

_names = itertools.count()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("limits", 25446, ["max_connections = 100"])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    yield c
    c.stop()


@pytest.fixture
def conn(cluster):
    with cluster.connect() as c:
        yield c


def new_queue(conn):
    name = f"lq{next(_names)}"
    conn.execute("SELECT queue_ext.create_queue(%s, backoff_base => '0')", [name])
    return name


def run_threads(n, target):
    with ThreadPoolExecutor(n) as pool:
        return [f.result() for f in [pool.submit(target, i) for i in range(n)]]


def test_rate_limit_of_50_per_second_holds_across_eight_workers(cluster, conn):
    queue = new_queue(conn)
    conn.execute("SELECT queue_ext.set_rate_limit('partner-api', 50, '1 second')")
    conn.execute("SELECT queue_ext.enqueue_jobs(%s, array_fill('{}'::jsonb, ARRAY[2000]), rate_limit_key => 'partner-api')",
                 [queue])
    # Unlimited work in the same queue must not wait behind the limited key.
    conn.execute("SELECT queue_ext.enqueue_jobs(%s, array_fill('{\"free\": true}'::jsonb, ARRAY[500]))", [queue])
    stop_at = time.monotonic() + 5.0

    def worker(i):
        limited, free = 0, 0
        with cluster.connect() as c:
            while time.monotonic() < stop_at:
                rows = c.execute("SELECT job_id, lease_token, payload ? 'free' FROM queue_ext.get_next_jobs(%s, %s, %s)",
                                 [queue, 1 if i % 2 else 5, f"w{i}"]).fetchall()
                if not rows:
                    time.sleep(0.002)
                    continue
                for job_id, token, is_free in rows:
                    c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job_id, token])
                    free += is_free
                    limited += not is_free
        return limited, free

    counts = run_threads(8, worker)
    limited = sum(c[0] for c in counts)
    assert sum(c[1] for c in counts) == 500, "unlimited jobs were all done within the 5 s"
    # 50/s for 5 s is 250 (claims still running when the 5 s end may take one more token).
    assert limited >= 225, f"{limited} rate-limited jobs claimed in 5 s, want about 250"
    starts = [r[0] for r in conn.execute(
        """SELECT extract(epoch FROM started_at)::float8 FROM queue_ext.job_archive
           WHERE queue_name = %s AND rate_limit_key = 'partner-api' ORDER BY started_at""", [queue])]
    assert len(starts) == limited
    # The bucket holds one token and refills at 50/s: over the span of the claims, by the
    # server's clock, at most one more than 50 a second (one more again for a claim whose
    # transaction began just before the token it took).
    span = starts[-1] - starts[0]
    assert limited <= 50 * span + 2, f"{limited} rate-limited jobs claimed within {span:.2f} s"
    # Sliding check: no one-second window holds more than the limit plus the one-token burst.
    worst = max(sum(1 for t in starts[i:] if t < s + 1.0) for i, s in enumerate(starts))
    print(f"rate limit 50/s, 8 workers, 5 s: {limited} claimed; busiest 1 s window {worst}")
    assert worst <= 51, f"{worst} starts within one second"
    assert sum(1 for c in counts if c[0] > 0) >= 4, "the limited jobs were spread over the workers"


def test_concurrency_limit_of_one_runs_a_key_one_at_a_time_in_enqueue_order(cluster, conn):
    queue = new_queue(conn)
    keys = ["customer:1", "customer:2", "customer:3"]
    for k in keys:
        conn.execute("SELECT queue_ext.set_concurrency_limit(%s, 1)", [k])
    # One producer, the keys interleaved; every tenth job fails once and must retry before
    # the next job of its key starts.
    for n in range(300):
        conn.execute("SELECT queue_ext.enqueue_job(%s, jsonb_build_object('n', %s::int, 'key', %s::text), "
                     "concurrency_key => %s)", [queue, n, keys[n % 3], keys[n % 3]])
    running = defaultdict(int)
    overlaps = []
    order = defaultdict(list)
    guard = threading.Lock()

    def worker(i):
        rng = random.Random(i)
        with cluster.connect() as c:
            idle_since = None
            while True:
                row = c.execute("SELECT job_id, lease_token, payload, attempt FROM queue_ext.get_next_job(%s, %s)",
                                [queue, f"w{i}"]).fetchone()
                if row is None:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 1.0:
                        return
                    time.sleep(0.002)
                    continue
                idle_since = None
                job_id, token, payload, attempt = row
                key = payload["key"]
                with guard:
                    running[key] += 1
                    if running[key] > 1:
                        overlaps.append((key, payload["n"]))
                    order[key].append(payload["n"])
                time.sleep(rng.random() * 0.002)
                with guard:
                    running[key] -= 1
                if payload["n"] % 10 == 3 and attempt == 1:
                    c.execute("SELECT queue_ext.fail_job(%s, 'transient', %s, retry_in => '0')", [job_id, token])
                else:
                    c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job_id, token])

    run_threads(8, worker)
    assert overlaps == [], "two jobs of one key ran at once"
    for k, key in enumerate(keys):
        expected = []
        for n in range(k, 300, 3):
            expected += [n, n] if n % 10 == 3 else [n]  # a failed job runs again, first
        assert order[key] == expected, f"{key} ran out of order"
    # The server's own record agrees: each start of a key after the previous finish.
    bad = conn.execute("""
        WITH runs AS (
            SELECT a.concurrency_key AS key, h.job_id, h.attempt, h.at AS started,
                   (SELECT min(e.at) FROM queue_ext.job_status_history AS e
                    WHERE e.job_id = h.job_id AND e.attempt = h.attempt AND e.from_status = 'running') AS ended
            FROM queue_ext.job_status_history AS h JOIN queue_ext.job_archive AS a ON a.id = h.job_id
            WHERE h.queue_name = %s AND h.to_status = 'running')
        SELECT count(*) FROM runs AS r1 JOIN runs AS r2
          ON r1.key = r2.key AND (r1.job_id, r1.attempt) < (r2.job_id, r2.attempt)
         AND r1.started < r2.ended AND r2.started < r1.ended""", [queue]).fetchone()[0]
    assert bad == 0
    active = conn.execute("SELECT sum(active) FROM queue_ext.concurrency_limits WHERE key LIKE 'customer:%'").fetchone()[0]
    assert active == 0, "every slot was given back"


def test_concurrency_limit_of_three_caps_running_jobs_across_workers(cluster, conn):
    queue = new_queue(conn)
    conn.execute("SELECT queue_ext.set_concurrency_limit('tenant:big', 3)")
    # Producers enqueue concurrently while workers drain.
    def producer(i):
        with cluster.connect() as c:
            for n in range(50):
                c.execute("SELECT queue_ext.enqueue_job(%s, '{}', concurrency_key => 'tenant:big')", [queue])

    running, peak, done = [0], [0], [0]
    guard = threading.Lock()
    stop = threading.Event()

    def worker(i):
        with cluster.connect() as c:
            while not stop.is_set():
                row = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s)", [queue]).fetchone()
                if row is None:
                    time.sleep(0.002)
                    continue
                with guard:
                    running[0] += 1
                    peak[0] = max(peak[0], running[0])
                time.sleep(0.003)
                with guard:
                    running[0] -= 1
                    done[0] += 1
                c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [row[0], row[1]])

    with ThreadPoolExecutor(12) as pool:
        workers = [pool.submit(worker, i) for i in range(8)]
        for f in [pool.submit(producer, i) for i in range(4)]:
            f.result()
        deadline = time.monotonic() + 60
        while done[0] < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for f in workers:
            f.result()
    assert done[0] == 200, "every job ran"
    assert peak[0] == 3, f"peak {peak[0]} running jobs of the key, limit 3"
    assert conn.execute("SELECT active FROM queue_ext.concurrency_limits WHERE key = 'tenant:big'").fetchone()[0] == 0


def test_retrying_and_dead_jobs_keep_and_free_their_slot(cluster, conn):
    queue = new_queue(conn)
    conn.execute("SELECT queue_ext.set_concurrency_limit('k-dead', 1)")
    first = conn.execute("SELECT queue_ext.enqueue_job(%s, '{\"n\": 1}', max_attempts => 2, concurrency_key => 'k-dead')",
                         [queue]).fetchone()[0]
    second = conn.execute("SELECT queue_ext.enqueue_job(%s, '{\"n\": 2}', concurrency_key => 'k-dead')",
                          [queue]).fetchone()[0]
    status = lambda j: conn.execute("SELECT status::text FROM queue_ext.job_status(%s)", [j]).fetchone()[0]
    for attempt in (1, 2):
        job, token = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s)", [queue]).fetchone()
        assert job == first
        conn.execute("SELECT queue_ext.fail_job(%s, 'boom', %s, retry_in => '0')", [job, token])
        if attempt == 1:
            assert status(first) == "retrying" and status(second) == "waiting", "a retrying job keeps its slot"
    assert status(first) == "dead"
    assert status(second) == "queued", "the dead job gave its slot to the next"
