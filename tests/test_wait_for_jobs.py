"""CALL queue_ext.wait_for_jobs: an idle worker waits in its own connection until a commit
makes jobs of its queues runnable. Woken by the commit, not before it and not by a rollback;
at once when jobs are already there; never holding a snapshot or a transaction id while it
waits; each job claimed once by many waiters; refused inside a transaction block."""
import os
import shutil
import subprocess
import threading
import time

import psycopg
import pytest

from pgcluster import Cluster, wait_for

WAIT = "CALL queue_ext.wait_for_jobs(%s, %s)"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("waitjobs", 25454, ["max_connections = 100"])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
        for q in ("wj_a", "wj_b", "wj_many", "wj_paused"):
            conn.execute("SELECT queue_ext.create_queue(%s)", [q])
        conn.execute("SELECT queue_ext.pause_queue('wj_paused')")
    yield c
    c.stop()


def bucket(name):
    """The announcement bucket of a queue name (wakeup.rs: 64-bit FNV-1a modulo 256)."""
    h = 0xCBF29CE484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % 256


class Waiter(threading.Thread):
    """One CALL wait_for_jobs on its own connection; result and duration when it returns."""

    def __init__(self, cluster, queues, timeout):
        super().__init__(daemon=True)
        self.conn = cluster.connect()
        self.pid = self.conn.info.backend_pid
        self.args = (queues, timeout)
        self.woken = self.error = None
        self.ended = None

    def run(self):
        try:
            self.woken = self.conn.execute(WAIT, self.args).fetchone()[0]
        except psycopg.Error as e:
            self.error = e
        self.ended = time.time()


def waiting(conn, pid):
    row = conn.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return row is not None and row[0] == "Extension"


def drain(conn, queue):
    conn.execute("SELECT count(*) FROM queue_ext.get_next_jobs(%s, 10000)", [queue])


def test_woken_by_the_commit_not_before_it_and_not_by_a_rollback(cluster):
    with cluster.connect() as admin, cluster.connect() as producer:
        drain(admin, "wj_a")
        w = Waiter(cluster, ["wj_a"], "20 seconds")
        w.start()
        wait_for(lambda: waiting(admin, w.pid), 10, what="the waiter to sleep")
        # It holds no snapshot and no transaction id while it waits.
        xmin, xid = admin.execute("SELECT backend_xmin, backend_xid FROM pg_stat_activity WHERE pid = %s",
                                  [w.pid]).fetchone()
        assert (xmin, xid) == (None, None)
        producer.autocommit = False
        producer.execute("SELECT queue_ext.enqueue_job('wj_a', '{}')")
        time.sleep(0.5)
        assert w.is_alive(), "woken before the commit"
        producer.rollback()
        time.sleep(0.5)
        assert w.is_alive(), "woken by a rollback"
        producer.execute("SELECT queue_ext.enqueue_job('wj_a', '{}')")
        committed = time.time()
        producer.commit()
        w.join(10)
        assert w.error is None and w.woken is True
        assert w.ended - committed < 2.0
        w.conn.close()


def test_at_once_when_jobs_wait_and_false_at_the_timeout(cluster):
    with cluster.connect() as conn:
        drain(conn, "wj_b")
        conn.execute("SELECT queue_ext.enqueue_job('wj_b', '{}')")
        t = time.time()
        assert conn.execute(WAIT, [["wj_b"], "10 seconds"]).fetchone()[0] is True
        assert time.time() - t < 2.0
        drain(conn, "wj_b")
        t = time.time()
        assert conn.execute(WAIT, [["wj_b"], "300 milliseconds"]).fetchone()[0] is False
        assert time.time() - t >= 0.3
        # The connection is usable afterwards, in and out of transactions.
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_other_queues_and_paused_queues_do_not_end_it(cluster):
    other = next(f"wj_other{i}" for i in range(100) if bucket(f"wj_other{i}") != bucket("wj_b"))
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue(%s)", [other])
        drain(conn, "wj_b")
        # A job in a paused queue is not runnable: it does not end the wait.
        conn.execute("SELECT queue_ext.enqueue_job('wj_paused', '{}')")
        w = Waiter(cluster, ["wj_b", "wj_paused"], "2 seconds")
        w.start()
        wait_for(lambda: waiting(conn, w.pid), 10, what="the waiter to sleep")
        # A commit for a queue it does not wait for (in another bucket) does not wake it.
        conn.execute("SELECT queue_ext.enqueue_job(%s, '{}')", [other])
        w.join(10)
        assert w.error is None and w.woken is False
        w.conn.close()


def test_many_waiters_claim_every_job_once(cluster):
    jobs, workers = 400, 8
    claimed, lock, stop = [], threading.Lock(), threading.Event()

    def worker():
        with cluster.connect() as c:
            while not stop.is_set():
                rows = c.execute("SELECT job_id FROM queue_ext.get_next_jobs('wj_many', 5)").fetchall()
                if rows:
                    c.execute("SELECT queue_ext.complete_jobs(%s::uuid[])", [[r[0] for r in rows]])
                    with lock:
                        claimed.extend(r[0] for r in rows)
                else:
                    c.execute(WAIT, [["wj_many"], "1 second"])

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    with cluster.connect() as producer:
        for _ in range(40):
            producer.execute("SELECT count(*) FROM queue_ext.enqueue_jobs('wj_many', array_fill('{}'::jsonb, ARRAY[10]))")
            time.sleep(0.02)
        wait_for(lambda: len(claimed) >= jobs, 30, what="every job claimed")
    stop.set()
    for t in threads:
        t.join(10)
    assert len(claimed) == jobs and len(set(claimed)) == jobs


def test_refused_inside_a_transaction_block_and_for_a_bad_timeout(cluster):
    with cluster.connect() as conn:
        with pytest.raises(psycopg.errors.ActiveSqlTransaction):
            with conn.transaction():
                conn.execute(WAIT, [["wj_b"], "1 second"])
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute(WAIT, [["wj_b"], "2 hours"])
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute(WAIT, [["wj_b"], "-1 second"])


def test_a_cancelled_wait_leaves_the_connection_and_the_table_usable(cluster):
    with cluster.connect() as admin:
        drain(admin, "wj_a")
        for _ in range(5):
            w = Waiter(cluster, ["wj_a"], "20 seconds")
            w.start()
            wait_for(lambda: waiting(admin, w.pid), 10, what="the waiter to sleep")
            admin.execute("SELECT pg_cancel_backend(%s)", [w.pid])
            w.join(10)
            assert isinstance(w.error, psycopg.errors.QueryCanceled)
            w.conn.close()
        w = Waiter(cluster, ["wj_a"], "20 seconds")
        w.start()
        wait_for(lambda: waiting(admin, w.pid), 10, what="the waiter to sleep")
        admin.execute("SELECT queue_ext.enqueue_job('wj_a', '{}')")
        w.join(10)
        assert w.woken is True
        w.conn.close()


def test_terminated_waiters_leave_the_server_and_the_other_waiters_as_they_were(cluster):
    # pg_terminate_backend ends a waiter with FATAL, which exits the process without unwinding
    # the procedure: no crash and no restart of the server, and waiters that come after (more
    # terminated over the rounds than the 256 shared entries, whose dead holders' entries are
    # taken again) wake for the next job, which one of them claims.
    with cluster.connect() as admin:
        drain(admin, "wj_a")
        started = admin.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        for _ in range(9):
            ws = [Waiter(cluster, ["wj_a"], "60 seconds") for _ in range(30)]
            for w in ws:
                w.start()
            wait_for(lambda: all(waiting(admin, w.pid) for w in ws), 20, what="30 waiters asleep")
            admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
                          [[w.pid for w in ws]])
            for w in ws:
                w.join(10)
                assert isinstance(w.error, psycopg.errors.AdminShutdown), w.error
                w.conn.close()
        assert admin.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == started
        survivors = [Waiter(cluster, ["wj_a"], "60 seconds") for _ in range(4)]
        for w in survivors:
            w.start()
        wait_for(lambda: all(waiting(admin, w.pid) for w in survivors), 10, what="the next waiters asleep")
        admin.execute("SELECT queue_ext.enqueue_job('wj_a', '{}')")
        for w in survivors:
            w.join(10)
            assert w.woken is True and w.error is None
            w.conn.close()
        assert admin.execute("SELECT count(*) FROM queue_ext.get_next_jobs('wj_a', 10)").fetchone()[0] == 1
    assert "terminated by signal" not in cluster.log_tail(400)


def test_only_workers_may_wait(cluster):
    with cluster.connect() as admin:
        admin.execute("DROP ROLE IF EXISTS wj_producer")
        admin.execute("CREATE ROLE wj_producer LOGIN IN ROLE queue_ext_producer")
        admin.execute("DROP ROLE IF EXISTS wj_worker")
        admin.execute("CREATE ROLE wj_worker LOGIN IN ROLE queue_ext_worker")
    with cluster.connect(user="wj_producer") as p:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            p.execute(WAIT, [["wj_b"], "100 milliseconds"])
    with cluster.connect(user="wj_worker") as w:
        assert w.execute(WAIT, [["wj_b"], "100 milliseconds"]).fetchone()[0] in (True, False)


def test_without_preloading_it_polls(tmp_path):
    # Not preloaded: no shared memory to register in, so the wait looks every 50 ms.
    c = Cluster("waitjobs_bare", 25455, [], unset=("shared_preload_libraries",))
    c.start(fresh=True)
    try:
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION queue_ext")
            conn.execute("SELECT queue_ext.create_queue('wj_bare')")
            w = Waiter(c, ["wj_bare"], "20 seconds")
            w.start()
            wait_for(lambda: waiting(conn, w.pid), 10, what="the waiter to sleep")
            conn.execute("SELECT queue_ext.enqueue_job('wj_bare', '{}')")
            committed = time.time()
            w.join(10)
            assert w.error is None and w.woken is True and w.ended - committed < 2.0
            w.conn.close()
    finally:
        c.stop()


PGBOUNCER = "/usr/sbin/pgbouncer"


@pytest.mark.skipif(not os.path.exists(PGBOUNCER), reason="pgbouncer is not installed (scripts/setup.sh installs it)")
def test_through_pgbouncer_in_transaction_mode(cluster):
    # A worker connected through a pooler that hands server connections out per transaction:
    # LISTEN cannot work there, the wait does (the server connection is the worker's for the
    # CALL, and back in the pool when it returns).
    port = 25456
    tmp_path = cluster.dir.parent / (cluster.dir.name + "_pgbouncer")  # readable by postgres
    shutil.rmtree(tmp_path, ignore_errors=True)
    tmp_path.mkdir()
    ini = tmp_path / "pgbouncer.ini"
    ini.write_text(f"""[databases]
* = host=127.0.0.1 port={cluster.port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {tmp_path / "users.txt"}
pool_mode = transaction
default_pool_size = 2
logfile = {tmp_path / "pgbouncer.log"}
""")
    (tmp_path / "users.txt").write_text('"postgres" ""\n')
    shutil.chown(tmp_path, "postgres")
    for f in tmp_path.iterdir():
        shutil.chown(f, "postgres")
    bouncer = subprocess.Popen(["sudo", "-u", "postgres", PGBOUNCER, str(ini)])
    try:
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        wait_for(lambda: _connects(dsn), 10, what="pgbouncer")
        with cluster.connect() as conn:
            conn.execute("SELECT queue_ext.create_queue('wj_pooled')")
        # Prepared statements do not survive transaction pooling: plain queries.
        with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as worker, cluster.connect() as admin:
            done = {}

            def wait():
                t = time.time()
                done["woken"] = worker.execute("CALL queue_ext.wait_for_jobs(ARRAY['wj_pooled'], '20 seconds')").fetchone()[0]
                done["took"] = time.time() - t

            th = threading.Thread(target=wait, daemon=True)
            th.start()
            wait_for(lambda: admin.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'Extension' "
                                       "AND backend_type = 'client backend'")
                     .fetchone()[0] == 1, 10, what="the pooled waiter to sleep")
            time.sleep(0.3)
            admin.execute("SELECT queue_ext.enqueue_job('wj_pooled', '{}')")
            th.join(10)
            assert done.get("woken") is True and done["took"] < 10
            row = worker.execute("SELECT job_id FROM queue_ext.get_next_job('wj_pooled', 'pooled')").fetchone()
            assert row is not None
    finally:
        bouncer.terminate()
        bouncer.wait(10)


def _connects(dsn):
    try:
        with psycopg.connect(dsn, connect_timeout=2) as c:
            c.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def test_hostile_arguments_get_answers_not_crashes(cluster):
    with cluster.connect() as conn:
        drain(conn, "wj_b")
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute(WAIT, [["wj_b"], None])
        for queues in ([], [None], [None, "wj_b"], ["no_such_queue"], ["x" * 1_000_000],
                       [f"q{i}" for i in range(10_000)]):
            assert conn.execute(WAIT, [queues, "50 milliseconds"]).fetchone()[0] is False
        conn.execute("SELECT queue_ext.enqueue_job('wj_b', '{}')")
        assert conn.execute("CALL queue_ext.wait_for_jobs(NULL, '5 seconds')").fetchone()[0] is True
        assert conn.execute(WAIT, [["wj_b", None], "5 seconds"]).fetchone()[0] is True
        drain(conn, "wj_b")
        assert conn.execute("SELECT 1").fetchone()[0] == 1


NEXT = "CALL queue_ext.wait_for_next_job(%s, %s, 'w1')"
NEXT_COLUMNS = ("job_id", "queue_name", "payload", "priority", "attempt", "max_attempts", "lease_token",
                "lease_expires_at", "enqueued_at")


def test_wait_for_next_job_claims_what_a_commit_made_runnable_in_the_same_call(cluster):
    # The worker sleeps holding no snapshot; the producer's commit wakes it and it returns the
    # job, claimed (running, under its lease, attempt 1), with get_next_job's columns.
    with cluster.connect() as admin, cluster.connect() as producer, cluster.connect() as worker:
        admin.execute("SELECT queue_ext.create_queue('wj_next')")
        drain(admin, "wj_next")
        result = {}
        t = threading.Thread(target=lambda: result.update(row=worker.execute(NEXT, [["wj_next"], "20 seconds"]).fetchone(),
                                                          ended=time.time()), daemon=True)
        t.start()
        wait_for(lambda: waiting(admin, worker.info.backend_pid), 10, what="the worker to sleep")
        xmin, xid = admin.execute("SELECT backend_xmin, backend_xid FROM pg_stat_activity WHERE pid = %s",
                                  [worker.info.backend_pid]).fetchone()
        assert (xmin, xid) == (None, None)
        producer.autocommit = False
        job = producer.execute("SELECT queue_ext.enqueue_job('wj_next', '{\"n\": 7}')").fetchone()[0]
        time.sleep(0.3)
        assert t.is_alive(), "woken before the commit"
        committed = time.time()
        producer.commit()
        t.join(10)
        assert result["ended"] - committed < 2.0
        row = dict(zip(NEXT_COLUMNS, result["row"]))
        assert row["job_id"] == job and row["queue_name"] == "wj_next" and row["payload"] == {"n": 7}
        assert row["attempt"] == 1 and row["lease_token"] is not None
        # The claim is committed with the CALL: the job runs under that lease, for worker w1.
        assert admin.execute("SELECT status::text, lease_token, worker_id FROM queue_ext.job_queue WHERE id = %s",
                             [job]).fetchone() == ("running", row["lease_token"], "w1")
        assert admin.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, row["lease_token"]]).fetchone()[0] == "completed"


def test_wait_for_next_job_returns_at_once_or_nulls_at_the_timeout(cluster):
    with cluster.connect() as conn:
        drain(conn, "wj_b")
        job = conn.execute("SELECT queue_ext.enqueue_job('wj_b', '{}')").fetchone()[0]
        t = time.time()
        assert conn.execute(NEXT, [["wj_b"], "10 seconds"]).fetchone()[0] == job
        assert time.time() - t < 2.0
        t = time.time()
        assert conn.execute(NEXT, [["wj_b"], "300 milliseconds"]).fetchone() == (None,) * len(NEXT_COLUMNS)
        assert time.time() - t >= 0.3
        # A paused queue's job is not claimed.
        conn.execute("SELECT queue_ext.enqueue_job('wj_paused', '{}')")
        assert conn.execute(NEXT, [["wj_paused"], "200 milliseconds"]).fetchone()[0] is None
        with pytest.raises(psycopg.errors.ActiveSqlTransaction):
            with conn.transaction():
                conn.execute(NEXT, [["wj_b"], "1 second"])
        for bad in ("2 hours", "-1 second", None):
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                conn.execute(NEXT, [["wj_b"], bad])
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_many_wait_for_next_job_callers_claim_every_job_once(cluster):
    # Eight workers that only ever call wait_for_next_job, one producer committing batches:
    # every job is claimed exactly once, and a worker beaten to a job waits again.
    jobs, workers = 300, 8
    claimed, lock, stop = [], threading.Lock(), threading.Event()
    with cluster.connect() as admin:
        admin.execute("SELECT queue_ext.create_queue('wj_next_many')")

    def worker():
        with cluster.connect() as c:
            while not stop.is_set():
                job_id, lease = (lambda r: (r[0], r[6]))(c.execute(NEXT, [["wj_next_many"], "1 second"]).fetchone())
                if job_id is not None:
                    assert c.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job_id, lease]).fetchone()[0] == "completed"
                    with lock:
                        claimed.append(job_id)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    with cluster.connect() as producer:
        for _ in range(30):
            producer.execute("SELECT count(*) FROM queue_ext.enqueue_jobs('wj_next_many', array_fill('{}'::jsonb, ARRAY[10]))")
            time.sleep(0.02)
        wait_for(lambda: len(claimed) >= jobs, 30, what="every job claimed")
    stop.set()
    for t in threads:
        t.join(10)
    assert len(claimed) == jobs and len(set(claimed)) == jobs


def test_only_workers_may_wait_for_the_next_job(cluster):
    with cluster.connect() as admin:
        admin.execute("DROP ROLE IF EXISTS wj_producer2")
        admin.execute("CREATE ROLE wj_producer2 LOGIN IN ROLE queue_ext_producer")
        admin.execute("DROP ROLE IF EXISTS wj_worker2")
        admin.execute("CREATE ROLE wj_worker2 LOGIN IN ROLE queue_ext_worker")
    with cluster.connect(user="wj_producer2") as p:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            p.execute(NEXT, [["wj_b"], "100 milliseconds"])
    with cluster.connect(user="wj_worker2") as w:
        assert len(w.execute(NEXT, [["wj_b"], "100 milliseconds"]).fetchone()) == len(NEXT_COLUMNS)


def test_a_procedure_claims_right_after_its_wait_for_jobs_returns(cluster):
    # A claim takes jobs whose run_at is at most its transaction's now(), and a new job's run_at
    # is its producer's now(): the wait returns in a transaction begun after the wake-up, so a
    # claim in the same procedure takes the job that woke it at the first try.
    with cluster.connect() as admin, cluster.connect() as worker:
        admin.execute("SELECT queue_ext.create_queue('wj_proc')")
        admin.execute("""
            CREATE OR REPLACE PROCEDURE wj_wait_then_claim(INOUT got uuid DEFAULT NULL)
            LANGUAGE plpgsql AS $$
            DECLARE woken boolean;
            BEGIN
                CALL queue_ext.wait_for_jobs(ARRAY['wj_proc'], '20 seconds', woken);
                SELECT c.job_id INTO got FROM queue_ext.get_next_job('wj_proc') AS c;
            END $$""")
        result = {}
        t = threading.Thread(target=lambda: result.update(got=worker.execute("CALL wj_wait_then_claim()").fetchone()[0]),
                             daemon=True)
        t.start()
        wait_for(lambda: waiting(admin, worker.info.backend_pid), 10, what="the worker to sleep")
        time.sleep(0.2)  # the wait's transaction begins well before the job's
        job = admin.execute("SELECT queue_ext.enqueue_job('wj_proc', '{}')").fetchone()[0]
        t.join(10)
        assert result["got"] == job
