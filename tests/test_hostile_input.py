"""Hostile input: every public function of queue_ext, found in the catalogue (so a new one is
covered without touching this file), called with NULLs, empty and 1 MB strings, extreme
numbers, absurd intervals and timestamps, bad cron strings and URLs, non-object and
10,000-deep JSON, invalid UUIDs, job ids in every state and 100,000-element arrays, one
parameter at a time (the others valid), as the superuser and as each of our roles granted
the function.

Whatever the value, the answer must be a clear error or a result: never SQLSTATE XX000,
never a crash (the connection survives, the server log has no "terminated by signal"),
never a hang (a 10 s statement_timeout), never an empty message, never an overflow or a table
constraint standing in for a check; absurd settings are refused with 22023. Every call runs
in its own transaction and is rolled back, so the fixture stays as built; all violations are
listed together, one line each: role, function, parameter, value, outcome.

Then what was accepted is used for real: committed into queues of their own and worked
through (claims, retries, completions, reports), enqueued into a webhook queue and delivered
by the dispatcher to a loopback receiver, reported as results and errors that travel on as
callbacks. enqueue_trigger, called only by the executor, gets hostile trigger definitions."""
import http.server
import re
import threading
import time
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from pgcluster import Cluster, dispatcher_pid, wait_for

STATEMENT_TIMEOUT = "10s"  # the slowest legitimate call (100,000 payloads) takes ~1.5 s here
ROLES = ("queue_ext_producer", "queue_ext_worker", "queue_ext_admin")
LOGIN = {"queue_ext_producer": "fuzz_producer", "queue_ext_worker": "fuzz_worker",
         "queue_ext_admin": "fuzz_admin"}
MB = 1024 * 1024
BIG = 100_000  # elements in a "huge" array

# Hostile values per argument type: (label, SQL expression). Every expression is a literal
# written here, never data from the server.
HOSTILE = {
    "text": [
        ("NULL", "NULL::text"), ("empty", "''::text"), ("blank", "' '::text"),
        ("1MB", f"repeat('x', {MB})"), ("unicode", "'é🙂'::text"),
        ("quote", "$q$x'; SELECT 1; --$q$::text"), ("internal queue", "'queue_ext.callbacks'::text"),
    ],
    "integer": [("NULL", "NULL::integer"), ("0", "0"), ("-1", "-1"),
                ("int4 max", "2147483647"), ("int4 min", "(-2147483648)::integer")],
    "bigint": [("NULL", "NULL::bigint"), ("0", "0::bigint"), ("-1", "(-1)::bigint"),
               ("int8 max", "9223372036854775807::bigint")],
    "real": [("NULL", "NULL::real"), ("NaN", "'NaN'::real"), ("Infinity", "'Infinity'::real"),
             ("-Infinity", "'-Infinity'::real"), ("-1", "(-1)::real"), ("1e38", "1e38::real")],
    "double precision": [("NULL", "NULL::float8"), ("NaN", "'NaN'::float8"),
                         ("Infinity", "'Infinity'::float8"), ("-1", "(-1)::float8")],
    "boolean": [("NULL", "NULL::boolean"), ("true", "true"), ("false", "false")],
    "interval": [
        ("NULL", "NULL::interval"), ("0", "'0'::interval"), ("-1 day", "'-1 day'::interval"),
        ("1 microsecond", "'1 microsecond'::interval"),
        ("1000000 years", "'1000000 years'::interval"),
        ("178000000 years", "'178000000 years'::interval"),
        ("-178000000 years", "'-178000000 years'::interval"),
    ],
    "timestamp with time zone": [
        ("NULL", "NULL::timestamptz"), ("infinity", "'infinity'::timestamptz"),
        ("-infinity", "'-infinity'::timestamptz"), ("294276-01-01", "'294276-01-01'::timestamptz"),
        ("4713 BC", "'4713-01-01 BC'::timestamptz"), ("epoch", "'epoch'::timestamptz"),
    ],
    "jsonb": [
        ("NULL", "NULL::jsonb"), ("json null", "'null'::jsonb"), ("array", "'[]'::jsonb"),
        ("number", "'1'::jsonb"), ("string", "'\"x\"'::jsonb"),
        ("10000-deep array", "(repeat('[', 10000) || repeat(']', 10000))::jsonb"),
        ("10000-deep object", "(repeat('{\"a\":', 10000) || '1' || repeat('}', 10000))::jsonb"),
        ("1MB object", f"jsonb_build_object('x', repeat('x', {MB}))"),
        ("object of non-strings", "'{\"a\": [1, {\"b\": null}]}'::jsonb"),
    ],
    "uuid": [
        ("NULL", "NULL::uuid"), ("nil", "'00000000-0000-0000-0000-000000000000'::uuid"),
        ("unknown", "gen_random_uuid()"), ("invalid", "'not-a-uuid'::uuid"),
    ],
    "uuid[]": [
        ("NULL", "NULL::uuid[]"), ("empty", "'{}'::uuid[]"), ("{NULL}", "'{NULL}'::uuid[]"),
        ("{nil}", "ARRAY['00000000-0000-0000-0000-000000000000']::uuid[]"),
        ("2-D", "ARRAY[[gen_random_uuid()], [gen_random_uuid()]]"),
        (f"{BIG} ids", f"ARRAY(SELECT gen_random_uuid() FROM generate_series(1, {BIG}))"),
    ],
    "text[]": [
        ("NULL", "NULL::text[]"), ("empty", "'{}'::text[]"), ("{NULL}", "'{NULL}'::text[]"),
        ("{''}", "ARRAY['']::text[]"), ("2-D", "ARRAY[['a'], ['b']]::text[]"),
        ("{1MB}", f"ARRAY[repeat('x', {MB})]"),
        (f"{BIG} names", f"ARRAY(SELECT 'q' || g FROM generate_series(1, {BIG}) g)"),
    ],
    "jsonb[]": [
        ("NULL", "NULL::jsonb[]"), ("empty", "'{}'::jsonb[]"), ("{NULL}", "ARRAY[NULL]::jsonb[]"),
        ("{[]}", "ARRAY['[]']::jsonb[]"), ("{null}", "ARRAY['null']::jsonb[]"),
        ("2-D", "ARRAY[['{}'], ['{}']]::jsonb[]"),
        ("{10000-deep}", "ARRAY[(repeat('{\"a\":', 10000) || '1' || repeat('}', 10000))::jsonb]"),
        (f"{BIG} payloads", f"array_fill('{{}}'::jsonb, ARRAY[{BIG}])"),
    ],
}

# Extra values for parameters whose meaning invites more than their type's.
CRON = [("cron: words", "'not a cron'"), ("cron: 61st minute", "'61 * * * *'"),
        ("cron: 4 fields", "'* * * *'"), ("cron: 7 fields", "'* * * * * * *'"),
        ("cron: seconds", "'2 seconds'"), ("cron: 1MB", f"repeat('* ', {MB // 2})")]
URLS = [("url: no host", "'http://'"), ("url: ftp", "'ftp://example.com/'"),
        ("url: javascript", "'javascript:alert(1)'"), ("url: hex ip", "'http://0x7f000001/'"),
        ("url: creds", "'http://user:pass@example.com/?token=x'")]
EXTRA_BY_NAME = {"dedupe_key": [("3 kB random", "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 100) g)")],
                 "schedule": CRON, "webhook_url": URLS, "callback_url": URLS,
                 "webhook_method": [("method: TRACE", "'TRACE'"), ("method: lower", "'post'")],
                 "priority": [("priority: bogus", "'urgent'")]}

# Values that are not merely odd but absurd for a setting: each must be refused by a check
# naming the setting (22023), not stored to break a later claim or retry, nor left to
# overflow a timestamp (22008) inside the function.
ABSURD = {
    "backoff_base": {"1000000 years", "178000000 years", "-1 day", "-178000000 years"},
    "backoff_cap": {"1000000 years", "178000000 years", "-1 day", "-178000000 years"},
    "lease_duration": {"1000000 years", "178000000 years", "-1 day", "-178000000 years", "0"},
    "lease": {"1000000 years", "178000000 years", "-1 day", "-178000000 years"},
    "extend": {"1000000 years", "178000000 years", "-1 day", "-178000000 years"},
    "delay": {"1000000 years", "178000000 years", "-1 day", "-178000000 years"},
    "retry_in": {"1000000 years", "178000000 years", "-1 day", "-178000000 years"},
    "webhook_timeout": {"1000000 years", "178000000 years", "-1 day"},
    "run_at": {"infinity", "-infinity"},
}


# A crash, or one of our background workers ending (the dispatcher dies on an error it did
# not isolate), in the server log.
BAD_LOG = re.compile(r'terminated by signal|PANIC|was terminated|background worker "queue_ext[^"]*" \(PID \d+\) exited'
                     r'|queue_ext dispatcher.* stopped')


@dataclass
class Func:
    oid: int
    name: str
    signature: str
    arg_names: list
    arg_types: list
    required: int
    returns_trigger: bool
    granted: list  # our roles with EXECUTE, least privileged first


@dataclass
class Outcome:
    role: str
    func: Func
    param: str
    label: str
    sqlstate: str | None  # None: no error
    message: str
    seconds: float
    args: dict



@pytest.fixture(scope="module")
def cluster():
    c = Cluster("fuzz", 25541, ["max_connections = 50", "queue_ext.http_allowlist = '127.0.0.1'"])
    c.start(fresh=True)
    yield c
    c.stop()


def public_functions(conn) -> list[Func]:
    """Every function of schema queue_ext not starting with '_' and granted to one of our
    roles (what a client can call), with its IN parameters in order."""
    rows = conn.execute(
        """
        SELECT p.oid, p.proname, p.oid::regprocedure::text,
               ARRAY(SELECT coalesce(a.n, '$' || a.i)
                       FROM unnest(coalesce(p.proargnames, array_fill(NULL::text, ARRAY[p.pronargs])),
                                   coalesce(p.proargmodes, array_fill('i'::"char", ARRAY[p.pronargs])))
                            WITH ORDINALITY AS a(n, m, i)
                      WHERE a.m IN ('i', 'b', 'v') ORDER BY a.i),
               ARRAY(SELECT format_type(t.t, NULL) FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY AS t(t, i)
                      ORDER BY t.i),
               p.pronargs - p.pronargdefaults,
               p.prorettype = 'trigger'::regtype,
               ARRAY(SELECT r FROM unnest(%s::text[]) WITH ORDINALITY AS g(r, i)
                      WHERE has_function_privilege(r, p.oid, 'EXECUTE') ORDER BY g.i)
          FROM pg_proc p
         -- Procedures (wait_for_jobs) commit before they wait, so they cannot run inside this
         -- harness's rolled-back transactions: tests/test_wait_for_jobs.py covers their arguments.
         WHERE p.pronamespace = 'queue_ext'::regnamespace AND p.proname !~ '^_' AND p.prokind <> 'p'
         ORDER BY p.proname, p.oid""", [list(ROLES)]).fetchall()
    return [Func(*r) for r in rows if r[7]]


def build_fixture(c) -> dict:
    """A plain queue with a queued, a running and a dead job (all the producer's), a webhook
    queue, a rate limit key: the valid values the fuzz holds the other arguments at."""
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")
        for role, login in LOGIN.items():
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(sql.Identifier(login), sql.Identifier(role)))
        # What an operator grants an admin who schedules jobs (pg_cron's schema is closed).
        conn.execute("GRANT USAGE ON SCHEMA cron TO fuzz_admin")
        conn.execute("SELECT queue_ext.create_queue('fuzzq', backoff_base => '1 hour')")
        conn.execute("SELECT queue_ext.create_queue('fuzzdead', max_attempts => 1)")
        conn.execute("SELECT queue_ext.create_queue('fuzzempty')")
        conn.execute("SELECT queue_ext.schedule_job('fuzz-schedule', '*/5 * * * *', 'fuzzq')")
        # Port 9 on loopback: nothing listens, and the SSRF guard refuses loopback anyway.
        conn.execute("SELECT queue_ext.create_queue('fuzzhook', webhook_url => 'http://127.0.0.1:9/hook')")
        conn.execute("SELECT queue_ext.pause_queue('fuzzhook')")
        conn.execute("SELECT queue_ext.set_rate_limit('fuzzkey', 10, '1 second')")
        conn.execute("SET ROLE fuzz_producer")
        queued = conn.execute("SELECT queue_ext.enqueue_job('fuzzq', '{\"n\": 1}', priority => 'low')").fetchone()[0]
        running = conn.execute("SELECT queue_ext.enqueue_job('fuzzq', '{\"n\": 2}', priority => 'critical')").fetchone()[0]
        dead = conn.execute("SELECT queue_ext.enqueue_job('fuzzdead', '{\"n\": 3}')").fetchone()[0]
        conn.execute("SET ROLE fuzz_worker")
        job, token = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('fuzzq', 'w1', '1 hour')").fetchone()
        assert job == running
        dj, dt = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('fuzzdead', 'w1')").fetchone()
        conn.execute("SELECT queue_ext.fail_job(%s, 'boom', %s, permanent => true)", [dj, dt])
        conn.execute("SET ROLE fuzz_producer")
        completed = conn.execute("SELECT queue_ext.enqueue_job('fuzzq', '{\"n\": 4}', priority => 'high')").fetchone()[0]
        conn.execute("SET ROLE fuzz_worker")
        cj, ct = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('fuzzq', 'w1')").fetchone()
        assert cj == completed
        conn.execute("SELECT queue_ext.complete_job(%s, '{}', %s)", [cj, ct])
        conn.execute("RESET ROLE")
        # Enqueued by the superuser: another role's job for the producer.
        foreign = conn.execute("SELECT queue_ext.enqueue_job('fuzzq', '{\"n\": 5}', priority => 'low')").fetchone()[0]
        states = {k: conn.execute("SELECT status::text FROM queue_ext.job_status(%s)", [v]).fetchone()[0]
                  for k, v in (("dead", dead), ("completed", completed), ("running", running), ("queued", queued))}
        assert states == {"dead": "dead", "completed": "completed", "running": "running", "queued": "queued"}, states
    return {"queued": queued, "running": running, "token": token, "dead": dead, "completed": completed,
            "foreign": foreign}


def job_values(fx: dict) -> dict[str, list]:
    """Real job ids in every state as hostile values: each function taking a job id meets
    jobs in the states it does not expect, and another role's job."""
    ids = [(k, fx[k]) for k in ("queued", "running", "dead", "completed", "foreign")]
    return {
        "uuid": [(f"{k} job", f"'{v}'::uuid") for k, v in ids] + [("running job's token", f"'{fx['token']}'::uuid")],
        "uuid[]": [("jobs in every state", "ARRAY[" + ", ".join(f"'{v}'" for _, v in ids) + "]::uuid[]"),
                   ("running job twice", f"ARRAY['{fx['running']}', '{fx['running']}']::uuid[]")],
    }


def valid_value(func: Func, name: str, typ: str, fx: dict) -> str | None:
    """A valid SQL expression for a parameter, or None to leave an optional one out."""
    lit = lambda v, t: f"'{v}'::{t}"  # noqa: E731 - fixture values only (uuids, names)
    job_for = {"cancel_job": fx["queued"], "job_status": fx["queued"], "retry_dead_job": fx["dead"]}
    queue_for = {"process_jobs": "fuzzhook", "create_queue": "fuzznew", "drop_queue": "fuzzempty"}
    by_name = {
        ("queue_name", "text"): lit(queue_for.get(func.name, "fuzzq"), "text"),
        ("queue_names", "text[]"): "ARRAY['fuzzq']",
        ("payload", "jsonb"): "'{\"ok\": true}'::jsonb",
        ("payloads", "jsonb[]"): "ARRAY['{\"ok\": true}']::jsonb[]",
        ("job_id", "uuid"): lit(job_for.get(func.name, fx["running"]), "uuid"),
        ("lease_token", "uuid"): lit(fx["token"], "uuid"),
        ("job_ids", "uuid[]"): f"ARRAY['{fx['running']}']::uuid[]",
        ("lease_tokens", "uuid[]"): f"ARRAY['{fx['token']}']::uuid[]",
        ("n", "integer"): "1", ("max_jobs", "integer"): "5", ("max_running", "integer"): "2",
        ("key", "text"): "'fuzzkey'", ("name", "text"): "'fuzz-schedule'",
        ("schedule", "text"): "'*/5 * * * *'", ("error", "text"): "'boom'",
        ("percent", "real"): "50::real", ("older_than", "interval"): "'30 days'::interval",
        ("reason", "text"): "'fuzz'",
    }
    if (name, typ) in by_name:
        return by_name[(name, typ)]
    if name.startswith("$"):
        raise AssertionError(f"{func.signature}: unnamed parameter {name}; name it or teach this test its valid value")
    return None


def call_sql(func: Func, args: dict[str, str]) -> str:
    named = ", ".join(f"{n} => {e}" for n, e in args.items())
    return f"SELECT 1 FROM queue_ext.{func.name}({named}) AS r"


def run_one(cluster, state: dict, role: str | None, func: Func, sql_text: str) -> tuple[str | None, str, float]:
    """Runs one call in its own rolled-back transaction; returns (sqlstate, message, seconds).
    sqlstate 'CRASH' when the connection did not survive it."""
    conn = state.get("conn")
    if conn is None or conn.closed:
        cluster.wait_ready()
        conn = state["conn"] = cluster.connect()
    t0 = time.monotonic()
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'")
            if role:
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            conn.execute(sql_text).fetchall()
        return None, "", time.monotonic() - t0
    except psycopg.Error as e:
        if conn.closed or conn.broken:
            state["conn"] = None
            return "CRASH", str(e), time.monotonic() - t0
        return e.sqlstate, (e.diag.message_primary or ""), time.monotonic() - t0


def cases(func: Func, fx: dict):
    """(param, label, args) for each hostile value of each parameter, one at a time."""
    base = {}
    for i, (n, t) in enumerate(zip(func.arg_names, func.arg_types)):
        v = valid_value(func, n, t, fx)
        if v is None and i < func.required:
            raise AssertionError(f"{func.signature}: no valid value for required parameter {n} {t}; add one to valid_value()")
        if v is not None:
            base[n] = v
    yield "(all valid)", "valid", dict(base)
    for n, t in zip(func.arg_names, func.arg_types):
        values = HOSTILE.get(t)
        if values is None:
            raise AssertionError(f"{func.signature}: no hostile values for type {t}; add them to HOSTILE")
        for label, expr in values + EXTRA_BY_NAME.get(n, []) + job_values(fx).get(t, []):
            args = dict(base)
            args[n] = expr
            yield n, label, args


@pytest.fixture(scope="module")
def fuzz(cluster):
    fx = build_fixture(cluster)
    with cluster.connect() as conn:
        funcs = public_functions(conn)
    log_start = (cluster.dir / "server.log").stat().st_size
    state: dict = {}
    outcomes: list[Outcome] = []
    t0 = time.monotonic()
    for func in funcs:
        if func.returns_trigger:
            continue  # called by the executor only; covered by test_trigger_function_arguments
        # The superuser, then each of our roles holding EXECUTE.
        for role in (None, *(LOGIN[r] for r in func.granted)):
            for param, label, args in cases(func, fx):
                st, msg, secs = run_one(cluster, state, role, func, call_sql(func, args))
                outcomes.append(Outcome(role or "postgres", func, param, label, st, msg, secs, args))
    if state.get("conn"):
        state["conn"].close()
    elapsed = time.monotonic() - t0
    log = (cluster.dir / "server.log").read_text(errors="replace")[log_start:]
    return {"funcs": funcs, "outcomes": outcomes, "elapsed": elapsed, "log": log, "fixture": fx}


def describe(o: Outcome) -> str:
    msg = o.message if len(o.message) < 160 else o.message[:157] + "..."
    return f"{o.role:14} {o.func.signature[:60]:60} {o.param}={o.label}: {o.sqlstate or 'accepted'} {msg!r} ({o.seconds:.2f} s)"


def test_every_public_function_is_covered(fuzz):
    called = {o.func.signature for o in fuzz["outcomes"]}
    funcs = fuzz["funcs"]
    print(f"\n{len(fuzz['outcomes'])} calls over {len(called)} functions in {fuzz['elapsed']:.1f} s")
    assert len(funcs) >= 30, "the catalogue query found too few functions: is the extension installed?"
    for f in funcs:
        assert f.returns_trigger or f.signature in called, f"{f.signature} was not called"
    # Each granted function was also called by a role holding it, not only by the superuser.
    for f in funcs:
        if not f.returns_trigger:
            assert any(o.func.signature == f.signature and o.role == LOGIN[f.granted[0]] for o in fuzz["outcomes"])
    # The all-valid call is what every hostile call is measured against: it must work.
    broken = [describe(o) for o in fuzz["outcomes"] if o.label == "valid" and o.sqlstate is not None]
    assert not broken, "calls with only valid arguments failed (fix the fixture):\n" + "\n".join(broken)


def test_no_internal_error_crash_hang_or_empty_message(cluster, fuzz):
    bad = []
    for o in fuzz["outcomes"]:
        if o.sqlstate == "CRASH":
            bad.append("CRASH   " + describe(o))
        elif o.sqlstate == "XX000":
            bad.append("XX000   " + describe(o))
        elif o.sqlstate == "57014":
            bad.append("TIMEOUT " + describe(o))
        elif o.sqlstate is not None and not o.message.strip():
            bad.append("NO MSG  " + describe(o))
        elif o.sqlstate is not None and o.sqlstate[:2] in ("58", "F0", "P0"):
            # P0001: a RAISE without an ERRCODE; 58/F0: system and configuration errors.
            bad.append("SQLSTATE" + describe(o))
        elif o.sqlstate is not None and (o.sqlstate.startswith("23") or o.sqlstate in ("22003", "22008")
                                         or "index row" in o.message):
            # A table constraint, or an overflow in the function's own arithmetic, caught what
            # a check should have refused with a message naming the argument.
            bad.append("UNCHECKED " + describe(o))
    signals = [line for line in fuzz["log"].splitlines() if BAD_LOG.search(line)]
    bad += [f"SERVER LOG: {line}" for line in signals]
    assert not bad, f"{len(bad)} violations:\n" + "\n".join(bad)


def test_absurd_settings_are_refused(fuzz):
    """An interval or time no one means (a million years, negative, infinity) given where it
    becomes a lease, a backoff, a delay or a run time must be refused when given, not stored
    to make a later claim or retry fail."""
    bad = []
    for o in fuzz["outcomes"]:
        if o.label in ABSURD.get(o.param, ()) and o.sqlstate != "22023":
            bad.append(describe(o))
    assert not bad, f"{len(bad)} absurd values not refused with 22023:\n" + "\n".join(bad)


def test_trigger_function_arguments(cluster, fuzz):
    """enqueue_trigger() takes its arguments from CREATE TRIGGER, and its payload from the
    row: hostile ones fail the writing statement (a producer's) with a clear error, never
    XX000; the same trigger with a real queue enqueues."""
    bad = []
    triggers = [(f"arg {a!r:.30}", "AFTER INSERT", "FOR EACH ROW", sql.Literal(a))
                for a in ["", "no-such-queue", "queue_ext.callbacks", "x" * 10000, "fuzzq', 'extra", "fuzzdead"]]
    triggers += [("no argument", "AFTER INSERT", "FOR EACH ROW", sql.SQL("")),
                 ("two arguments", "AFTER INSERT", "FOR EACH ROW", sql.SQL("'fuzzq', 'fuzzq'")),
                 ("statement level", "AFTER INSERT", "FOR EACH STATEMENT", sql.Literal("fuzzq")),
                 ("before", "BEFORE INSERT", "FOR EACH ROW", sql.Literal("fuzzq")),
                 ("after truncate", "AFTER TRUNCATE", "FOR EACH STATEMENT", sql.Literal("fuzzq"))]
    rows = {"1MB row": f"repeat('x', {MB})", "NULL row": "NULL"}
    with cluster.connect() as conn:
        conn.execute("CREATE TABLE fuzz_t (v text)")
        conn.execute("GRANT INSERT, TRUNCATE ON fuzz_t TO fuzz_producer")
        for label, when, level, args in triggers:
            for row_label, row in rows.items():
                try:
                    with conn.transaction(force_rollback=True):
                        conn.execute(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'")
                        conn.execute(sql.SQL("CREATE TRIGGER fuzz_tr {} ON fuzz_t {} EXECUTE FUNCTION queue_ext.enqueue_trigger({})")
                                     .format(sql.SQL(when), sql.SQL(level), args))
                        conn.execute("SET LOCAL ROLE fuzz_producer")
                        conn.execute("TRUNCATE fuzz_t" if "TRUNCATE" in when else f"INSERT INTO fuzz_t VALUES ({row})")
                    if label in ("before", "statement level", "after truncate", "no argument"):
                        # A BEFORE trigger returning NULL would drop the row silently.
                        bad.append(f"trigger {label}, {row_label}: accepted, want 22023")
                except psycopg.Error as e:
                    if e.sqlstate in (None, "XX000", "57014") or e.sqlstate.startswith(("58", "P0")) \
                            or not (e.diag.message_primary or "").strip():
                        bad.append(f"trigger {label}, {row_label}: {e.sqlstate} {e.diag.message_primary!r}")
        # The control: a real queue, a row-level AFTER trigger, the producer writing.
        with conn.transaction(force_rollback=True):
            conn.execute("CREATE TRIGGER fuzz_tr AFTER INSERT ON fuzz_t FOR EACH ROW EXECUTE FUNCTION queue_ext.enqueue_trigger('fuzzq')")
            conn.execute("SET LOCAL ROLE fuzz_producer")
            conn.execute("INSERT INTO fuzz_t VALUES ('control')")
            conn.execute("RESET ROLE")
            assert conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE payload->'record'->>'v' = 'control'"
                                " AND enqueued_by = 'fuzz_producer'").fetchone()[0] == 1
        conn.execute("DROP TABLE fuzz_t")
    assert not bad, "\n".join(bad)


# Functions whose accepted values are stored, and then read by every later claim, retry and
# report: (the parameter that names what they store, how to use it in an enqueue).
STORING = {"create_queue": "queue_name", "alter_queue": "queue_name", "enqueue_job": "queue_name",
           "enqueue_jobs": "queue_name", "set_rate_limit": "key", "set_concurrency_limit": "key"}


def test_accepted_values_do_not_break_later_work(cluster, fuzz):
    """Every value a storing function accepted is committed for real (into a queue or key of
    its own), then the work that reads it runs: claims, a failure and its backoff, a
    completion, job_status, the reports. None of it may fail: a value that is accepted must
    not turn every later claim or retry into an error."""
    accepted = [o for o in fuzz["outcomes"] if o.sqlstate is None and o.role == "postgres"
                and o.func.name in STORING and o.param != STORING[o.func.name] and str(BIG) not in o.label]
    assert len(accepted) > 50, "too few accepted calls to replay: did the fuzz run?"
    bad, slow = [], []
    log_start = (cluster.dir / "server.log").stat().st_size
    with cluster.connect() as conn:
        conn.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")

        def run(what, query, params=()):
            t0 = time.monotonic()
            try:
                return conn.execute(query, params).fetchall()
            except psycopg.Error as e:
                if conn.broken:
                    raise AssertionError(f"connection lost on {what}: {e}\n" + "\n".join(bad))
                bad.append(f"{origin[0]}\n      then {what}: {e.sqlstate} {e.diag.message_primary!r}")
                return None
            finally:
                if time.monotonic() - t0 > 0.3:
                    slow.append(f"{time.monotonic() - t0:.2f} s {what} after {origin[0]}")

        origin = [""]
        for i, o in enumerate(accepted):
            origin[0] = describe(o)
            queue, key = f"fuzzstored{i}", f"fuzzstored{i}"
            args = dict(o.args)
            extra = ""
            if o.func.name == "create_queue":
                args["queue_name"] = f"'{queue}'"
            else:
                # Every other queue without routine history: completions take another path.
                run("create_queue", "SELECT queue_ext.create_queue(%s, backoff_base => '0', keep_history => %s)",
                    [queue, i % 2 == 0])
                if o.func.name in ("alter_queue", "enqueue_job", "enqueue_jobs"):
                    args["queue_name"] = f"'{queue}'"
                else:
                    args["key"] = f"'{key}'"
                    extra = ", rate_limit_key => %s" if o.func.name == "set_rate_limit" else ", concurrency_key => %s"
            if run(o.func.name + " (committed)", call_sql(o.func, args).replace("SELECT 1 FROM", "SELECT * FROM")) is None:
                continue
            params = [queue, key] if extra else [queue]
            run("enqueue_job", f"SELECT queue_ext.enqueue_job(%s, '{{}}', max_attempts => 3{extra})", params)
            for step in range(3):
                claimed = run(f"claim {step + 1}", "SELECT job_id, lease_token FROM queue_ext.get_next_jobs(%s, 10, 'fuzz')", [queue]) or []
                for job, token in claimed:
                    if step == 0:
                        run("fail_job (retry with backoff)", "SELECT queue_ext.fail_job(%s, 'boom', %s)", [job, token])
                    else:
                        run("heartbeat", "SELECT queue_ext.heartbeat(%s, %s)", [job, token])
                        run("complete_job", "SELECT queue_ext.complete_job(%s, '{}', %s)", [job, token])
            for (job,) in run("list jobs", "SELECT id FROM queue_ext.job_queue WHERE queue_name = %s", [queue]) or []:
                run("job_status", "SELECT * FROM queue_ext.job_status(%s)", [job])
        # The reports read every queue at once: once, over all the stored values, then each
        # queue is dropped with whatever it still holds.
        origin[0] = f"all {len(accepted)} stored values"
        for report in ("queue_stats()", "health()", "worker_health()", "list_limits()", "list_queues()",
                       "cleanup_stuck_jobs()", "dispatcher_status()"):
            run(report, f"SELECT * FROM queue_ext.{report}")
        for i, o in enumerate(accepted):
            run("drop_queue", "SELECT queue_ext.drop_queue(%s, force => true)", [f"fuzzstored{i}"])
    time.sleep(1)  # the dispatcher's turn at the stored webhook settings
    log = (cluster.dir / "server.log").read_text(errors="replace")[log_start:]
    bad += [f"SERVER LOG: {line}" for line in log.splitlines() if BAD_LOG.search(line)]
    print(f"\n{len(accepted)} accepted values committed and worked through; slow steps:")
    print("\n".join(slow[:20]))
    assert not bad, f"{len(bad)} accepted values broke later work:\n" + "\n".join(bad)


class Receiver(http.server.BaseHTTPRequestHandler):
    """Answers 200 to anything, counting the requests."""
    count = 0

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        Receiver.count += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_accepted_payloads_are_delivered(cluster, fuzz):
    """Every enqueue the fuzz saw accepted, committed into a webhook queue: the dispatcher
    delivers each job that is due (1 MB and 10,000-deep payloads, odd keys and priorities
    included) and survives all of them, the same process throughout. The same for every
    accepted result and error, sent on as callbacks."""
    accepted = [o for o in fuzz["outcomes"] if o.sqlstate is None and o.role == "postgres"
                and o.func.name in ("enqueue_job", "enqueue_jobs") and o.param != "queue_name"
                and str(BIG) not in o.label]
    assert len(accepted) > 20
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 25546), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    bad = []
    try:
        with cluster.connect() as conn:
            conn.execute("SELECT queue_ext.create_queue('fuzzdeliver', webhook_url => 'http://127.0.0.1:25546/in', "
                         "max_attempts => 2, backoff_base => '0')")
            before = dispatcher_pid(conn)
            assert before, "a dispatcher serves the fuzz database"
            for o in accepted:
                args = dict(o.args, queue_name="'fuzzdeliver'")
                try:
                    conn.execute(call_sql(o.func, args))
                except psycopg.Error as e:
                    bad.append(f"{describe(o)}\n      then committed into a webhook queue: {e.sqlstate} {e.diag.message_primary!r}")

            def settled():
                return conn.execute("""SELECT count(*) = 0 FROM queue_ext.job_queue WHERE queue_name = 'fuzzdeliver'
                                       AND run_at <= now() AND status IN ('queued', 'retrying', 'running')""").fetchone()[0]
            try:
                wait_for(settled, timeout=30, what="every due job of fuzzdeliver delivered")
            except AssertionError as e:
                stuck = conn.execute("""SELECT id, status::text, attempt, left(last_error, 120) FROM queue_ext.job_queue
                                        WHERE queue_name = 'fuzzdeliver' AND run_at <= now()""").fetchall()
                bad.append(f"{e}: {stuck[:10]}")
            delivered = conn.execute("SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = 'fuzzdeliver' AND status = 'completed'").fetchone()[0]
            dead = conn.execute("SELECT id, reason FROM queue_ext.job_dead_letter WHERE queue_name = 'fuzzdeliver'").fetchall()
            bad += [f"dead letter {d[0]}: {d[1]}" for d in dead]
            if dispatcher_pid(conn) != before:
                bad.append(f"the dispatcher changed: pid {before} -> {dispatcher_pid(conn)}")
            print(f"\n{len(accepted)} accepted enqueues; {delivered} jobs delivered, {Receiver.count} requests received")
            assert delivered > 20 and Receiver.count >= delivered

            # Callbacks carry what workers report: every accepted result and error, as a
            # completion or a failure of a job of a queue with a callback_url.
            reports = [o for o in fuzz["outcomes"] if o.sqlstate is None and o.role == "postgres"
                       and (o.func.name, o.param) in (("complete_job", "result"), ("fail_job", "error"))]
            assert len(reports) > 5
            conn.execute("SELECT queue_ext.create_queue('fuzzcb', callback_url => 'http://127.0.0.1:25546/cb')")
            received = Receiver.count
            for o in reports:
                job = conn.execute("SELECT queue_ext.enqueue_job('fuzzcb', '{}')").fetchone()[0]
                got, token = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('fuzzcb', 'fuzz')").fetchone()
                assert got == job
                args = dict(o.args, job_id=f"'{job}'::uuid", lease_token=f"'{token}'::uuid")
                if o.func.name == "fail_job":
                    args["permanent"] = "true"
                try:
                    conn.execute(call_sql(o.func, args))
                except psycopg.Error as e:
                    bad.append(f"{describe(o)}\n      then committed on a queue with callbacks: {e.sqlstate} {e.diag.message_primary!r}")

            def callbacks_sent():
                return conn.execute("""SELECT count(*) = 0 FROM queue_ext.job_queue WHERE queue_name = 'queue_ext.callbacks'
                                       AND payload->>'queue' = 'fuzzcb'
                                       AND status IN ('queued', 'retrying', 'running')""").fetchone()[0]
            try:
                wait_for(callbacks_sent, timeout=30, what="every callback sent")
            except AssertionError as e:
                bad.append(str(e))
            # (Callbacks of other tests' queues, to URLs the SSRF guard refuses, may be dead.)
            dead = conn.execute("SELECT id, reason FROM queue_ext.job_dead_letter WHERE queue_name = 'queue_ext.callbacks' "
                                "AND payload->>'queue' = 'fuzzcb'").fetchall()
            bad += [f"callback dead-lettered {d[0]}: {d[1]}" for d in dead]
            sent = conn.execute("SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = 'queue_ext.callbacks' "
                                "AND payload->>'queue' = 'fuzzcb' AND status = 'completed'").fetchone()[0]
            if sent != len(reports):
                bad.append(f"{len(reports)} jobs finished on a queue with a callback_url, {sent} callbacks completed")
            print(f"{len(reports)} accepted results and errors; {Receiver.count - received} callbacks received")
            if Receiver.count - received < len(reports):
                bad.append(f"{len(reports)} jobs finished on a queue with a callback_url, {Receiver.count - received} callbacks received")
            if dispatcher_pid(conn) != before:
                bad.append(f"the dispatcher changed: pid {before} -> {dispatcher_pid(conn)}")
    finally:
        server.shutdown()
    assert not bad, "\n".join(bad)


def test_stored_error_text_is_bounded(cluster, fuzz):
    """A worker's error is stored with every attempt (the row's errors, its history, its
    callback): a 1 MB one is cut, so that retries cannot grow a job by megabytes each."""
    with cluster.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue('fuzzerrors', backoff_base => '0', max_attempts => 5)")
        job = conn.execute("SELECT queue_ext.enqueue_job('fuzzerrors', '{}')").fetchone()[0]
        for _ in range(3):
            got, token = conn.execute("SELECT job_id, lease_token FROM queue_ext.get_next_job('fuzzerrors', 'fuzz')").fetchone()
            assert got == job
            conn.execute(f"SELECT queue_ext.fail_job(%s, repeat(md5(random()::text), {MB // 32}), %s)", [job, token])
        last, errors = conn.execute("SELECT length(last_error), octet_length(errors::text) FROM queue_ext.job_queue "
                                    "WHERE id = %s", [job]).fetchone()
        history = conn.execute("SELECT max(length(error)) FROM queue_ext.job_status_history WHERE job_id = %s", [job]).fetchone()[0]
        assert last <= 10000 and history <= 10000 and errors < 3 * 11000, (last, history, errors)
        conn.execute("SELECT queue_ext.drop_queue('fuzzerrors', force => true)")


def test_print_summary(fuzz):
    """Not a check: what each function answered, by SQLSTATE, for the record (-s to see)."""
    by_func: dict[str, dict[str, int]] = {}
    for o in fuzz["outcomes"]:
        d = by_func.setdefault(o.func.signature, {})
        d[o.sqlstate or "ok"] = d.get(o.sqlstate or "ok", 0) + 1
    slow = sorted(fuzz["outcomes"], key=lambda o: -o.seconds)[:5]
    print()
    for sig, d in sorted(by_func.items()):
        print(f"{re.sub(r'queue_ext.', '', sig)[:70]:70} " + " ".join(f"{k}:{v}" for k, v in sorted(d.items())))
    print("slowest calls:")
    for o in slow:
        print("  " + describe(o))
