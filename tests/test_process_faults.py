"""Process faults on real clusters: the dispatcher and SQL workers terminated, kill -9 of the
dispatcher and of the postmaster mid-delivery, databases dropped and re-created, the extension
dropped and created, databases created after start-up, ALTER EXTENSION UPDATE with jobs in
flight. After each: nothing lost, nothing stuck, and a job sent twice only when its first
request may have reached the endpoint, then with the same webhook-id.

Dispatchers are found in pg_stat_activity (backend_type 'queue_ext dispatcher'): the process
that really runs, whatever the extension's own views say."""
import itertools
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from hostile_server import HostileServer
from pgcluster import PG_CONFIG, PGBIN, Cluster, dispatcher_pid, wait_for

ROOT = Path(__file__).resolve().parent.parent
CURRENT_VERSION = re.search(r'^version = "(.*)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)
PORT, PORT_NO_PRELOAD = 25531, 25532
# "about 2 s" promised; allow slack for a loaded 2-core machine, but not a poll of minutes.
BACK_WITHIN = 10  # the first restart delay is 1 s; the longest is 30 s
_names = itertools.count()


@pytest.fixture(scope="module")
def server():
    s = HostileServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def cluster():
    # Unset queue_ext.database: every database with the extension is served.
    c = Cluster("faults_proc", PORT, [
        "queue_ext.http_allowlist = '127.0.0.1/32'",
        "queue_ext.poll_interval = '200ms'",
        "queue_ext.http_timeout = '5s'",
        "queue_ext.shutdown_grace = '2s'",
    ], unset=("queue_ext.database",))
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    wait_dispatcher(c, "postgres")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def bare_cluster():
    """queue_ext installed but not preloaded: no launcher, no dispatcher, SQL only."""
    c = Cluster("faults_nopreload", PORT_NO_PRELOAD, ["shared_preload_libraries = 'pg_cron'"],
                unset=("queue_ext.database",))
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    yield c
    c.stop()


def dispatchers(cluster, db):
    with cluster.connect() as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'queue_ext dispatcher' AND datname = %s", [db])]


def wait_dispatcher(cluster, db, not_pid=None, timeout=20):
    """The pid of db's dispatcher, once there is exactly one (and it is not `not_pid`)."""
    def one():
        pids = dispatchers(cluster, db)
        return len(pids) == 1 and pids[0] != not_pid and pids[0]
    try:
        return wait_for(one, timeout, interval=0.1, what=f"a dispatcher for {db}")
    except AssertionError as e:
        raise AssertionError(f"{e}; dispatchers now {dispatchers(cluster, db)}\n{cluster.log_tail(30)}") from None


def hook_queue(conn, server, kind, **settings):
    name = f"p{next(_names)}"
    path = f"/{kind}/{name}"
    args = {"webhook_url": server.url + path, "backoff_base": "200 milliseconds", "backoff_cap": "1 second",
            **settings}
    named = ", ".join(f"{k} => %s" for k in args)
    conn.execute(f"SELECT queue_ext.create_queue(%s, {named})", [name, *args.values()])
    return name, path


def enqueue(conn, queue, payload="{}"):
    return str(conn.execute("SELECT queue_ext.enqueue_job(%s, %s::jsonb)", [queue, payload]).fetchone()[0])


def status(conn, job):
    return conn.execute("SELECT status::text, attempt, last_error FROM queue_ext.job_status(%s)", [job]).fetchone()


def wait_completed(cluster, db, jobs, timeout=30):
    """Every job completed (reconnecting across crash restarts)."""
    def all_done():
        try:
            with cluster.connect(dbname=db) as conn:
                states = {j: status(conn, j)[0] for j in jobs}
        except psycopg.OperationalError:
            return False
        wait_completed.last = states
        return all(s == "completed" for s in states.values())
    wait_completed.last = {}
    try:
        wait_for(all_done, timeout, interval=0.2, what=f"{len(jobs)} jobs completed")
    except AssertionError as e:
        stuck = {j: s for j, s in wait_completed.last.items() if s != "completed"}
        raise AssertionError(f"{e}; not completed: {stuck}") from None


def served(cluster, db, server, timeout=20):
    """A webhook job enqueued in db now is delivered and completed."""
    with cluster.connect(dbname=db) as conn:
        name, path = hook_queue(conn, server, "ok")
        job = enqueue(conn, name)
        try:
            wait_for(lambda: status(conn, job)[0] == "completed", timeout, what=f"a delivery in {db}")
        except AssertionError as e:
            raise AssertionError(f"{e}; job is {status(conn, job)}\n{cluster.log_tail(30)}") from None
    assert server.webhook_ids(path) == [f"msg_{job}"]


def check_sends(server, path, jobs, fault_at):
    """Each job reached the endpoint; a second send only for a job whose first request was
    in before the fault (it may have been received), with the same webhook-id; never a third."""
    wanted = {f"msg_{j}" for j in jobs}
    got = server.to(path)
    assert {r.webhook_id for r in got} == wanted, "every job sent, and nothing else"
    for job in jobs:
        sends = sorted(r.at for r in got if r.webhook_id == f"msg_{job}")
        assert len(sends) <= 2, f"{job} sent {len(sends)} times"
        if len(sends) == 2:
            assert sends[0] < fault_at, f"{job} sent twice though its first request came after the fault"


def drop_db(cluster, db):
    with cluster.connect() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def test_terminated_dispatcher_comes_back_and_loses_nothing(cluster, server):
    with cluster.connect() as conn:
        name, path = hook_queue(conn, server, "slow", webhook_max_in_flight=5)
        jobs = [enqueue(conn, name, f'{{"n": {i}}}') for i in range(15)]
        wait_for(lambda: server.attempts(path) >= 3, 10, what="requests in flight")
        old = wait_dispatcher(cluster, "postgres")
        assert dispatcher_pid(conn) == old, "dispatcher_status() names the process that runs"
        killed_at = time.time()
        assert conn.execute("SELECT pg_terminate_backend(%s)", [old]).fetchone()[0]
    new = wait_dispatcher(cluster, "postgres", not_pid=old, timeout=20)
    back_after = time.time() - killed_at
    assert back_after < BACK_WITHIN, f"the dispatcher came back after {back_after:.1f}s"
    wait_completed(cluster, "postgres", jobs)
    check_sends(server, path, jobs, killed_at)
    with cluster.connect() as conn:
        assert wait_for(lambda: dispatcher_pid(conn), 10, what="dispatcher_status") == new
        state = conn.execute("SELECT state FROM queue_ext.dispatcher_status() "
                             "WHERE database = current_database()").fetchone()[0]
        assert state == "running", state
    served(cluster, "postgres", server)


def claim(conn, queue, lease):
    return conn.execute("SELECT job_id::text, lease_token::text, attempt FROM queue_ext.get_next_job(%s, 'w', %s)",
                        [queue, lease]).fetchone()


@pytest.mark.parametrize("which", ["preloaded", "not_preloaded"])
def test_terminated_sql_worker_job_returns_through_a_claim(request, which):
    c = request.getfixturevalue("cluster" if which == "preloaded" else "bare_cluster")
    queue = f"plain{next(_names)}"
    with c.connect() as conn:
        conn.execute("SELECT queue_ext.create_queue(%s, backoff_base => '200 milliseconds', "
                     "backoff_cap => '1 second')", [queue])
        job = enqueue(conn, queue)
        if which == "not_preloaded":
            assert not dispatchers(c, "postgres"), "no dispatcher runs without preloading"
    worker = c.connect()
    worker_pid = worker.execute("SELECT pg_backend_pid()").fetchone()[0]
    claimed = claim(worker, queue, "2 seconds")
    assert claimed[0] == job
    with c.connect() as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", [worker_pid]).fetchone()[0]
        assert status(conn, job)[0] == "running", "the claim outlives its worker until the lease ends"
        # Nobody sweeps on the bare cluster: only a claim can hand the job out again.
        again = wait_for(lambda: claim(conn, queue, "30 seconds"), 20, interval=0.2,
                         what="the job claimed again after its lease")
        assert again[0] == job and again[1] != claimed[1] and again[2] > claimed[2], (claimed, again)
        # Fencing: the dead worker's token completes nothing.
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [job, claimed[1]])
        conn.execute("SELECT queue_ext.complete_job(%s, '{\"ok\": 1}', %s)", [job, again[1]])
        assert status(conn, job)[0] == "completed"
    worker.close()


def test_a_database_created_after_start_up_is_served(cluster, server):
    drop_db(cluster, "late")
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE late")
    with cluster.connect(dbname="late") as conn:
        conn.execute("CREATE EXTENSION queue_ext")
        t0 = time.time()
    wait_dispatcher(cluster, "late")
    assert time.time() - t0 < BACK_WITHIN
    served(cluster, "late", server)


def test_a_database_cloned_from_a_template_with_the_extension_is_served(cluster, server):
    drop_db(cluster, "clone")
    with cluster.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS tpl")
        conn.execute("CREATE DATABASE tpl")
    with cluster.connect(dbname="tpl") as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    with cluster.connect() as conn:
        # A template is copied, not served: its dispatcher leaves, so the copy can be made.
        conn.execute("ALTER DATABASE tpl IS_TEMPLATE true")
        wait_for(lambda: not dispatchers(cluster, "tpl"), 15, what="no dispatcher holding the template")

        def create_clone():
            try:
                conn.execute("CREATE DATABASE clone TEMPLATE tpl")
                return True
            except psycopg.errors.ObjectInUse:
                return False
        wait_for(create_clone, 15, interval=0.5, what="CREATE DATABASE clone TEMPLATE tpl")
    wait_dispatcher(cluster, "clone", timeout=20)
    served(cluster, "clone", server)
    with cluster.connect() as conn:
        conn.execute("ALTER DATABASE tpl IS_TEMPLATE false")
        conn.execute("DROP DATABASE tpl WITH (FORCE)")
    drop_db(cluster, "clone")


def test_drop_database_force_and_recreate_is_served_again(cluster, server):
    drop_db(cluster, "branch")
    for round_ in range(2):
        with cluster.connect() as conn:
            conn.execute("CREATE DATABASE branch")
        with cluster.connect(dbname="branch") as conn:
            conn.execute("CREATE EXTENSION queue_ext")
        wait_dispatcher(cluster, "branch")
        served(cluster, "branch", server)
        if round_ == 0:
            # What test suites and branch databases do: drop it while its dispatcher is connected.
            drop_db(cluster, "branch")
            wait_for(lambda: not dispatchers(cluster, "branch"), 10, what="the dropped database's dispatcher gone")
    drop_db(cluster, "branch")


def error_lines(cluster):
    text = (cluster.dir / "server.log").read_text(errors="replace")
    return [l for l in text.splitlines() if re.search(r"\b(FATAL|ERROR|PANIC):", l)]


def test_drop_extension_stops_its_dispatcher_quietly_and_create_serves_again(cluster, server):
    drop_db(cluster, "extdb")
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE extdb")
    with cluster.connect(dbname="extdb") as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    wait_dispatcher(cluster, "extdb")
    served(cluster, "extdb", server)
    with cluster.connect(dbname="extdb") as conn:
        conn.execute("DROP EXTENSION queue_ext CASCADE")
    wait_for(lambda: not dispatchers(cluster, "extdb"), 10, what="the dispatcher of extdb to stop")
    time.sleep(1)
    before = error_lines(cluster)
    time.sleep(5)  # the log must stay flat over this window (a restart loop would log each second)
    after = error_lines(cluster)
    assert after == before, "log lines while the extension was dropped:\n" + "\n".join(after[len(before):])
    assert not dispatchers(cluster, "extdb"), "a dispatcher came back for a database without the extension"
    with cluster.connect(dbname="extdb") as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    wait_dispatcher(cluster, "extdb", timeout=BACK_WITHIN)
    served(cluster, "extdb", server)
    drop_db(cluster, "extdb")


def test_queue_ext_database_limits_the_served_databases_and_a_missing_one_is_quiet(cluster, server):
    drop_db(cluster, "limited")
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE limited")
    with cluster.connect(dbname="limited") as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    wait_dispatcher(cluster, "limited")
    with cluster.connect() as conn:
        conn.execute("ALTER SYSTEM SET queue_ext.database = 'postgres, nosuchdb'")
        conn.execute("SELECT pg_reload_conf()")
        try:
            wait_for(lambda: not dispatchers(cluster, "limited"), 10, what="the unlisted database's dispatcher gone")
            wait_dispatcher(cluster, "postgres")
            time.sleep(1)
            before = error_lines(cluster)
            time.sleep(5)  # a missing database must not cost a FATAL per retry
            after = error_lines(cluster)
            assert after == before, "log lines for a missing database:\n" + "\n".join(after[len(before):])
            served(cluster, "postgres", server)
            assert not dispatchers(cluster, "limited")
            # Quiet in the log, but said where an operator looks.
            states = dict(conn.execute("SELECT database, state FROM queue_ext.dispatcher_status()").fetchall())
            assert states.get("nosuchdb") == "no_database", states
            with cluster.connect(dbname="limited") as there:
                health = there.execute("SELECT queue_ext.health()").fetchone()[0]
            assert health["checks"]["dispatcher"]["state"] == "not_listed", health
        finally:
            conn.execute("ALTER SYSTEM RESET queue_ext.database")
            conn.execute("SELECT pg_reload_conf()")
    wait_dispatcher(cluster, "limited", timeout=BACK_WITHIN + 5)
    served(cluster, "limited", server)
    drop_db(cluster, "limited")


def ensure_released_script(version):
    """The frozen install script of an old version, in the extension directory (as
    pg_test/upgrade.sh does: scripts/install.sh installs only what the build packages)."""
    sharedir = subprocess.run([PG_CONFIG, "--sharedir"], capture_output=True,
                              text=True, check=True).stdout.strip()
    src = ROOT / "sql" / "released" / f"queue_ext--{version}.sql"
    dest = Path(sharedir) / "extension" / src.name
    if not dest.exists() or dest.read_bytes() != src.read_bytes():
        tmp = dest.with_name(f"{dest.name}.new.{os.getpid()}")
        tmp.write_bytes(src.read_bytes())
        tmp.chmod(0o644)
        tmp.rename(dest)


def test_alter_extension_update_from_0_3_0_with_jobs_in_flight(cluster, server):
    ensure_released_script("0.3.0")
    drop_db(cluster, "upg")
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE upg")
    with cluster.connect(dbname="upg") as conn:
        conn.execute("CREATE EXTENSION queue_ext VERSION '0.3.0'")
        name, path = hook_queue(conn, server, "slow", webhook_max_in_flight=4)
        conn.execute("SELECT queue_ext.create_queue('sqlwork')")
        held = enqueue(conn, "sqlwork")
        claimed = conn.execute("SELECT lease_token::text FROM queue_ext.get_next_job('sqlwork', 'w', '10 minutes')").fetchone()
        waiting = enqueue(conn, "sqlwork")
        jobs = [enqueue(conn, name, f'{{"n": {i}}}') for i in range(12)]
        try:
            wait_for(lambda: server.attempts(path) >= 2, 15, what="webhooks in flight in the 0.3.0 database")
        except AssertionError as e:
            raise AssertionError(f"{e}: the 0.3.0 database is not served before its update\n"
                                 f"{cluster.log_tail(30)}") from None
        updated_at = time.time()
        conn.execute("ALTER EXTENSION queue_ext UPDATE")
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'").fetchone()[0]
        assert version == CURRENT_VERSION
        # The SQL worker's claim survived the update and completes with its token.
        conn.execute("SELECT queue_ext.complete_job(%s, NULL, %s)", [held, claimed[0]])
        again = conn.execute("SELECT job_id::text FROM queue_ext.get_next_job('sqlwork', 'w')").fetchone()
        assert again and again[0] == waiting
    wait_completed(cluster, "upg", jobs, timeout=40)
    check_sends(server, path, jobs, updated_at)
    with cluster.connect(dbname="upg") as conn:
        stuck = conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", [name]).fetchone()[0]
        assert stuck == 0
    wait_dispatcher(cluster, "upg")
    served(cluster, "upg", server)
    drop_db(cluster, "upg")


def crash_mid_delivery(cluster, server, crash):
    # A second database with the extension: crash recovery ends every dispatcher, and each
    # must come back.
    with cluster.connect() as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'second'").fetchone():
            conn.execute("CREATE DATABASE second")
    with cluster.connect(dbname="second") as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS queue_ext")
    wait_dispatcher(cluster, "second")
    with cluster.connect() as conn:
        name, path = hook_queue(conn, server, "slow", webhook_max_in_flight=8)
        jobs = [enqueue(conn, name, f'{{"n": {i}}}') for i in range(20)]
        wait_for(lambda: server.attempts(path) >= 4, 10, what="requests in flight")
    old = wait_dispatcher(cluster, "postgres")
    crashed_at = time.time()
    crash(old)
    cluster.wait_ready()
    wait_dispatcher(cluster, "postgres", not_pid=old, timeout=30)
    wait_completed(cluster, "postgres", jobs, timeout=40)
    check_sends(server, path, jobs, crashed_at)
    served(cluster, "postgres", server)
    wait_dispatcher(cluster, "second")
    served(cluster, "second", server)


def checkpointer_pid(cluster):
    try:
        with cluster.connect(connect_timeout=2) as c:
            return c.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'").fetchone()[0]
    except psycopg.OperationalError:
        return None


def test_kill_9_of_the_dispatcher_mid_delivery(cluster, server):
    def crash(pid):
        before = checkpointer_pid(cluster)
        os.kill(pid, signal.SIGKILL)
        # The postmaster resets every process after a child dies by a signal (crash recovery):
        # wait until it has (a new checkpointer), or the next steps could race the reset.
        wait_for(lambda: checkpointer_pid(cluster) not in (None, before), 30, interval=0.2,
                 what="the crash restart")
    crash_mid_delivery(cluster, server, crash)


def test_kill_9_of_the_postmaster_mid_delivery(cluster, server):
    crash_mid_delivery(cluster, server, lambda pid: cluster.kill_postmaster())


def test_fast_restart_finishes_and_the_dispatcher_is_back(cluster, server):
    # pg_ctl restart -m fast: every process, the launcher included, must exit on SIGTERM (a
    # process that ignores it makes the shutdown hang), then the dispatcher comes back.
    old = wait_dispatcher(cluster, "postgres")
    t0 = time.time()
    done = subprocess.run(["sudo", "-u", "postgres", f"{PGBIN}/pg_ctl", "-D",
                           str(cluster.dir / "data"), "-l", str(cluster.dir / "server.log"), "-m", "fast",
                           "-w", "-t", "20", "restart"], capture_output=True, text=True)
    assert done.returncode == 0, f"fast restart failed: {done.stdout}{done.stderr}\n{cluster.log_tail(20)}"
    assert time.time() - t0 < 15, f"the fast restart took {time.time() - t0:.1f}s"
    cluster.wait_ready()
    wait_dispatcher(cluster, "postgres", not_pid=old, timeout=BACK_WITHIN)
    served(cluster, "postgres", server)


def test_no_process_crashed_on_its_own(cluster):
    # Runs last: over every fault above, the only processes that died by a signal are the
    # ones the tests killed (SIGKILL); a segfault or an abort anywhere is a bug even when
    # crash recovery hides it.
    crashes = [l for l in (cluster.dir / "server.log").read_text(errors="replace").splitlines()
               if re.search(r"terminated by signal (?!9:)|\bPANIC:", l)]
    assert crashes == [], "\n".join(crashes)
