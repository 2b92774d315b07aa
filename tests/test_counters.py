"""The Prometheus *_total counters: completed, failed attempts and dead letters per queue,
counted when the transaction that made them commits (never for a rollback or a savepoint
rolled back), through every path that makes them: one job or a batch, a worker or the
dispatcher, a lost lease; and read back by metrics() as a real Prometheus parser sees it."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgcluster import Cluster, dispatcher_pid, wait_for
from sink import Reply, Sink


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("counters", 25466, ["queue_ext.http_allowlist = '127.0.0.1'",
                                     "queue_ext.poll_interval = '200ms'"])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
        wait_for(lambda: dispatcher_pid(conn) is not None, 20, what="the dispatcher")
    yield c
    c.stop()


def totals(conn, queue):
    text = conn.execute("SELECT queue_ext.metrics()").fetchone()[0]
    got = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_total") and s.name.startswith("queue_ext_jobs_") and s.labels.get("queue") == queue:
                got[s.name[len("queue_ext_jobs_"):-len("_total")]] = s.value
    return got


def claim(conn, queue, n=1):
    return conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, %s)", [queue, n]).fetchall()


def test_every_path_counts_once_and_only_when_committed(cluster):
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue('cnt', max_attempts => 2, backoff_base => '0', backoff_cap => '0')")
        assert totals(conn, "cnt") == {"completed": 0, "failed": 0, "dead": 0}
        conn.execute("SELECT queue_ext.enqueue_jobs('cnt', array_fill('{}'::jsonb, ARRAY[20]))")

        # One at a time: 3 completed.
        for job, token in claim(conn, "cnt", 3):
            conn.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, token])
        # A batch: 5 completed in one call.
        rows = claim(conn, "cnt", 5)
        conn.execute("SELECT queue_ext.complete_jobs(%s::uuid[], %s::uuid[])", [[r[0] for r in rows], [r[1] for r in rows]])
        # Rolled back, and rolled back to a savepoint: nothing counted.
        conn.autocommit = False
        (job, token), = claim(conn, "cnt")
        conn.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, token])
        conn.rollback()
        (job, token), = claim(conn, "cnt")
        conn.execute("SAVEPOINT s")
        conn.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, token])
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, token])  # counted: 9
        conn.commit()
        conn.autocommit = True
        assert totals(conn, "cnt") == {"completed": 9, "failed": 0, "dead": 0}

        # Failures: one retry, then its second attempt dead; a permanent failure dead at once.
        (job, token), = claim(conn, "cnt")
        conn.execute("SELECT queue_ext.fail_job(%s, 'boom', %s)", [job, token])
        wait_for(lambda: conn.execute("SELECT status::text FROM queue_ext.job_queue WHERE id = %s", [job]).fetchone()
                 == ("retrying",), 5)
        conn.execute("UPDATE queue_ext.job_queue SET run_at = now() - interval '1 hour' WHERE id = %s", [job])
        again = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_jobs('cnt', 20)").fetchall()
        token = dict(again)[job]
        conn.execute("SELECT queue_ext.fail_job(%s, 'boom again', %s)", [job, token])
        other = next(r for r in again if r[0] != job)
        conn.execute("SELECT queue_ext.fail_job(%s, 'bad input', %s, permanent => true)", list(other))
        # A lost lease is a failed attempt too.
        lost = next(r for r in again if r[0] not in (job, other[0]))
        conn.execute("UPDATE queue_ext.job_queue SET lease_expires_at = now() - interval '1 second' WHERE id = %s", [lost[0]])
        conn.execute("SELECT queue_ext.cleanup_stuck_jobs()")
        assert totals(conn, "cnt") == {"completed": 9, "failed": 4, "dead": 2}


def test_dispatcher_deliveries_count_as_completed(cluster):
    sink = Sink()
    try:
        with cluster.connect() as conn:
            conn.execute("SELECT queue_ext.create_queue('cnt_hook', webhook_url => %s)", [sink.url + "/h"])
            sink.default("/h", Reply(200))
            conn.execute("SELECT queue_ext.enqueue_jobs('cnt_hook', array_fill('{}'::jsonb, ARRAY[25]))")
            wait_for(lambda: totals(conn, "cnt_hook").get("completed") == 25, 20, what="25 deliveries counted")
            assert len(sink.to("/h")) == 25
    finally:
        sink.close()


def test_counters_belong_to_their_database(cluster):
    with cluster.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS cnt_other")
        conn.execute("CREATE DATABASE cnt_other")
    with cluster.connect(dbname="cnt_other") as other:
        other.execute("CREATE EXTENSION queue_ext")
        other.execute("SELECT queue_ext.create_queue('cnt')")
        assert totals(other, "cnt") == {"completed": 0, "failed": 0, "dead": 0}
