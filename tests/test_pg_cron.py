"""Schedules with the real pg_cron (Debian's postgresql-15-cron 1.4, whose finest schedule is
a minute): one scheduled enqueue, and cron running cleanup_stuck_jobs() and
purge_jobs_in_batches(), all observed within the same minute tick."""
import psycopg
import pytest

from pgcluster import Cluster, wait_for


@pytest.fixture(scope="module")
def cluster():
    # queue_ext NOT preloaded here (the later line wins): no dispatcher sweeps leases, so
    # what happens is pg_cron's doing, and the SQL API is shown working without preloading.
    c = Cluster("pg_cron", 25445, ["cron.database_name = 'postgres'", "shared_preload_libraries = 'pg_cron'"])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_cron")
        conn.execute("CREATE EXTENSION queue_ext")
    yield c
    c.stop()


def value(conn, sql, *args):
    return conn.execute(sql, args).fetchone()[0]


def test_pg_cron_enqueues_and_runs_maintenance(cluster):
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue('ticks')")
        conn.execute("SELECT queue_ext.create_queue('maint')")
        # A job whose worker died (lease expired) and a finished job past retention.
        stuck = value(conn, "SELECT queue_ext.enqueue_job('maint', '{}')")
        conn.execute("SELECT job_id FROM queue_ext.get_next_job('maint', 'crashed-worker', lease => '1 second')")
        # Expired already: pg_cron's first run may come within the lease's second (a minute
        # boundary right after the cluster started), and the next one a minute later.
        conn.execute("UPDATE queue_ext.job_queue SET lease_expires_at = now() - interval '1 minute' WHERE id = %s",
                     [stuck])
        old = [value(conn, "SELECT queue_ext.enqueue_job('maint', '{}')") for _ in range(3)]
        conn.execute("SELECT queue_ext.complete_job(job_id) FROM queue_ext.get_next_jobs('maint', 3)")
        conn.execute("UPDATE queue_ext.job_archive SET finished_at = now() - interval '30 days' WHERE id = ANY(%s)", [old])

        assert value(conn, "SELECT queue_ext.schedule_job('tick', '* * * * *', 'ticks', '{\"tick\": true}')") > 0
        conn.execute("SELECT cron.schedule('qe-cleanup', '* * * * *', 'SELECT queue_ext.cleanup_stuck_jobs()')")
        # Two batches, each committed: pg_cron runs the procedure outside a transaction block.
        conn.execute("SELECT cron.schedule('qe-retention', '* * * * *', "
                     "$$CALL queue_ext.purge_jobs_in_batches('7 days', batch_size => 2)$$)")
        try:
            wait_for(lambda: value(conn, "SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = 'ticks'") >= 1,
                     75, interval=0.5, what="pg_cron's scheduled enqueue")
            assert value(conn, "SELECT payload FROM queue_ext.job_queue WHERE queue_name = 'ticks' LIMIT 1") == {"tick": True}
            wait_for(lambda: value(conn, "SELECT status::text FROM queue_ext.job_status(%s)", stuck) == "queued",
                     15, interval=0.5, what="pg_cron to return the expired lease")
            assert value(conn, "SELECT last_error FROM queue_ext.job_status(%s)", stuck) == "lease expired"
            wait_for(lambda: value(conn, "SELECT count(*) FROM queue_ext.job_archive WHERE id = ANY(%s)", old) == 0,
                     15, interval=0.5, what="pg_cron to purge the old jobs")
            wait_for(lambda: value(conn, "SELECT status FROM cron.job_run_details WHERE command LIKE 'CALL%%' "
                                         "ORDER BY runid DESC LIMIT 1") == "succeeded",
                     15, interval=0.5, what="the retention run to be recorded as succeeded")
        finally:
            assert value(conn, "SELECT queue_ext.unschedule_job('tick')") is True
            conn.execute("SELECT cron.unschedule('qe-cleanup')")
            conn.execute("SELECT cron.unschedule('qe-retention')")
        assert value(conn, "SELECT count(*) FROM cron.job") == 0
        assert value(conn, "SELECT state FROM queue_ext.dispatcher_status()") == "not_preloaded"


def test_purge_in_batches_commits_each_batch(cluster):
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue('batched_retention')")
        conn.execute("SELECT queue_ext.enqueue_jobs('batched_retention', array_fill('{}'::jsonb, ARRAY[25]))")
        conn.execute("SELECT queue_ext.complete_job(job_id) FROM queue_ext.get_next_jobs('batched_retention', 25)")
        conn.execute("UPDATE queue_ext.job_archive SET finished_at = now() - interval '30 days' "
                     "WHERE queue_name = 'batched_retention'")
        # Inside a transaction block it cannot commit, and says so.
        with pytest.raises(psycopg.errors.InvalidTransactionTermination):
            with conn.transaction():
                conn.execute("CALL queue_ext.purge_jobs_in_batches('7 days', 'batched_retention', 10)")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="batch_size must be at least 1"):
            conn.execute("CALL queue_ext.purge_jobs_in_batches('7 days', batch_size => 0)")
        before = value(conn, "SELECT txid_current()")
        purged = value(conn, "CALL queue_ext.purge_jobs_in_batches('7 days', 'batched_retention', 10)")
        after = value(conn, "SELECT txid_current()")
        assert purged == 25
        assert value(conn, "SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = 'batched_retention'") == 0
        # Three batches (10, 10, 5), each its own transaction: in one, the gap would be 2.
        assert after - before >= 4, (before, after)
