"""An operator's upgrade from the previous release's Debian package to this tree's, with work in
every state: the previous package installed with dpkg and a cluster serving it; queued,
running (a worker holding its lease), scheduled, retrying, waiting and dead jobs, webhooks
delivered and a burst in flight; this tree's package installed with dpkg beside the running
server, which carries on with the library it loaded; a restart with requests in flight, after
which the new library serves the old catalogue until ALTER EXTENSION UPDATE; then everything
drains, each job accounted for once and each webhook received once (twice only when the
restart cut its request off, with the same webhook-id). The system is left with this tree's
package installed, as every later test file expects.

The previous package is built from its release commit by scripts/package_release.sh."""
import re
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import psycopg
import pytest

from pgcluster import PG_CONFIG, ROOT, Cluster, dispatcher_pid, wait_for
from sink import Reply, Sink
from test_package import MAJOR, VERSION

pytestmark = pytest.mark.skipif(MAJOR != "15", reason="the .deb is Debian's PostgreSQL 15 build")


def _previous_release() -> str:
    """The newest release before this tree's version, from sql/released/RELEASES."""
    key = lambda v: tuple(int(x) for x in v.split("."))
    released = [line.split()[0] for line in (ROOT / "sql" / "released" / "RELEASES").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return max((v for v in released if key(v) < key(VERSION)), key=key)


PREVIOUS = _previous_release()
PACKAGE = "postgresql-15-queue-ext"
EXTDIR = Path(subprocess.run([PG_CONFIG, "--sharedir"], capture_output=True, text=True,
                             check=True).stdout.strip()) / "extension"
# Longer than queue_ext.shutdown_grace (2 s): these requests are still unanswered when the
# restart's SIGTERM has given up on them, so the dispatcher releases them and the new one
# sends them again.
SLOW = 8.0
SLOW_COUNT = 3
BURST = 200
BURST_IN_FLIGHT = 10


def _package(*cmd: str) -> Path:
    out = subprocess.run(["bash", *cmd], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    path = Path(out.stdout.split()[-1])
    assert path.exists(), path
    return path


@pytest.fixture(scope="session")
def previous_deb() -> Path:
    """Built from the previous release's commit, with that commit's scripts/package.sh."""
    deb = _package(str(ROOT / "scripts" / "package_release.sh"), PREVIOUS, "15")
    assert deb.name == f"{PACKAGE}_{PREVIOUS}_amd64.deb"
    return deb


@pytest.fixture(scope="session")
def current_deb() -> Path:
    deb = _package(str(ROOT / "scripts" / "package.sh"), "15")
    assert deb.name == f"{PACKAGE}_{VERSION}_amd64.deb"
    return deb


def dpkg_install(deb: Path):
    done = subprocess.run(["dpkg", "-i", str(deb)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def installed_version() -> str:
    return subprocess.run(["dpkg-query", "-W", "-f=${Status} ${Version}", PACKAGE],
                          capture_output=True, text=True).stdout


def extversion(conn) -> str:
    return conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'queue_ext'").fetchone()[0]


def enqueue(conn, queue: str, payload: str = "{}", options: str = "", params=()) -> str:
    return str(conn.execute(f"SELECT queue_ext.enqueue_job(%s, %s{options})",
                            [queue, payload, *params]).fetchone()[0])


def claim(conn, queue: str, worker: str = "pkgup-worker", lease: str | None = None):
    """(job id, lease token), or None when nothing is runnable."""
    row = conn.execute("SELECT job_id::text, lease_token FROM queue_ext.get_next_job(%s, %s, %s::interval)",
                       [queue, worker, lease]).fetchone()
    return (row[0], row[1]) if row else None


def complete(conn, job: str, token):
    conn.execute("SELECT queue_ext.complete_job(%s, '{\"ok\": true}', %s)", [job, token])


def status(conn, job: str) -> str | None:
    row = conn.execute("SELECT status::text FROM queue_ext.job_queue WHERE id = %s", [job]).fetchone()
    return row[0] if row else None


def log_since(cluster: Cluster, offset: int) -> str:
    with open(cluster.dir / "server.log", "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def test_upgrade_from_the_previous_package_with_jobs_in_flight(previous_deb, current_deb):
    # The extension directory as found: dpkg deletes the files the replaced package owned and
    # the new one does not (an older install script copied there by another test, say), and
    # they are put back at the end.
    found = {p.name: p.read_bytes() for p in EXTDIR.glob("queue_ext*")}
    sink = Sink()
    # 0.4 s a request, 10 at a time: the burst takes ~8 s, so it spans the restart and the update.
    sink.default("/burst", Reply(delay=0.4))
    sink.script("/burst", *[Reply(delay=SLOW)] * SLOW_COUNT)
    c = Cluster("pkgup", 25593, ["queue_ext.http_allowlist = '127.0.0.1'"])
    old_agent, new_agent = f"queue_ext/{PREVIOUS}", f"queue_ext/{VERSION}"
    connections: list[psycopg.Connection] = []

    def connect() -> psycopg.Connection:
        connections.append(c.connect())
        return connections[-1]

    try:
        # 1. The previous release's package (a downgrade if a newer one is installed), and a
        #    fresh cluster preloading its library.
        dpkg_install(previous_deb)
        assert installed_version() == f"install ok installed {PREVIOUS}"
        c.start(fresh=True)
        conn = connect()
        assert "queue_ext" in conn.execute("SHOW shared_preload_libraries").fetchone()[0].split(",")
        conn.execute("CREATE EXTENSION queue_ext")
        assert extversion(conn) == PREVIOUS
        wait_for(lambda: dispatcher_pid(conn), 30, what="the dispatcher of the previous release")

        for queue, options in [("work", ""), ("held", ""), ("child", ""), ("later", ""),
                               ("flaky", ", max_attempts => 3, backoff_base => '1 second'"),
                               ("doomed", ", max_attempts => 1")]:
            conn.execute(f"SELECT queue_ext.create_queue(%s{options})", [queue])
        conn.execute("SELECT queue_ext.create_queue('hooks', webhook_url => %s)", [sink.url + "/hooks"])
        conn.execute("SELECT queue_ext.create_queue('burst', webhook_url => %s, webhook_max_in_flight => %s)",
                     [sink.url + "/burst", BURST_IN_FLIGHT])

        # 2. Work in every state.
        work = [enqueue(conn, "work", f'{{"n": {i}}}') for i in range(10)]
        held = enqueue(conn, "held", '{"held": "across the package install"}')
        parent = enqueue(conn, "held", '{"held": "across the restart"}')
        # Holds `held` on a connection that stays open through the package install.
        worker = connect()
        held_claim = claim(worker, "held", lease="10 minutes")
        assert held_claim[0] == held
        # `parent` is claimed by a worker whose connection the restart cuts; its lease outlives it.
        cut_worker = connect()
        parent_claim = claim(cut_worker, "held", lease="10 minutes")
        assert parent_claim[0] == parent
        child = enqueue(conn, "child", '{"after": "parent"}', ", depends_on => ARRAY[%s::uuid]", [parent])
        assert status(conn, child) == "waiting"

        flaky = enqueue(conn, "flaky")
        job, token = claim(conn, "flaky")
        assert job == flaky
        assert conn.execute("SELECT queue_ext.fail_job(%s, 'the first try fails', %s)::text",
                            [flaky, token]).fetchone()[0] == "retrying"
        doomed = enqueue(conn, "doomed")
        job, token = claim(conn, "doomed")
        assert job == doomed
        assert conn.execute("SELECT queue_ext.fail_job(%s, 'hopeless', %s)::text",
                            [doomed, token]).fetchone()[0] == "dead"
        assert conn.execute("SELECT count(*) FROM queue_ext.job_dead_letter WHERE id = %s",
                            [doomed]).fetchone()[0] == 1

        hooks = [str(r[0]) for r in conn.execute(
            "SELECT * FROM queue_ext.enqueue_jobs('hooks', array_fill('{\"before\": \"install\"}'::jsonb, ARRAY[20]))")]
        wait_for(lambda: len(sink.to("/hooks")) >= 20, 30, what="webhooks from the previous release")
        assert {r.headers["user-agent"] for r in sink.to("/hooks")} == {old_agent}

        # 3. This tree's package installed beside the running server: dpkg renames each file
        #    over the old one, and the server carries on with the library it loaded.
        postmaster = c.postmaster_pid()
        dispatcher = dispatcher_pid(conn)
        dpkg_install(current_deb)
        assert installed_version() == f"install ok installed {VERSION}"
        assert c.postmaster_pid() == postmaster
        assert extversion(conn) == PREVIOUS
        assert conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'queue_ext'"
                            ).fetchone()[0] == VERSION
        complete(worker, *held_claim)  # the worker that held its lease through the install
        assert conn.execute("SELECT status::text FROM queue_ext.job_archive WHERE id = %s",
                            [held]).fetchone() == ("completed",)
        with c.connect() as fresh:  # a backend forked after the install: the preloaded library
            work += [enqueue(fresh, "work", '{"after": "install"}') for _ in range(5)]
            hooks += [enqueue(fresh, "hooks", '{"after": "install"}') for _ in range(5)]
        wait_for(lambda: len(sink.to("/hooks")) >= 25, 30, what="webhooks after the package install")
        assert {r.headers["user-agent"] for r in sink.to("/hooks")} == {old_agent}, \
            "the running server delivers with the library it loaded"
        assert dispatcher_pid(conn) == dispatcher
        wait_for(lambda: conn.execute("SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = 'hooks'"
                                      ).fetchone()[0] == 25, 20, what="the hooks recorded as completed")

        # 4. Just before the restart: a job scheduled for after it, and a burst of webhooks of
        #    which some are delivered, some in flight and some still queued when it comes.
        later = enqueue(conn, "later", options=", delay => interval '8 seconds'")
        later_run_at = conn.execute("SELECT run_at FROM queue_ext.job_queue WHERE id = %s", [later]).fetchone()[0]
        assert claim(conn, "later") is None, "not before its time"
        burst = [str(r[0]) for r in conn.execute(
            "SELECT * FROM queue_ext.enqueue_jobs('burst', "
            "array(SELECT jsonb_build_object('n', i) FROM generate_series(1, %s) AS i))", [BURST])]
        wait_for(lambda: len(sink.to("/burst")) >= 20, 30, what="the burst under way")
        log_offset = (c.dir / "server.log").stat().st_size
        restart_began = time.time()
        subprocess.run(["bash", str(ROOT / "scripts" / "cluster.sh"), "restart", str(c.dir)], check=True)
        restarted = time.time()
        before = [r for r in sink.to("/burst") if r.at < restart_began]
        slow = [r.headers["webhook-id"] for r in before[:SLOW_COUNT]]
        assert len({r.headers["webhook-id"] for r in before}) < BURST, "part of the burst was still to go"

        # 5. The new library against the previous catalogue, until ALTER EXTENSION UPDATE: it
        #    serves the database (one dispatcher, no crash loop) and delivers what is due.
        c.wait_ready()
        conn = connect()
        assert extversion(conn) == PREVIOUS
        new_dispatcher = wait_for(lambda: dispatcher_pid(conn), 30, what="the new library's dispatcher")
        wait_for(lambda: [r for r in sink.to("/burst") if r.at > restarted], 30,
                 what="deliveries from the new library before the update")
        # Every C function of the previous catalogue resolves in the new library (the
        # validator looks each symbol up).
        for (symbol,) in conn.execute(
                "SELECT DISTINCT p.prosrc FROM pg_proc AS p JOIN pg_depend AS d ON d.objid = p.oid "
                "JOIN pg_extension AS e ON e.oid = d.refobjid AND e.extname = 'queue_ext' "
                "WHERE d.classid = 'pg_proc'::regclass AND p.prolang = "
                "(SELECT oid FROM pg_language WHERE lanname = 'c')").fetchall():
            with conn.transaction(force_rollback=True):
                conn.execute(f"CREATE FUNCTION pg_temp.pkgup_probe() RETURNS void LANGUAGE c "
                             f"AS '$libdir/queue_ext', '{symbol}'")
        window_probe = enqueue(conn, "work", '{"between": "restart and update"}')
        work.append(window_probe)
        time.sleep(2)
        assert dispatcher_pid(conn) == new_dispatcher, "the dispatcher keeps running before the update"
        window = log_since(c, log_offset)
        shutdown, _, after = window.partition("starting PostgreSQL")
        assert after, window[-3000:]
        released = re.findall(r"released (\d+) unfinished deliveries at shutdown", shutdown)
        assert len(released) == 1 and SLOW_COUNT <= int(released[0]) <= BURST_IN_FLIGHT, shutdown[-3000:]
        assert after.count("queue_ext launcher started") == 1, after[-3000:]
        assert after.count("queue_ext dispatcher started for database postgres") == 1, after[-3000:]
        trouble = [line for line in after.splitlines()
                   if re.search(r"\b(ERROR|FATAL|PANIC|WARNING):|terminated by signal|exited with exit code", line)]
        assert not trouble, "\n".join(trouble)

        # 6. The update, with the burst still being delivered.
        assert conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = 'burst'").fetchone()[0] > 0
        conn.execute("ALTER EXTENSION queue_ext UPDATE")
        assert extversion(conn) == VERSION

        # 7. Everything drains.
        with c.connect() as back:  # the cut-off worker, reconnected: its lease survived
            complete(back, *parent_claim)
        job, token = wait_for(lambda: claim(conn, "child"), 10, what="the dependent released by its parent")
        assert job == child
        complete(conn, job, token)
        job, token = wait_for(lambda: claim(conn, "later"), 30, what="the scheduled job")
        assert job == later and later_run_at.timestamp() > restart_began
        complete(conn, job, token)
        assert conn.execute("SELECT started_at >= run_at FROM queue_ext.job_archive WHERE id = %s",
                            [later]).fetchone() == (True,), "not before its time"
        job, token = wait_for(lambda: claim(conn, "flaky"), 30, what="the retrying job")
        assert job == flaky
        complete(conn, job, token)
        drained = []
        while batch := conn.execute("SELECT job_id::text, lease_token FROM queue_ext.get_next_jobs('work', 100)"
                                    ).fetchall():
            for job, token in batch:
                complete(conn, job, token)
                drained.append(job)
        assert sorted(drained) == sorted(work)
        wait_for(lambda: conn.execute("SELECT count(*) FROM queue_ext.job_queue").fetchone()[0] == 0, 60,
                 what="every queue to drain")

        # Each job exactly once: completed in the archive, or the dead one in the dead letters.
        everything = set(work) | {held, parent, child, later, flaky} | set(hooks) | set(burst)
        archived = conn.execute("SELECT id::text, status::text, attempt FROM queue_ext.job_archive").fetchall()
        assert len(archived) == len(everything)
        assert {r[0] for r in archived} == everything
        assert {r[1] for r in archived} == {"completed"}
        assert [r[0] for r in conn.execute("SELECT id::text FROM queue_ext.job_dead_letter")] == [doomed]
        attempts = {r[0]: r[2] for r in archived}
        assert attempts[flaky] == 2
        finished = dict(conn.execute("SELECT id::text, finished_at FROM queue_ext.job_archive "
                                     "WHERE id = ANY(%s::uuid[])", [[parent, child]]).fetchall())
        started_child = conn.execute("SELECT started_at FROM queue_ext.job_archive WHERE id = %s",
                                     [child]).fetchone()[0]
        assert started_child >= finished[parent], "the dependent ran after its parent"

        # Each webhook received once, by its webhook-id; twice only for a request the restart
        # cut off: released at shutdown (its attempt counted), sent again by the new library.
        cut_off = {f"msg_{r[0]}" for r in conn.execute(
            "SELECT id::text FROM queue_ext.job_archive WHERE queue_name = 'burst' AND errors @> "
            "'[{\"error\": \"dispatcher stopped during delivery\"}]'")}
        assert len(cut_off) == int(released[0])
        assert set(slow) <= cut_off
        received = defaultdict(list)
        for r in sink.to("/hooks") + sink.to("/burst"):
            received[r.headers["webhook-id"]].append(r)
        assert set(received) == {f"msg_{j}" for j in hooks + burst}
        for msg_id, requests in received.items():
            job = msg_id.removeprefix("msg_")
            if msg_id not in cut_off:
                assert len(requests) == 1 and attempts[job] == 1, (msg_id, len(requests), attempts[job])
                continue
            assert attempts[job] == 2 and len(requests) <= 2, (msg_id, len(requests), attempts[job])
            assert requests[0].at < restart_began and requests[-1].at > restarted
            assert requests[-1].headers["user-agent"] == new_agent
            assert requests[0].body == requests[-1].body
        assert all(len(received[s]) == 2 for s in slow), "each request cut off was sent again"
        print(f"burst: {len({r.headers['webhook-id'] for r in before})} of {BURST} requested before the restart, "
              f"{len(cut_off)} released at shutdown, {sum(len(v) == 2 for v in received.values())} sent twice")
        for r in sink.to("/hooks") + sink.to("/burst"):
            if r.at < restart_began:
                assert r.headers["user-agent"] == old_agent
            elif r.at > restarted:
                assert r.headers["user-agent"] == new_agent

        # And after the update, up to the end.
        after = log_since(c, log_offset).partition("starting PostgreSQL")[2]
        trouble = [line for line in after.splitlines()
                   if re.search(r"\b(ERROR|FATAL|PANIC|WARNING):|terminated by signal|exited with exit code", line)]
        assert not trouble, "\n".join(trouble)
        assert after.count("queue_ext dispatcher started for database postgres") == 1, after[-3000:]
    finally:
        for each in connections:
            each.close()
        c.stop()
        sink.close()
        # Every later test file runs this tree's library: put its package back.
        dpkg_install(current_deb)
        for name, content in found.items():
            if not (EXTDIR / name).exists():
                staged = EXTDIR / f"{name}.pkgup.new"
                staged.write_bytes(content)
                staged.rename(EXTDIR / name)
        assert installed_version() == f"install ok installed {VERSION}"
        assert subprocess.run(["dpkg-query", "-W", PACKAGE], capture_output=True, text=True).stdout.split() == \
            [PACKAGE, VERSION]
