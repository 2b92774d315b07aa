"""One library, two databases whose SQL is at different versions, served at the same time: a
database not yet updated takes the dispatcher's claims and outcomes as JSON documents (0.9.0)
or as typed rows without claims ahead of free request slots (0.11.0), one at this version as
typed rows with them. Each dispatcher asks its own database which it has. Both deliver every job once, retries included, and store each response;
a database updated in the middle of a burst switches without losing or repeating a job and
without a warning."""
import re
import shutil
import subprocess
import threading
from collections import Counter

import psycopg
import pytest

from pgcluster import PG_CONFIG, ROOT, Cluster, wait_for
from sink import Reply, Sink
from test_package import VERSION

OLD_DB = "dispatch_old"
JOBS = 300
RETRIED = 5


# The last release whose dispatcher takes claims and outcomes as JSON (0.10.0 brought the
# typed rows), and the last whose claim cannot take jobs ahead of free request slots: the
# old protocols a newer library must still serve.
PREVIOUS = ["0.9.0", "0.11.0"]
CLAIM_AHEAD = "queue_ext._dispatch_claim_rows(text, integer, text[], integer[], text, interval, text[])"


@pytest.fixture(scope="module")
def cluster():
    # The released install scripts, so that a database can start at the previous version.
    extdir = subprocess.run([PG_CONFIG, "--sharedir"], capture_output=True, text=True,
                            check=True).stdout.strip() + "/extension"
    for script in (ROOT / "sql" / "released").glob("queue_ext--*.sql"):
        shutil.copy(script, extdir)
    c = Cluster("dispatch_protocols", 25582, ["queue_ext.http_allowlist = '127.0.0.1'",
                                              "queue_ext.poll_interval = '200ms'"])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    yield c
    c.stop()


def connect(cluster, dbname):
    return psycopg.connect(cluster.dsn.replace("dbname=postgres", f"dbname={dbname}"), autocommit=True)


def has(conn, signature):
    return conn.execute("SELECT to_regprocedure(%s) IS NOT NULL", [signature]).fetchone()[0]


def enqueue(conn, queue, n):
    return [str(r[0]) for r in conn.execute(
        "SELECT queue_ext.enqueue_jobs(%s, array_fill('{\"x\": 1}'::jsonb, ARRAY[%s]))", [queue, n]).fetchall()]


def archived(conn, queue):
    return conn.execute("SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = %s AND status = 'completed'",
                        [queue]).fetchone()[0]


def check_each_once(conn, sink, path, ids, retried):
    """Every job completed once with the response as its result; the sink saw each webhook-id
    once, or twice for the jobs it answered 503 first."""
    rows = conn.execute("SELECT id::text, attempt, result FROM queue_ext.job_archive WHERE id = ANY(%s::uuid[])",
                        [ids]).fetchall()
    assert len(rows) == len(ids)
    assert all(r[2]["status"] == 200 and r[2]["body"] == '{"ok": true}' for r in rows), rows[:3]
    seen = Counter(r.headers["webhook-id"] for r in sink.to(path))
    assert set(seen) == {f"msg_{i}" for i in ids}
    twice = {k for k, n in seen.items() if n == 2}
    assert len(twice) == retried and all(n <= 2 for n in seen.values()), seen.most_common(3)
    attempts = {r[0]: r[1] for r in rows}
    assert all(attempts[k.removeprefix("msg_")] == 2 for k in twice)
    log = dict(conn.execute("SELECT outcome, count(*) FROM queue_ext.webhook_deliveries "
                            "WHERE job_id = ANY(%s::uuid[]) GROUP BY outcome", [ids]).fetchall())
    assert log == ({"delivered": len(ids), "retry": retried} if retried else {"delivered": len(ids)})


@pytest.mark.parametrize("previous", PREVIOUS)
def test_old_and_new_databases_are_served_at_once_and_an_update_switches_mid_burst(cluster, previous):
    sink = Sink()
    log_start = (cluster.dir / "server.log").stat().st_size
    with cluster.connect() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {OLD_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {OLD_DB}")
    hooks = "hooks_" + previous.replace(".", "_")
    old, new = connect(cluster, OLD_DB), cluster.connect()
    try:
        old.execute(f"CREATE EXTENSION queue_ext VERSION '{previous}'")
        assert not has(old, CLAIM_AHEAD)
        assert has(new, CLAIM_AHEAD)
        assert not has(new, "queue_ext._dispatch_claim(text, integer, jsonb, text, interval)")
        for conn, path in ((old, "/old"), (new, "/new")):
            conn.execute("SELECT queue_ext.create_queue(%s, webhook_url => %s, webhook_max_in_flight => 50,"
                         " backoff_base => '1 second')", [hooks, sink.url + path])
            # The first few requests fail with 503: their outcomes take the one-by-one path.
            for _ in range(RETRIED):
                sink.script(path, Reply(status=503))
        ids = {}
        # Both databases' bursts at once.
        threads = [threading.Thread(target=lambda c=c, k=k: ids.__setitem__(k, enqueue(c, hooks, JOBS)))
                   for c, k in ((connect(cluster, OLD_DB), "old"), (cluster.connect(), "new"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: archived(old, hooks) == JOBS and archived(new, hooks) == JOBS, 90,
                 what="both databases' bursts delivered")
        check_each_once(old, sink, "/old", ids["old"], RETRIED)
        check_each_once(new, sink, "/new", ids["new"], RETRIED)

        # The old database updated while a burst is being delivered (each request takes a little
        # while, so many are in flight across the update).
        old.execute("SELECT queue_ext.create_queue('across', webhook_url => %s, webhook_max_in_flight => 10)",
                    [sink.url + "/across"])
        sink.default("/across", Reply(delay=0.05))
        across = enqueue(old, "across", JOBS)
        wait_for(lambda: len(sink.to("/across")) >= 20, 30, interval=0.005, what="the burst to be under way")
        old.execute("ALTER EXTENSION queue_ext UPDATE")
        assert old.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'").fetchone()[0] == VERSION
        assert has(old, CLAIM_AHEAD)
        assert archived(old, "across") < JOBS, "the update came after the burst"
        wait_for(lambda: archived(old, "across") == JOBS, 90, what="the burst across the update delivered")
        check_each_once(old, sink, "/across", across, 0)
    finally:
        old.close()
        new.close()
        sink.close()
    log = (cluster.dir / "server.log").read_text(errors="replace")[log_start:]
    trouble = [line for line in log.splitlines()
               if re.search(r"\b(ERROR|FATAL|PANIC|WARNING):|terminated by signal|exited with exit code", line)]
    assert not trouble, "\n".join(trouble)
