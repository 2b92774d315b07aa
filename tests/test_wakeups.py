"""Wake-ups for SQL workers: `LISTEN queue_ext_jobs` hears the queue's name once jobs it can
claim have committed. With a dispatcher the announcement comes from the dispatcher after the
commit (producers send no NOTIFY of their own, so they never queue on NOTIFY's commit lock);
without one, from the producing transaction itself. Either way: nothing before the commit,
nothing for a rollback, and no committed job left without a wake-up."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from pgcluster import Cluster, dispatcher_pid, wait_for


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("wakeups", 25449, ["max_connections = 100", "max_prepared_transactions = 4"])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
        wait_for(lambda: dispatcher_pid(conn) is not None, 20, what="the dispatcher")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def bare_cluster():
    # Not preloaded: no dispatcher, so every producing transaction announces its own jobs.
    c = Cluster("wakeups_bare", 25451, [], unset=("shared_preload_libraries",))
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    yield c
    c.stop()


def heard(listener, timeout):
    """Notifications on queue_ext_jobs within timeout seconds, as (payload, sender pid)."""
    got = []
    for n in listener.notifies(timeout=timeout, stop_after=None):
        got.append((n.payload, n.pid))
    return got


def listen(cluster):
    c = cluster.connect()
    c.execute("LISTEN queue_ext_jobs")
    return c


def test_announced_by_the_dispatcher_after_commit_not_before(cluster):
    with cluster.connect() as conn, listen(cluster) as listener:
        conn.execute("SELECT queue_ext.create_queue('wk_a')")
        conn.execute("SELECT queue_ext.create_queue('wk_b')")
        heard(listener, 0.5)  # whatever the dispatcher's start-up announced
        producer_pid = conn.info.backend_pid
        conn.autocommit = False
        conn.execute("SELECT queue_ext.enqueue_job('wk_a', '{}')")
        conn.execute("SELECT queue_ext.enqueue_jobs('wk_a', array_fill('{}'::jsonb, ARRAY[50]))")
        assert heard(listener, 0.5) == [], "announced before the commit"
        conn.commit()
        got = heard(listener, 2)
        assert [p for p, _ in got] == ["wk_a"], got
        assert got[0][1] == dispatcher_pid(conn), "the dispatcher announces, not the producer"
        assert got[0][1] != producer_pid

        conn.execute("SELECT queue_ext.enqueue_job('wk_b', '{}')")
        conn.rollback()
        assert heard(listener, 1) == [], "a rolled-back enqueue announced something"

        # Delayed jobs are not claimable yet: no wake-up for them.
        conn.execute("SELECT queue_ext.enqueue_job('wk_b', '{}', delay => '1 hour')")
        conn.commit()
        assert heard(listener, 1) == []


def test_producers_and_workers_send_no_notify_of_their_own(cluster):
    # Postgres refuses to PREPARE a transaction that sent NOTIFY (0A000), so a prepared
    # enqueue + claim + complete proves none of them did.
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue('wk_c')")
        conn.autocommit = False
        conn.execute("SELECT queue_ext.enqueue_job('wk_c', '{}')")
        conn.execute("SELECT queue_ext.enqueue_jobs('wk_c', array_fill('{}'::jsonb, ARRAY[3]))")
        job, token = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('wk_c')").fetchone()
        conn.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, token])
        conn.execute("PREPARE TRANSACTION 'wk_probe'")
        conn.autocommit = True
        conn.execute("ROLLBACK PREPARED 'wk_probe'")
        # The probe can fail: an opted-in queue's events are sent by the transaction.
        conn.execute("SELECT queue_ext.create_queue('wk_c_loud', notify_events => true)")
        conn.autocommit = False
        conn.execute("SELECT queue_ext.enqueue_job('wk_c_loud', '{}')")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute("PREPARE TRANSACTION 'wk_probe2'")
        conn.rollback()


def test_without_a_dispatcher_the_transaction_announces_itself(bare_cluster):
    with bare_cluster.connect() as conn, listen(bare_cluster) as listener:
        conn.execute("SELECT queue_ext.create_queue('wk_bare')")
        producer_pid = conn.info.backend_pid
        conn.autocommit = False
        conn.execute("SELECT queue_ext.enqueue_job('wk_bare', '{}')")
        conn.execute("SELECT queue_ext.enqueue_job('wk_bare', '{}')")
        assert heard(listener, 0.3) == []
        conn.commit()
        got = heard(listener, 2)
        # Postgres folds identical notifications of one transaction into one.
        assert got == [("wk_bare", producer_pid)], got
        conn.execute("SELECT queue_ext.enqueue_job('wk_bare', '{}')")
        conn.rollback()
        assert heard(listener, 0.5) == []


def test_no_committed_job_is_left_without_a_wake_up(cluster):
    """16 producers commit into 4 queues while 4 workers claim only when woken (no polling):
    a lost announcement would leave jobs behind and a worker waiting past its timeout."""
    queues = [f"wk_many{i}" for i in range(4)]
    per_producer = 60
    with cluster.connect() as conn:
        for q in queues:
            conn.execute("SELECT queue_ext.create_queue(%s)", [q])
    done = threading.Event()
    claimed = {q: 0 for q in queues}
    errors = []

    def worker(queue):
        try:
            with listen(cluster) as listener, cluster.connect() as c:
                expected = 16 * per_producer // len(queues)
                while claimed[queue] < expected:
                    woken = [p for p, _ in heard_one(listener, 10)]
                    if not woken:
                        errors.append(f"{queue}: no wake-up for 10 s with {claimed[queue]}/{expected} claimed")
                        return
                    if queue not in woken:
                        continue
                    while True:  # drain what the wake-up announced
                        rows = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, 50)",
                                         [queue]).fetchall()
                        if not rows:
                            break
                        c.execute("SELECT queue_ext.complete_jobs(%s::uuid[], %s::uuid[])",
                                  [[r[0] for r in rows], [r[1] for r in rows]])
                        claimed[queue] += len(rows)
        except Exception as e:  # surfaced below
            errors.append(f"{queue}: {e!r}")

    def producer(i):
        with cluster.connect() as c:
            for n in range(per_producer):
                c.execute("SELECT queue_ext.enqueue_job(%s, %s)", [queues[(i + n) % len(queues)], f'{{"n": {n}}}'])

    workers = [threading.Thread(target=worker, args=(q,)) for q in queues]
    for w in workers:
        w.start()
    time.sleep(0.5)  # all listening
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(producer, range(16)))
    for w in workers:
        w.join(60)
    done.set()
    assert not errors, errors
    assert sum(claimed.values()) == 16 * per_producer
    with cluster.connect() as conn:
        left = conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name LIKE 'wk\\_many%'").fetchone()[0]
    assert left == 0


def heard_one(listener, timeout):
    """The first notification within timeout seconds, plus any that came with it."""
    got = []
    for n in listener.notifies(timeout=timeout, stop_after=1):
        got.append((n.payload, n.pid))
    for n in listener.notifies(timeout=0.001):
        got.append((n.payload, n.pid))
    return got


def test_status_events_stay_opt_in_and_in_the_transaction(cluster):
    """queue_ext_events is for subscribers who asked (notify_events => true): a default queue
    publishes nothing there; an opted-in one publishes every change, from the transaction."""
    with cluster.connect() as conn, cluster.connect() as listener:
        listener.execute("LISTEN queue_ext_events")
        conn.execute("SELECT queue_ext.create_queue('wk_quiet')")
        conn.execute("SELECT queue_ext.create_queue('wk_loud', notify_events => true)")
        conn.execute("SELECT queue_ext.enqueue_job('wk_quiet', '{}')")
        job = conn.execute("SELECT queue_ext.enqueue_job('wk_loud', '{}')").fetchone()[0]
        got = [(n.payload, n.pid) for n in listener.notifies(timeout=1)]
        assert len(got) == 1 and str(job) in got[0][0] and got[0][1] == conn.info.backend_pid, got
