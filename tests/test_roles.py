"""The role matrix, cell by cell: what each role can read and call, and what a producer can
learn about another producer's jobs.

Roles: two producers (alice, bob), a worker (wendy), an admin (adam), and a login role with
none of ours (nobody). The expected matrix is a literal table below (docs/operations.md's "Roles and
what each can see" shows the same): a grant added or taken away fails here until both say so.
Every table, view and function of schema queue_ext is read from the catalogue, so a new one
without a row fails too.

The cluster does not preload queue_ext: no dispatcher delivers webhook jobs behind the test's
back, so what a catch-all SQL worker is handed is what the claim itself decides."""
import http.server
import threading
import uuid

import psycopg
import pytest
from psycopg import sql

from pgcluster import Cluster

PORT = 25542
HOOK_PORT = 25543   # a receiver answering 200
DOWN_PORT = 25544   # nothing listens: connection refused
TOKEN = "tok3nSECRETvalue"
PASSWORD = "pa55SECRETword"

PRODUCERS = ("alice", "bob")
LOGINS = {"alice": "queue_ext_producer", "bob": "queue_ext_producer", "wendy": "queue_ext_worker",
          "adam": "queue_ext_admin", "nobody": None}
COLUMNS = ("producer", "worker", "admin", "none")
WHO = {"producer": "alice", "worker": "wendy", "admin": "adam", "none": "nobody"}

# Reads. own: only the rows of jobs the role enqueued; all: every row; -: 42501.
TABLES = """
| table or view          | producer | worker | admin | none |
|------------------------|----------|--------|-------|------|
| queues                 | all      | all    | all   | -    |
| job_queue              | own      | all    | all   | -    |
| job_archive            | own      | all    | all   | -    |
| job_dead_letter        | own      | all    | all   | -    |
| job_status_history     | own      | all    | all   | -    |
| job_status_log         | own      | all    | all   | -    |
| job_dependencies       | -        | all    | all   | -    |
| job_processing_status  | -        | all    | all   | -    |
| webhook_deliveries     | -        | all    | all   | -    |
| webhook_targets        | -        | -      | all   | -    |
| rate_limits            | -        | all    | all   | -    |
| concurrency_limits     | -        | all    | all   | -    |
"""
# No role of ours may INSERT, UPDATE, DELETE or TRUNCATE any of them (nor use a sequence).

# EXECUTE (every overload of the name). x: allowed; -: 42501.
FUNCTIONS = """
| function               | producer | worker | admin | none |
|------------------------|----------|--------|-------|------|
| enqueue_job            | x        | -      | x     | -    |
| enqueue_jobs           | x        | -      | x     | -    |
| enqueue_trigger        | x        | -      | x     | -    |
| uuid_generate_v7       | x        | -      | x     | -    |
| job_status             | x        | x      | x     | -    |
| cancel_job             | x        | x      | x     | -    |
| list_queues            | x        | x      | x     | -    |
| get_next_job           | -        | x      | x     | -    |
| get_next_jobs          | -        | x      | x     | -    |
| complete_job           | -        | x      | x     | -    |
| complete_jobs          | -        | x      | x     | -    |
| complete_and_get_next  | -        | x      | x     | -    |
| wait_for_jobs          | -        | x      | x     | -    |
| wait_for_next_job      | -        | x      | x     | -    |
| fail_job               | -        | x      | x     | -    |
| heartbeat              | -        | x      | x     | -    |
| update_progress        | -        | x      | x     | -    |
| process_jobs           | -        | x      | x     | -    |
| queue_stats            | -        | x      | x     | -    |
| metrics                | -        | x      | x     | -    |
| worker_health          | -        | x      | x     | -    |
| health                 | -        | x      | x     | -    |
| dispatcher_status      | -        | x      | x     | -    |
| list_limits            | -        | x      | x     | -    |
| create_queue           | -        | -      | x     | -    |
| alter_queue            | -        | -      | x     | -    |
| drop_queue             | -        | -      | x     | -    |
| pause_queue            | -        | -      | x     | -    |
| resume_queue           | -        | -      | x     | -    |
| cleanup_stuck_jobs     | -        | -      | x     | -    |
| retry_dead_job         | -        | -      | x     | -    |
| purge_dead_letter      | -        | -      | x     | -    |
| purge_jobs             | -        | -      | x     | -    |
| purge_jobs_in_batches  | -        | -      | x     | -    |
| schedule_job           | -        | -      | x     | -    |
| unschedule_job         | -        | -      | x     | -    |
| set_rate_limit         | -        | -      | x     | -    |
| remove_rate_limit      | -        | -      | x     | -    |
| set_concurrency_limit  | -        | -      | x     | -    |
| max_payload_bytes      | -        | -      | -     | -    |
| _* (internal helpers)  | -        | -      | -     | -    |
"""


# What LISTEN delivers about bob's jobs: NOTIFY has no privileges, so every role that can
# connect, ours or not, hears every job's id, queue and state (queue_ext_events, queues with
# notify_events on) and the names of queues that got work (queue_ext_jobs); never an error.
EVENTS = """
| channel                | producer | worker | admin | none |
|------------------------|----------|--------|-------|------|
| queue_ext_events       | all      | all    | all   | all  |
| queue_ext_jobs         | all      | all    | all   | all  |
"""


def parse(table: str) -> dict[str, dict[str, str]]:
    rows = [r.strip().strip("|").split("|") for r in table.strip().splitlines()[2:]]
    return {cells[0].strip(): dict(zip(COLUMNS, (c.strip() for c in cells[1:]))) for cells in rows}


class Receiver(http.server.BaseHTTPRequestHandler):
    paths: list[str] = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        Receiver.paths.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    do_POST = do_GET = do_PUT = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def cluster():
    c = Cluster("fuzz_roles", PORT, ["shared_preload_libraries = 'pg_cron'",
                                     "queue_ext.http_allowlist = '127.0.0.1'"])
    c.start(fresh=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", HOOK_PORT), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
        for login, role in LOGINS.items():
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(login)))
            if role:
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(login)))
        conn.execute("SELECT queue_ext.create_queue('work', backoff_base => '1 hour', notify_events => true)")
        conn.execute("SELECT queue_ext.create_queue('once', max_attempts => 1)")
        for name, port in (("hook_ok", HOOK_PORT), ("hook_down", DOWN_PORT)):
            conn.execute("SELECT queue_ext.create_queue(%s, webhook_url => %s, backoff_base => '1 hour', "
                         "webhook_headers => %s, webhook_secret => 'whsec_SECRET', callback_url => %s)",
                         [name, f"http://user:{PASSWORD}@127.0.0.1:{port}/hook?token={TOKEN}&x=1",
                          '{"Authorization": "Bearer SECRETbearer"}',
                          f"http://127.0.0.1:{DOWN_PORT}/cb?token={TOKEN}"])
    yield c
    server.shutdown()
    c.stop()


def connect(cluster, login):
    return psycopg.connect(f"host=127.0.0.1 port={cluster.port} user={login} dbname=postgres", autocommit=True)


@pytest.fixture(scope="module")
def jobs(cluster):
    """Jobs of bob's in every state, and one of alice's."""
    with connect(cluster, "bob") as bob, connect(cluster, "wendy") as w, connect(cluster, "alice") as alice:
        ids = {}
        # alice has a row in each job table too: one completed, one dead, one live.
        for queue in ("work", "once"):
            alice.execute("SELECT queue_ext.enqueue_job(%s, '{\"who\": \"alice\"}')", [queue])
            job, tok = w.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job(%s, 'w')", [queue]).fetchone()
            w.execute("SELECT queue_ext.fail_job(%s, 'boom', %s, permanent => true)" if queue == "once" else
                      "SELECT queue_ext.complete_job(%s, '{}', %s)", [job, tok])
        ids["alice"] = alice.execute("SELECT queue_ext.enqueue_job('work', '{\"who\": \"alice\"}')").fetchone()[0]
        enq = lambda q="work": bob.execute("SELECT queue_ext.enqueue_job(%s, '{\"who\": \"bob\"}', priority => 'critical')", [q]).fetchone()[0]  # noqa: E731
        ids["running"] = enq()
        job, tok = w.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('work', 'w', '1 hour')").fetchone()
        assert job == ids["running"]
        ids["completed"] = enq()
        job, tok = w.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('work', 'w')").fetchone()
        w.execute("SELECT queue_ext.complete_job(%s, '{}', %s)", [job, tok])
        ids["dead"] = enq("once")
        job, tok = w.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('once', 'w')").fetchone()
        w.execute("SELECT queue_ext.fail_job(%s, 'boom', %s, permanent => true)", [job, tok])
        ids["cancelled"] = enq()
        bob.execute("SELECT queue_ext.cancel_job(%s)", [ids["cancelled"]])
        ids["queued"] = bob.execute("SELECT queue_ext.enqueue_job('work', '{\"who\": \"bob\"}', priority => 'low')").fetchone()[0]
        states = {k: bob.execute("SELECT status::text FROM queue_ext.job_status(%s)", [v]).fetchone()[0]
                  for k, v in ids.items() if k != "alice"}
        assert states == {"running": "running", "completed": "completed", "dead": "dead",
                          "cancelled": "cancelled", "queued": "queued"}, states
        return ids


def error_of(conn, query, params=()):
    """(sqlstate, message) of a statement run in a rolled-back transaction; (None, '') if it worked."""
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(query, params).fetchall()
        return None, ""
    except psycopg.Error as e:
        return e.sqlstate, e.diag.message_primary or ""


def test_table_matrix(cluster, jobs):
    expected = parse(TABLES)
    print("\n" + TABLES.strip())
    with cluster.connect() as su:
        objects = {r[0] for r in su.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'queue_ext'::regnamespace AND relkind IN ('r', 'v', 'p', 'm', 'f')")}
    assert objects == set(expected), (f"tables/views without a row in TABLES: {sorted(objects - set(expected))}; "
                                      f"rows for nothing: {sorted(set(expected) - objects)}")
    bad = []
    # Writes go through the functions only: no role of ours holds a write privilege on any
    # table, view or sequence of the schema.
    with cluster.connect() as su:
        writes = su.execute(
            """SELECT c.relname, r.rolname, p.priv FROM pg_class c CROSS JOIN pg_roles r
                CROSS JOIN unnest(ARRAY['INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) AS p(priv)
                WHERE c.relnamespace = 'queue_ext'::regnamespace AND c.relkind IN ('r', 'v', 'p', 'm', 'f')
                  AND r.rolname = ANY(%s) AND has_table_privilege(r.oid, c.oid, p.priv)
               UNION ALL
               SELECT c.relname, r.rolname, 'USAGE/UPDATE' FROM pg_class c CROSS JOIN pg_roles r
                WHERE c.relnamespace = 'queue_ext'::regnamespace AND c.relkind = 'S'
                  AND r.rolname = ANY(%s) AND has_sequence_privilege(r.oid, c.oid, 'USAGE, UPDATE')""",
            [list(WHO.values()), list(WHO.values())]).fetchall()
    bad += [f"{table} as {login}: {priv} granted, want none (writes go through the functions)"
            for table, login, priv in writes]
    for col, login in WHO.items():
        with connect(cluster, login) as conn:
            for table, cells in expected.items():
                want = cells[col]
                q = sql.SQL("SELECT count(*) FROM queue_ext.{}").format(sql.Identifier(table))
                state, msg = error_of(conn, q)
                got = "-" if state == "42501" else ("error " + str(state) if state else "readable")
                if want == "-":
                    if got != "-":
                        bad.append(f"{table} as {col}: want 42501, got {got} {msg}")
                    continue
                if got != "readable":
                    bad.append(f"{table} as {col}: want {want}, got {got} {msg}")
                    continue
                if table in ("job_queue", "job_archive", "job_dead_letter", "job_status_history", "job_status_log"):
                    owners = {r[0] for r in conn.execute(sql.SQL("SELECT DISTINCT enqueued_by::text FROM queue_ext.{}").format(
                        sql.Identifier(table)))}
                    seen = "own" if owners == {login} else "all" if {"alice", "bob"} <= owners else f"rows of {sorted(owners)}"
                    if seen != want:
                        bad.append(f"{table} as {col}: want {want} rows, sees {seen}")
    assert not bad, "\n".join(bad)


def test_function_matrix(cluster):
    expected = parse(FUNCTIONS)
    print("\n" + FUNCTIONS.strip())
    with cluster.connect() as su:
        funcs = su.execute(
            """SELECT p.oid, p.proname, p.oid::regprocedure::text, p.prorettype = 'trigger'::regtype,
                      ARRAY(SELECT format_type(t, NULL) FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS a(t, i) ORDER BY i),
                      p.prokind = 'p'
                 FROM pg_proc p WHERE p.pronamespace = 'queue_ext'::regnamespace AND p.proname !~ '^_'""").fetchall()
        names = {f[1] for f in funcs} | {"_* (internal helpers)"}
        assert names == set(expected), (f"functions without a row in FUNCTIONS: {sorted(names - set(expected))}; "
                                        f"rows for nothing: {sorted(set(expected) - names)}")
        bad = []
        for oid, name, sig, is_trigger, types, _ in funcs:
            for col, login in WHO.items():
                want = expected[name][col] == "x"
                has = su.execute("SELECT has_function_privilege(%s, %s, 'EXECUTE')", [login, oid]).fetchone()[0]
                if has != want:
                    bad.append(f"{sig} as {col}: EXECUTE {'granted' if has else 'denied'}, want {'granted' if want else 'denied'}")
        # Internal helpers (the dispatcher's claim and record among them) are the owner's only.
        internal = su.execute(
            """SELECT p.oid::regprocedure::text, r.rolname FROM pg_proc p CROSS JOIN pg_roles r
                WHERE p.pronamespace = 'queue_ext'::regnamespace AND p.proname ~ '^_'
                  AND r.rolname = ANY(%s) AND has_function_privilege(r.oid, p.oid, 'EXECUTE')""",
            [list(WHO.values())]).fetchall()
        bad += [f"{sig} as {login}: EXECUTE granted, want denied (internal)" for sig, login in internal]
    # Denied cells, called for real: 42501 before any argument is looked at.
    for col, login in WHO.items():
        with connect(cluster, login) as conn:
            for oid, name, sig, is_trigger, types, is_procedure in funcs:
                if expected[name][col] == "x" or is_trigger:
                    continue  # a trigger function cannot be called directly by anyone
                args = sql.SQL(", ").join(sql.SQL("NULL::{}").format(sql.SQL(t)) for t in types)
                call = "CALL queue_ext.{}({})" if is_procedure else "SELECT queue_ext.{}({})"
                state, msg = error_of(conn, sql.SQL(call).format(sql.Identifier(name), args))
                if state != "42501":
                    bad.append(f"{sig} as {col}: want 42501, got {state} {msg}")
    assert not bad, "\n".join(bad)


def hidden_answer(conn, query, job_id):
    state, msg = error_of(conn, query, [job_id])
    return state, msg.replace(str(job_id), "<id>")


def test_producer_learns_nothing_of_another_producers_jobs(cluster, jobs):
    """alice asking about bob's jobs, in any state, gets what she gets for an id that never
    existed: 42501, one message. Whether or in which state the job exists stays hidden."""
    probes = {
        "job_status": "SELECT * FROM queue_ext.job_status(%s)",
        "cancel_job": "SELECT queue_ext.cancel_job(%s, 'mine now')",
        "depends_on": "SELECT queue_ext.enqueue_job('work', '{}', depends_on => ARRAY[%s]::uuid[])",
    }
    with connect(cluster, "alice") as alice, connect(cluster, "bob") as bob:
        bad = []
        for what, query in probes.items():
            unknown = hidden_answer(alice, query, uuid.uuid4())
            if unknown[0] != "42501":
                bad.append(f"{what}(unknown id) as alice: {unknown}, want 42501")
            for state in ("queued", "running", "completed", "dead", "cancelled"):
                got = hidden_answer(alice, query, jobs[state])
                if got[0] != "42501" or got != unknown:
                    bad.append(f"{what}(bob's {state} job) as alice: {got}; an unknown id gets {unknown}")
                # The owner is answered: the probe itself works.
                if what == "job_status":
                    assert error_of(bob, query, [jobs[state]])[0] is None
            own = error_of(alice, query, [jobs["alice"]])
            assert own[0] is None or own[0] not in ("42501", "42704"), f"{what} on alice's own job: {own}"
        assert not bad, "\n".join(bad)
        # Nothing of bob's changed hands.
        assert bob.execute("SELECT status::text FROM queue_ext.job_status(%s)", [jobs["queued"]]).fetchone()[0] == "queued"


def test_dedupe_keys_do_not_cross_producers(cluster, jobs):
    with connect(cluster, "alice") as alice, connect(cluster, "bob") as bob:
        a1 = alice.execute("SELECT queue_ext.enqueue_job('work', '{\"n\": \"alice\"}', dedupe_key => 'order-42')").fetchone()[0]
        a2 = alice.execute("SELECT queue_ext.enqueue_job('work', '{\"n\": \"alice again\"}', dedupe_key => 'order-42')").fetchone()[0]
        assert a1 == a2, "dedupe works within one producer"
        try:
            b1 = bob.execute("SELECT queue_ext.enqueue_job('work', '{\"n\": \"bob\"}', dedupe_key => 'order-42')").fetchone()[0]
        except psycopg.Error as e:
            # Refusing a shared key is allowed, if it does not name alice's job.
            assert e.sqlstate in ("23505", "42501") and str(a1) not in str(e), (e.sqlstate, str(e))
            return
        assert b1 != a1, "bob's enqueue returned alice's job id (his payload silently dropped)"
        assert bob.execute("SELECT payload->>'n' FROM queue_ext.job_queue WHERE id = %s", [b1]).fetchone()[0] == "bob"
        assert alice.execute("SELECT payload->>'n' FROM queue_ext.job_queue WHERE id = %s", [a1]).fetchone()[0] == "alice"


def test_nobody_forges_a_callback(cluster):
    """Only the extension puts jobs on queue_ext.callbacks: a forged one would be POSTed,
    signed with another queue's secret, to that queue's callback_url."""
    forged = '{"type": "job.completed", "queue": "hook_ok", "result": {"paid": true}}'
    with cluster.connect() as su:
        su.execute("CREATE TABLE public.forge (id int)")
        su.execute("GRANT INSERT ON public.forge TO alice")
        su.execute("CREATE TRIGGER forge AFTER INSERT ON public.forge FOR EACH ROW "
                   "EXECUTE FUNCTION queue_ext.enqueue_trigger('queue_ext.callbacks')")
        before = su.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = 'queue_ext.callbacks'").fetchone()[0]
    bad = []
    for login in ("alice", "adam", "postgres"):
        with connect(cluster, login) as conn:
            for query in ("SELECT queue_ext.enqueue_job('queue_ext.callbacks', %s::jsonb)",
                          "SELECT * FROM queue_ext.enqueue_jobs('queue_ext.callbacks', ARRAY[%s::jsonb])"):
                state, msg = error_of(conn, query.replace("%s::jsonb", "'" + forged + "'::jsonb"))
                if state != "42501":
                    bad.append(f"{login}: {query.split('(')[0]}: {state or 'accepted'} {msg}")
    with connect(cluster, "alice") as alice:
        state, msg = error_of(alice, "INSERT INTO public.forge VALUES (1)")
        if state != "42501":
            bad.append(f"alice via enqueue_trigger('queue_ext.callbacks'): {state or 'accepted'} {msg}")
    with cluster.connect() as su:
        su.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        su.execute("GRANT USAGE ON SCHEMA cron TO adam")
    with connect(cluster, "adam") as adam:
        state, msg = error_of(adam, "SELECT queue_ext.schedule_job('forge', '* * * * *', 'queue_ext.callbacks', %s)", [forged])
        if state != "42501":
            bad.append(f"adam via schedule_job('queue_ext.callbacks'): {state or 'accepted'} {msg}")
        # The same call into a queue of his own works: the refusal is about the queue.
        assert error_of(adam, "SELECT queue_ext.schedule_job('fine', '* * * * *', 'work', %s)", [forged]) == (None, "")
    with cluster.connect() as su:
        after = su.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = 'queue_ext.callbacks'").fetchone()[0]
        su.execute("DROP TABLE public.forge")
    assert after == before
    assert not bad, "\n".join(bad)


def test_internal_queue_cannot_be_altered(cluster):
    bad = []
    with connect(cluster, "adam") as adam:
        for query in ("SELECT queue_ext.pause_queue('queue_ext.callbacks')",
                      "SELECT queue_ext.resume_queue('queue_ext.callbacks')",
                      "SELECT queue_ext.alter_queue('queue_ext.callbacks', max_attempts => 1)",
                      "SELECT queue_ext.drop_queue('queue_ext.callbacks', force => true)"):
            state, msg = error_of(adam, query)
            if state != "42501":
                bad.append(f"{query}: {state or 'accepted'} {msg}")
    assert not bad, "\n".join(bad)


def test_catch_all_worker_never_gets_webhook_jobs(cluster):
    with connect(cluster, "alice") as alice, connect(cluster, "wendy") as w, cluster.connect() as su:
        su.execute("SELECT queue_ext.create_queue('catchall_plain')")
        su.execute("SELECT queue_ext.create_queue('catchall_hook', webhook_url => 'http://127.0.0.1:25544/x')")
        hooked = {alice.execute("SELECT queue_ext.enqueue_job('catchall_hook', '{}')").fetchone()[0] for _ in range(3)}
        plain = {alice.execute("SELECT queue_ext.enqueue_job('catchall_plain', '{}')").fetchone()[0] for _ in range(3)}
        claimed = []
        for _ in range(20):
            rows = w.execute("SELECT job_id, queue_name, lease_token FROM queue_ext.get_next_jobs(NULL::text[], 10, 'catchall')").fetchall()
            rows += w.execute("SELECT job_id, queue_name, lease_token FROM queue_ext.get_next_job(NULL::text[], 'catchall')").fetchall()
            if not rows:
                break
            for job, queue, tok in rows:
                claimed.append((job, queue))
                w.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, tok])
        webhook_queues = {r[0] for r in su.execute("SELECT queue_name FROM queue_ext.queues WHERE is_webhook")}
        wrong = [(j, q) for j, q in claimed if q in webhook_queues]
        assert not wrong, f"a catch-all SQL worker was handed webhook jobs: {wrong}"
        assert plain <= {j for j, _ in claimed}, "the plain jobs were all claimed (the claim works)"
        states = {r[0] for r in su.execute("SELECT status::text FROM queue_ext.job_queue WHERE id = ANY(%s)", [list(hooked)])}
        assert states == {"queued"}


def test_delivery_log_and_errors_carry_no_credentials(cluster):
    """webhook_deliveries (read by workers) and a job's last_error (read by its producer) name
    the endpoint without its password or query values; the receiver still got the real URL."""
    with connect(cluster, "alice") as alice, connect(cluster, "wendy") as w:
        ok_job = alice.execute("SELECT queue_ext.enqueue_job('hook_ok', '{\"n\": 1}')").fetchone()[0]
        down_job = alice.execute("SELECT queue_ext.enqueue_job('hook_down', '{\"n\": 2}')").fetchone()[0]
        Receiver.paths.clear()
        out_ok = w.execute("SELECT job_id::text, outcome, error FROM queue_ext.process_jobs('hook_ok')").fetchall()
        out_down = w.execute("SELECT job_id::text, outcome, error FROM queue_ext.process_jobs('hook_down')").fetchall()
        assert [r[0] for r in out_ok] == [str(ok_job)], out_ok
        assert [r[0] for r in out_down] == [str(down_job)], out_down
        assert any(TOKEN in p for p in Receiver.paths), f"the receiver got the real URL: {Receiver.paths}"
        # Every row a worker can read, callbacks included.
        deliveries = w.execute("SELECT job_id, url, coalesce(error, ''), coalesce(response_body, '') "
                               "FROM queue_ext.webhook_deliveries").fetchall()
        assert {ok_job, down_job} <= {d[0] for d in deliveries}, deliveries
        print("\nas a worker reads them:", *[f"  {d[1]}  {d[2][:100]}" for d in deliveries], sep="\n")
        last_error = alice.execute("SELECT coalesce(last_error, '') FROM queue_ext.job_queue WHERE id = %s", [down_job]).fetchone()
        status = alice.execute("SELECT * FROM queue_ext.job_status(%s)", [down_job]).fetchall()
        history = alice.execute("SELECT * FROM queue_ext.job_status_history WHERE job_id = %s", [down_job]).fetchall()
        reports = {r: w.execute(f"SELECT * FROM queue_ext.{r}").fetchall()
                   for r in ("dispatcher_status()", "health()", "queue_stats()", "worker_health()", "list_queues()")}
    leaks = []
    texts = [("webhook_deliveries.url", d[1]) for d in deliveries] + [("webhook_deliveries.error", d[2]) for d in deliveries]
    texts += [("process_jobs error", r[2] or "") for r in out_ok + out_down]
    texts += [("job_queue.last_error", last_error[0] if last_error else ""), ("job_status()", str(status)),
              ("job_status_history", str(history))] + [(r, str(rows)) for r, rows in reports.items()]
    for where, text in texts:
        for secret in (TOKEN, PASSWORD, "SECRETbearer", "whsec_SECRET"):
            if secret in text:
                leaks.append(f"{where}: {text[:200]!r}")
    assert not leaks, "credentials readable by non-admins:\n" + "\n".join(leaks)
    assert all("127.0.0.1" in d[1] for d in deliveries), "the logged URL still names the endpoint"


def test_event_channel_matrix(cluster):
    expected = parse(EVENTS)
    print("\n" + EVENTS.strip())
    listeners = {col: connect(cluster, login) for col, login in WHO.items()}
    try:
        for conn in listeners.values():
            conn.execute("LISTEN queue_ext_events")
            conn.execute("LISTEN queue_ext_jobs")
        with connect(cluster, "bob") as bob, connect(cluster, "wendy") as w:
            job = bob.execute("SELECT queue_ext.enqueue_job('work', '{}', priority => 'critical')").fetchone()[0]
            got, tok = w.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('work', 'w')").fetchone()
            assert got == job
            w.execute("SELECT queue_ext.fail_job(%s, 'card 4242 declined', %s)", [job, tok])
        bad = []
        for col, conn in listeners.items():
            notes = list(conn.notifies(timeout=1))
            heard = {
                "queue_ext_events": [n.payload for n in notes if n.channel == "queue_ext_events" and str(job) in n.payload],
                "queue_ext_jobs": [n.payload for n in notes if n.channel == "queue_ext_jobs" and n.payload == "work"],
            }
            if col == "none":
                print("a role with none of ours hears:", *[p for ps in heard.values() for p in ps], sep="\n  ")
            for channel, payloads in heard.items():
                seen = "all" if payloads else "-"
                if seen != expected[channel][col]:
                    bad.append(f"{channel} as {col}: hears {seen} ({payloads[:3]}), want {expected[channel][col]}")
                # Anyone may LISTEN, so nothing carries error text: that stays behind job_status().
                if any("4242" in p for p in payloads):
                    bad.append(f"{channel} as {col}: the job's error text is in a notification: {payloads}")
        assert not bad, "\n".join(bad)
    finally:
        for conn in listeners.values():
            conn.close()


def test_no_role_of_ours_lifts_the_payload_limit(cluster):
    """queue_ext.max_payload_bytes protects the server: only a superuser may change it. A role
    of ours either cannot set it (42501) or, when it was set before the library was loaded,
    the value is dropped at load: a 2 MB payload is refused (54000) all the same."""
    big = "SELECT queue_ext.enqueue_job('work', jsonb_build_object('blob', repeat('x', 2000000)))"
    for login in ("alice", "adam"):
        for loaded_first in (False, True):
            with connect(cluster, login) as conn:
                if loaded_first:
                    conn.execute("SELECT queue_ext.uuid_generate_v7()")
                try:
                    with conn.transaction(force_rollback=True):
                        conn.execute("SET LOCAL queue_ext.max_payload_bytes = '100MB'")
                        conn.execute(big)
                    raise AssertionError(f"{login} lifted queue_ext.max_payload_bytes and enqueued 2 MB")
                except psycopg.Error as e:
                    assert e.sqlstate in ("42501", "54000"), (login, loaded_first, e.sqlstate, str(e))
    with cluster.connect() as su:
        su.execute("SELECT queue_ext.uuid_generate_v7()")
        assert error_of(su, "SET LOCAL queue_ext.max_payload_bytes = '100MB'; " + big) == (None, "")
