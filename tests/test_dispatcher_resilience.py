"""The dispatcher survives SQL errors while it records outcomes: the job concerned is settled
by the rules (here: dead-lettered with the reason), the process keeps its pid, and the other
jobs of the same batch are recorded as usual. The error is injected for real, by a trigger
that refuses to archive a 'poison' job."""
import os
import time

import pytest

from pgcluster import Cluster, dispatcher_pid, wait_for
from sink import Reply, Sink


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("resilience", 25571, ["queue_ext.http_allowlist = '127.0.0.1'",
                                      "queue_ext.poll_interval = '200ms'"])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    yield c
    c.stop()


def test_an_outcome_that_cannot_be_recorded_does_not_stop_the_dispatcher(cluster):
    sink = Sink()
    with cluster.connect() as conn:
        conn.execute("""
            CREATE FUNCTION public.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.payload ->> 'poison' = 'true' THEN
                    RAISE EXCEPTION 'archive refuses job %', NEW.id USING ERRCODE = 'P0001';
                END IF;
                RETURN NEW;
            END $$""")
        conn.execute("CREATE TRIGGER refuse_poison BEFORE INSERT ON queue_ext.job_archive "
                     "FOR EACH ROW EXECUTE FUNCTION public.refuse_poison()")
        conn.execute("SELECT queue_ext.create_queue('hooks', webhook_url => %s, max_attempts => 5)",
                     [sink.url + "/hooks"])
        pid = wait_for(lambda: dispatcher_pid(conn), 10, what="the dispatcher")
        ids = conn.execute("""
            SELECT queue_ext.enqueue_job('hooks', jsonb_build_object('n', n, 'poison', n = 5))::text
            FROM generate_series(1, 10) AS n""").fetchall()
        ids = [r[0] for r in ids]
        poison = ids[4]
        wait_for(lambda: conn.execute("SELECT count(*) FROM queue_ext.job_queue").fetchone()[0] == 0,
                 20, what="every job settled")
        completed = {r[0] for r in conn.execute(
            "SELECT id::text FROM queue_ext.job_archive WHERE status = 'completed'")}
        assert completed == set(ids) - {poison}
        reason, error = conn.execute(
            "SELECT reason, last_error FROM queue_ext.job_dead_letter WHERE id = %s", [poison]).fetchone()
        assert reason == "permanent failure"
        assert "recording the outcome failed" in error and "archive refuses job" in error, error
        # Sent once: recorded as a permanent failure, never looped.
        poison_requests = [r for r in sink.to("/hooks") if r.headers["webhook-id"] == f"msg_{poison}"]
        assert len(poison_requests) == 1
        assert dispatcher_pid(conn) == pid, "the same dispatcher process went on"
        # And it keeps delivering.
        later = conn.execute("SELECT queue_ext.enqueue_job('hooks', '{}')::text").fetchone()[0]
        wait_for(lambda: conn.execute("SELECT count(*) FROM queue_ext.job_archive WHERE id = %s",
                                      [later]).fetchone()[0] == 1, 10, what="a later delivery")
        assert "archive refuses job" in cluster.log_tail(200), "the log says what happened"
    sink.close()


def test_a_queue_whose_claim_fails_does_not_stop_the_others(cluster):
    sink = Sink()
    with cluster.connect() as conn:
        # Claims of queue 'jammed' fail: the update that claims its job is refused.
        conn.execute("""
            CREATE FUNCTION public.jam_claims() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.queue_name = 'jammed' AND NEW.status = 'running' THEN
                    RAISE EXCEPTION 'claims of jammed refused' USING ERRCODE = 'P0001';
                END IF;
                RETURN NEW;
            END $$""")
        conn.execute("CREATE TRIGGER jam_claims BEFORE UPDATE ON queue_ext.job_queue "
                     "FOR EACH ROW EXECUTE FUNCTION public.jam_claims()")
        conn.execute("SELECT queue_ext.create_queue('jammed', webhook_url => %s)", [sink.url + "/jammed"])
        conn.execute("SELECT queue_ext.create_queue('flowing', webhook_url => %s)", [sink.url + "/flowing"])
        pid = dispatcher_pid(conn)
        jammed = conn.execute("SELECT queue_ext.enqueue_job('jammed', '{}')::text").fetchone()[0]
        flowing = [r[0] for r in conn.execute(
            "SELECT queue_ext.enqueue_job('flowing', jsonb_build_object('n', n))::text "
            "FROM generate_series(1, 20) AS n").fetchall()]
        wait_for(lambda: conn.execute("SELECT count(*) FROM queue_ext.job_archive WHERE id = ANY(%s::uuid[])",
                                      [flowing]).fetchone()[0] == 20, 20, what="the other queue delivered")
        assert conn.execute("SELECT status::text FROM queue_ext.job_queue WHERE id = %s",
                            [jammed]).fetchone()[0] == "queued", "the jammed job waits, untouched"
        assert sink.to("/jammed") == []
        assert dispatcher_pid(conn) == pid
        # Once the fault is gone, the jammed queue flows too.
        conn.execute("DROP TRIGGER jam_claims ON queue_ext.job_queue")
        wait_for(lambda: conn.execute("SELECT count(*) FROM queue_ext.job_archive WHERE id = %s",
                                      [jammed]).fetchone()[0] == 1, 20, what="the jammed queue recovered")
        assert "claiming from queue jammed failed" in cluster.log_tail(300)
    sink.close()


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_full_rate_limited_queue_does_not_make_the_dispatcher_spin(cluster):
    """Tokens to spare but no room (webhook_max_in_flight reached): the dispatcher waits for a
    request to finish instead of polling every millisecond."""
    sink = Sink()
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.set_rate_limit('plenty', 1000, '1 second', burst => 1000)")
        conn.execute("SELECT queue_ext.create_queue('narrow', webhook_url => %s, webhook_max_in_flight => 1)",
                     [sink.url + "/narrow"])
        sink.default("/narrow", Reply(200, delay=4.0))
        pid = dispatcher_pid(conn)
        conn.execute("SELECT queue_ext.enqueue_job('narrow', '{}', rate_limit_key => 'plenty') "
                     "FROM generate_series(1, 5)")
        wait_for(lambda: len(sink.to("/narrow")) == 1, 10, what="the one request in flight")
        before = _cpu_seconds(pid)
        time.sleep(2.5)
        used = _cpu_seconds(pid) - before
        assert dispatcher_pid(conn) == pid
    # A spinning loop burns most of a core (~2.5 s here); waiting costs a few polls.
    assert used < 0.5, f"the dispatcher used {used:.2f} s of CPU in 2.5 s while it could do nothing"
    sink.close()


def test_outcomes_the_database_refuses_for_a_while_are_recorded_later_not_buried(cluster):
    # Recording a delivered webhook calls _archive_delivered. While it is missing (as for a
    # dispatcher transaction caught across ALTER EXTENSION UPDATE, which ran old functions
    # against new tables), the outcomes wait in the dispatcher and are recorded once the
    # database takes them again: the jobs complete; none goes to the dead letter queue.
    sink = Sink()
    sig = "uuid[], uuid[], text[], text[], integer[], float8[], jsonb[], text[]"
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue('later', webhook_url => %s)", [sink.url + "/later"])
        pid = wait_for(lambda: dispatcher_pid(conn), 10, what="the dispatcher")
        conn.execute(f"ALTER FUNCTION queue_ext._archive_delivered({sig}) RENAME TO _archive_delivered_away")
        try:
            ids = [r[0] for r in conn.execute(
                "SELECT queue_ext.enqueue_job('later', jsonb_build_object('n', n))::text "
                "FROM generate_series(1, 5) AS n").fetchall()]
            wait_for(lambda: len(sink.to("/later")) >= 5, 10, what="the requests")
            time.sleep(1.5)  # several turns (poll_interval 200 ms), each refused
            assert conn.execute("SELECT count(*) FROM queue_ext.job_queue "
                                "WHERE queue_name = 'later' AND status = 'running'").fetchone()[0] == 5
        finally:
            conn.execute(f"ALTER FUNCTION queue_ext._archive_delivered_away({sig}) RENAME TO _archive_delivered")
        wait_for(lambda: conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = 'later'")
                 .fetchone()[0] == 0, 20, what="the outcomes recorded")
        completed = {r[0] for r in conn.execute(
            "SELECT id::text FROM queue_ext.job_archive WHERE queue_name = 'later' AND status = 'completed'")}
        assert completed == set(ids)
        assert conn.execute("SELECT count(*) FROM queue_ext.job_dead_letter WHERE queue_name = 'later'").fetchone()[0] == 0
        assert dispatcher_pid(conn) == pid
    assert sorted(r.headers["webhook-id"] for r in sink.to("/later")) == sorted(f"msg_{i}" for i in ids)


def test_in_a_lock_cycle_with_ddl_the_dispatcher_gives_way(cluster):
    # An operator's DDL (or ALTER EXTENSION UPDATE, which locks table after table) and the
    # dispatcher's housekeeping can wait on each other. Here for certain: the sweep returning
    # an expired lease holds job_queue and, in a trigger, sleeps and then reads `ddl_side`;
    # meanwhile the operator's transaction locks ddl_side and then waits for job_queue. The
    # operator waited first, so at the default deadlock_timeout it would be the one cancelled.
    # The operator's statement must win; the sweep is redone on a later turn.
    with cluster.connect() as conn, cluster.connect() as operator:
        pid = wait_for(lambda: dispatcher_pid(conn), 10, what="the dispatcher")
        conn.execute("SELECT queue_ext.create_queue('ddl_cycle')")
        job = conn.execute("SELECT queue_ext.enqueue_job('ddl_cycle', '{\"cycle\": true}')::text").fetchone()[0]
        conn.execute("SELECT * FROM queue_ext.get_next_job('ddl_cycle', lease => '1 hour')")
        conn.execute("CREATE TABLE public.ddl_side (x int)")
        conn.execute("""
            CREATE FUNCTION public.slow_sweep() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.payload ->> 'cycle' = 'true' AND OLD.status = 'running' AND NEW.status = 'queued' THEN
                    PERFORM pg_sleep(0.5);
                    PERFORM 1 FROM public.ddl_side;
                END IF;
                RETURN NEW;
            END $$""")
        conn.execute("CREATE TRIGGER slow_sweep BEFORE UPDATE ON queue_ext.job_queue "
                     "FOR EACH ROW EXECUTE FUNCTION public.slow_sweep()")
        try:
            conn.execute("UPDATE queue_ext.job_queue SET lease_expires_at = now() WHERE id = %s", [job])
            wait_for(lambda: conn.execute("SELECT wait_event FROM pg_stat_activity WHERE pid = %s",
                                          [pid]).fetchone()[0] == "PgSleep",
                     10, interval=0.01, what="the sweep sleeping inside its transaction")
            with operator.transaction():
                operator.execute("LOCK TABLE public.ddl_side IN ACCESS EXCLUSIVE MODE")
                operator.execute("LOCK TABLE queue_ext.job_queue IN ACCESS EXCLUSIVE MODE")
            wait_for(lambda: conn.execute("SELECT status::text FROM queue_ext.job_queue WHERE id = %s",
                                          [job]).fetchone()[0] == "queued", 10, what="the sweep redone")
            assert conn.execute("SELECT last_error FROM queue_ext.job_queue WHERE id = %s",
                                [job]).fetchone()[0] == "lease expired"
            assert dispatcher_pid(conn) == pid, "the dispatcher went on"
        finally:
            conn.execute("DROP TRIGGER slow_sweep ON queue_ext.job_queue")
            conn.execute("DROP FUNCTION public.slow_sweep()")
            conn.execute("DROP TABLE public.ddl_side")


def test_functions_recreated_under_the_dispatcher_are_called_by_their_new_definitions(cluster):
    # The dispatcher plans its claim, record and rate-limit statements once and keeps them.
    # An update that drops and creates those functions again (new OIDs, as a script may) must
    # not leave it calling the old ones, or failing on every turn: it goes on delivering, in
    # the same process, with none lost or sent twice.
    sink = Sink()
    functions = ["_dispatch_claim_rows(text, integer, text[], integer[], text, interval, text[])",
                 "_dispatch_record_rows(uuid[], uuid[], text[], integer[], text[], text[], integer[], text[], "
                 "float8[], jsonb[], text[], float8[])",
                 "_rate_limit_wait()"]
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue('recreated', webhook_url => %s)", [sink.url + "/recreated"])
        pid = wait_for(lambda: dispatcher_pid(conn), 10, what="the dispatcher")

        def deliver(n):
            ids = [r[0] for r in conn.execute(
                "SELECT queue_ext.enqueue_job('recreated', jsonb_build_object('n', n))::text "
                "FROM generate_series(1, %s) AS n", [n]).fetchall()]
            wait_for(lambda: conn.execute(
                "SELECT count(*) FROM queue_ext.job_archive WHERE status = 'completed' AND id = ANY (%s::uuid[])",
                [ids]).fetchone()[0] == n, 20, what=f"{n} deliveries")
            return ids

        first = deliver(5)
        before = {f: conn.execute("SELECT %s::regprocedure::oid", [f"queue_ext.{f}"]).fetchone()[0]
                  for f in functions}
        with conn.transaction():
            for f in functions:
                definition = conn.execute("SELECT pg_get_functiondef(%s::regprocedure)",
                                          [f"queue_ext.{f}"]).fetchone()[0]
                conn.execute(f"ALTER EXTENSION queue_ext DROP FUNCTION queue_ext.{f}")
                conn.execute(f"DROP FUNCTION queue_ext.{f}")
                conn.execute(definition)
                conn.execute(f"ALTER EXTENSION queue_ext ADD FUNCTION queue_ext.{f}")
        after = {f: conn.execute("SELECT %s::regprocedure::oid", [f"queue_ext.{f}"]).fetchone()[0]
                 for f in functions}
        assert all(before[f] != after[f] for f in functions), "each function is a new object"
        second = deliver(5)
        assert dispatcher_pid(conn) == pid, "the same dispatcher process went on"
        assert conn.execute("SELECT count(*) FROM queue_ext.job_dead_letter "
                            "WHERE queue_name = 'recreated'").fetchone()[0] == 0
    assert sorted(r.headers["webhook-id"] for r in sink.to("/recreated")) == sorted(
        f"msg_{i}" for i in first + second)
    sink.close()
