"""Claims while an old snapshot holds the xmin horizon back (src/claim_window.rs).

An idle-in-transaction session keeps vacuum from removing, and index scans from skipping,
the claim index's entries of every job claimed after its snapshot. Once the horizon has
stood still for queue_ext.claim_window_after (300 ms here), a claim starts from per-priority
floors found by a probe every 2 seconds. These tests hold a real snapshot open and check:
a windowed claim reads a handful of index entries where a claim from the start reads them
all; with concurrent workers, producers and every kind of job that can land below a floor
(run_at in the past, a producer transaction longer than the floor's margin, dependents
released, claims rolled back, other priorities), every job is claimed and completed exactly
once; expired leases are still returned; the windows end when the snapshot does."""
import contextlib
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from pgcluster import Cluster, wait_for

_names = itertools.count()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("claim_window", 25448, ["max_connections = 100", "queue_ext.claim_window_after = '300ms'"])
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
    name = f"cw{next(_names)}"
    conn.execute("SELECT queue_ext.create_queue(%s)", [name])
    return name


@contextlib.contextmanager
def held_horizon(cluster):
    """A session idle in a transaction that has a snapshot and an xid, as a forgotten
    BEGIN in some application would."""
    with cluster.connect() as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT txid_current()")
        yield
        holder.execute("ROLLBACK")


def windowed(c, queue) -> bool:
    """Whether this session's next claim on queue starts from floors."""
    return c.execute("SELECT queue_ext._claim_window(%s) IS NOT NULL", [queue]).fetchone()[0]


def wait_windowed(c, queue):
    # The horizon must stand still for 300 ms while transactions commit past it.
    def check():
        c.execute("SELECT txid_current()")
        return windowed(c, queue)
    wait_for(check, 10, 0.1, what="claims to use windows")


def enqueue(c, queue, n, **kw):
    named = "".join(f", {k} => %s" for k in kw)
    return [r[0] for r in c.execute(f"SELECT * FROM queue_ext.enqueue_jobs(%s, %s::jsonb[]{named})",
                                    [queue, ['{"n": 1}'] * n, *kw.values()])]


def drain(c, queue, batch=100):
    """Claims and completes in batches until the queue gives nothing; returns how many."""
    done = 0
    while True:
        with c.transaction():
            rows = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, %s)", [queue, batch]).fetchall()
            if rows:
                c.execute("SELECT queue_ext.complete_jobs(%s::uuid[], %s::uuid[])",
                          [[r[0] for r in rows], [r[1] for r in rows]])
        if not rows:
            return done
        done += len(rows)


def claim_index_entries_read(c, queue, claim="SELECT job_id FROM queue_ext.get_next_job(%s)") -> int:
    """Entries of job_queue_claim_idx that one claim reads (in a transaction that is rolled
    back, so the job stays queued)."""
    stat = "SELECT pg_stat_get_xact_tuples_returned('queue_ext.job_queue_claim_idx'::regclass)"
    with c.transaction():
        before = c.execute(stat).fetchone()[0]
        got = c.execute(claim, [queue]).fetchone()
        after = c.execute(stat).fetchone()[0]
        assert got and got[0] is not None, "a job was claimed"
        raise psycopg.Rollback()
    return after - before


@contextlib.contextmanager
def autovacuum_off(conn):
    """Autovacuum would end the windows at a moment of its choosing; here VACUUM does."""
    conn.execute("ALTER TABLE queue_ext.job_queue SET (autovacuum_enabled = off)")
    try:
        yield
    finally:
        conn.execute("ALTER TABLE queue_ext.job_queue RESET (autovacuum_enabled)")


def vacuum_ends_the_windows(conn, worker, queue):
    conn.execute("VACUUM queue_ext.job_queue")

    def from_the_start():
        worker.execute("SELECT txid_current()")
        return not windowed(worker, queue)
    wait_for(from_the_start, 5, 0.1, what="claims from the start again")


def test_a_windowed_claim_reads_a_window_where_a_claim_from_the_start_reads_every_claimed_job(cluster, conn):
    queue = new_queue(conn)
    with held_horizon(cluster):
        enqueue(conn, queue, 3000)
        assert drain(conn, queue) == 3000
        # The floors start 2 s before the probe: leave the 3,000 claimed jobs behind them.
        time.sleep(2.5)
        enqueue(conn, queue, 5)
        with cluster.connect() as windowed_worker, cluster.connect() as from_start:
            from_start.execute("SET queue_ext.claim_window_after = 0")
            wait_windowed(windowed_worker, queue)
            claim_index_entries_read(windowed_worker, queue)  # the probe, then floors for 2 s
            window = claim_index_entries_read(windowed_worker, queue)
            # An array of one queue name is that queue's claim, windows included.
            window_of_array = claim_index_entries_read(
                windowed_worker, queue, "SELECT job_id FROM queue_ext.get_next_jobs(ARRAY[%s], 2)")
            whole = claim_index_entries_read(from_start, queue)
            assert not windowed(from_start, queue)
    assert whole >= 3000, f"a claim from the start reads the entries of the claimed jobs ({whole})"
    assert window <= 10, f"a windowed claim reads only its window ({window})"
    assert window_of_array <= 10, f"get_next_jobs(ARRAY[queue]) reads only its window ({window_of_array})"
    assert drain(conn, queue) == 5


def test_every_job_is_claimed_once_under_a_held_horizon_including_those_below_the_floors(cluster, conn):
    queue = new_queue(conn)
    expected = set()
    lock = threading.Lock()
    stop = threading.Event()

    def add(ids):
        with lock:
            expected.update(ids)

    with held_horizon(cluster):
        enqueue(conn, queue, 2000)
        assert drain(conn, queue) == 2000  # entries a claim from the start would read
        # Dependents enqueued now run later, when their parent completes: below any floor.
        parent = conn.execute("SELECT queue_ext.enqueue_job(%s, '{}')", [queue]).fetchone()[0]
        children = [conn.execute("SELECT queue_ext.enqueue_job(%s, '{}', depends_on => ARRAY[%s]::uuid[])",
                                 [queue, parent]).fetchone()[0] for _ in range(5)]
        add([parent, *children])
        claims = {}

        def worker(i):
            mine = []
            with cluster.connect() as c:
                wait_windowed(c, queue)
                while not stop.is_set():
                    rows = c.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, %s, %s)",
                                     [queue, 1 if i % 2 else 10, f"w{i}"]).fetchall()
                    if not rows:
                        time.sleep(0.01)
                        continue
                    for job_id, token in rows:
                        c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job_id, token])
                        mine.append(job_id)
                claims[i] = (mine, windowed(c, queue))

        def producer():
            with cluster.connect() as c:
                for _ in range(150):
                    add(enqueue(c, queue, 10))
                    time.sleep(0.01)

        def stragglers():
            with cluster.connect() as c:
                time.sleep(0.5)
                # run_at an hour ago, at every priority.
                an_hour_ago = c.execute("SELECT now() - interval '1 hour'").fetchone()[0]
                for priority in ("critical", "high", "normal", "low"):
                    add(enqueue(c, queue, 5, priority=priority))
                    add(enqueue(c, queue, 5, priority=priority, run_at=an_hour_ago))
                # A producer transaction longer than the floors' 2-second margin.
                with c.transaction():
                    add(enqueue(c, queue, 5))
                    time.sleep(3)
                # Claims rolled back: their jobs go back where they were.
                with c.transaction():
                    c.execute("SELECT * FROM queue_ext.get_next_jobs(%s, 10)", [queue]).fetchall()
                    time.sleep(1)
                    raise psycopg.Rollback()

        with ThreadPoolExecutor(8) as pool:
            workers = [pool.submit(worker, i) for i in range(6)]
            helpers = [pool.submit(producer), pool.submit(stragglers)]
            for f in helpers:
                f.result()
            total = len(expected)
            finished = "SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = %s"
            wait_for(lambda: conn.execute(finished, [queue]).fetchone()[0] >= total + 2000, 60,
                     0.2, what=f"all {total} jobs completed")
            stop.set()
            for f in workers:
                f.result()

    flat = [j for mine, _ in claims.values() for j in mine]
    assert len(flat) == len(set(flat)), "no job claimed twice"
    assert set(flat) == expected, "every job claimed, none lost"
    assert all(w for _, w in claims.values()), "every worker claimed from floors"
    assert conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [queue]).fetchone()[0] == 0
    assert conn.execute("""SELECT count(*), count(DISTINCT job_id) FROM queue_ext.job_status_history
                           WHERE queue_name = %s AND to_status = 'running' AND job_id = ANY (%s)""",
                        [queue, list(expected)]).fetchone() == (len(expected), len(expected)), "one claim each"


def test_expired_leases_are_returned_while_claims_use_windows(cluster, conn):
    queue = new_queue(conn)
    with held_horizon(cluster):
        job = enqueue(conn, queue, 1)[0]
        with cluster.connect() as dying, cluster.connect() as worker:
            wait_windowed(worker, queue)
            dying.execute("SELECT * FROM queue_ext.get_next_job(%s, 'dying', interval '1 second')", [queue]).fetchall()

            def reclaimed():
                row = worker.execute("SELECT job_id, attempt FROM queue_ext.get_next_job(%s, 'alive')", [queue]).fetchone()
                return row if row and row[0] is not None else None
            assert wait_for(reclaimed, 10, 0.1, what="the expired lease returned") == (job, 2)
            assert windowed(worker, queue)


def test_the_windows_stay_until_vacuum_has_removed_what_the_snapshot_kept(cluster, conn):
    queue = new_queue(conn)
    with autovacuum_off(conn):
        with cluster.connect() as worker:
            with held_horizon(cluster):
                enqueue(conn, queue, 6000)
                assert drain(conn, queue) == 6000  # 12,000 dead rows: an update and a delete each
                # Report them now rather than at the idle session's next statistics flush.
                conn.execute("SELECT pg_stat_force_next_flush()")
                conn.execute("SELECT 1")
                wait_windowed(worker, queue)

            def horizon_moved():
                return conn.execute("SELECT txid_current() - (SELECT min(backend_xmin::text::bigint) FROM pg_stat_activity)"
                                    ).fetchone()[0] < 1000
            wait_for(horizon_moved, 5, 0.1, what="the horizon to move")
            time.sleep(0.6)
            worker.execute("SELECT txid_current()")
            assert windowed(worker, queue), "a claim from the start would still step over every dead entry"
            vacuum_ends_the_windows(conn, worker, queue)


def test_a_busy_queue_claims_from_windows_between_vacuums(cluster, conn):
    """No snapshot held: once job_queue has more than 10,000 dead rows (the jobs claimed and
    completed since the last vacuum), claims use windows all the same, since each claim from
    the start would step over an index entry per claimed job. Every job is still claimed once,
    one made runnable below the floors included, and VACUUM ends the windows."""
    queue = new_queue(conn)

    def flush_stats(c):
        c.execute("SELECT pg_stat_force_next_flush()")
        c.execute("SELECT 1")

    with autovacuum_off(conn):
        with cluster.connect() as worker:
            conn.execute("VACUUM queue_ext.job_queue")
            enqueue(conn, queue, 500)
            assert drain(worker, queue) == 500
            flush_stats(worker)
            time.sleep(0.3)  # the next look at the horizon and the dead rows
            assert not windowed(worker, queue), "1,000 dead rows: claims from the start"
            enqueue(conn, queue, 6000)
            assert drain(worker, queue) == 6000  # 13,000 dead rows: an update and a delete each
            flush_stats(worker)
            wait_for(lambda: windowed(worker, queue), 5, 0.1, what="claims to use windows")
            ids = set(enqueue(conn, queue, 200))
            # Below every floor: found by the next probe, within 2 seconds.
            long_ago = conn.execute("SELECT timestamptz '2000-01-01 00:00:00+00'").fetchone()[0]
            ids |= set(enqueue(conn, queue, 3, run_at=long_ago))
            done = []
            deadline = time.monotonic() + 10
            while len(done) < len(ids) and time.monotonic() < deadline:
                with worker.transaction():
                    rows = worker.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, 50)",
                                          [queue]).fetchall()
                    if rows:
                        worker.execute("SELECT queue_ext.complete_jobs(%s::uuid[], %s::uuid[])",
                                       [[r[0] for r in rows], [r[1] for r in rows]])
                done += [r[0] for r in rows]
                if not rows:
                    time.sleep(0.2)
            assert sorted(map(str, done)) == sorted(map(str, ids)), "every job claimed exactly once"
            vacuum_ends_the_windows(conn, worker, queue)
