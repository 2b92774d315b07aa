"""Every example in examples/ run against a real cluster: the workers (Python, Node, Rust)
drain jobs exactly once, retry a failing job, keep a long job's lease with heartbeats and
survive SIGTERM mid-batch with no job left running or lost; the webhook receivers (Python,
Node) accept the dispatcher's real signed deliveries and refuse tampered ones; the psql
walk-through runs; each workflow in examples/seeds/ reaches its outcome."""
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from pgcluster import Cluster, wait_for
from sink import Sink

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PORT = 25585
URL_DSN = f"postgresql://postgres@127.0.0.1:{PORT}/postgres"

WORKERS = {
    "python": [sys.executable, str(EXAMPLES / "python-worker" / "worker.py")],
    "node": ["node", str(EXAMPLES / "node-worker" / "worker.mjs")],
    "rust": [str(ROOT / "target" / "debug" / "queue_ext-rust-worker")],
}
RECEIVERS = {
    "python": [sys.executable, str(EXAMPLES / "python-receiver" / "receiver.py")],
    "node": ["node", str(EXAMPLES / "node-receiver" / "receiver.mjs")],
}


@pytest.fixture(scope="module")
def cluster():
    # The dispatcher serves `postgres` only: the database `uploads` stands for a managed one
    # without it, where pg_cron drains webhook queues with process_jobs().
    c = Cluster("examples", PORT, ["queue_ext.http_allowlist = '127.0.0.1'", "queue_ext.database = 'postgres'"])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
        conn.execute("CREATE EXTENSION pg_cron")
    yield c
    c.stop()


@pytest.fixture
def conn(cluster):
    with cluster.connect() as c:
        yield c


_procs: list["Proc"] = []


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    # A failed assertion must not leave a worker or receiver running into the next test.
    yield
    while _procs:
        p = _procs.pop().p
        if p.poll() is None:
            p.kill()
            p.wait()


class Proc:
    """A child process whose stdout JSON lines are collected as they come."""

    def __init__(self, argv, **env):
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **{k: str(v) for k, v in env.items()}})
        self.lines: list[dict] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        _procs.append(self)

    def _read(self):
        for line in self.p.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"text": line})

    def events(self, kind):
        return [l for l in self.lines if l.get("event") == kind]

    def stop(self, timeout=20) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise AssertionError(f"{self.p.args} ignored SIGTERM for {timeout}s")
        self.thread.join(5)
        return rc

    def stderr(self) -> str:
        return self.p.stderr.read() if self.p.poll() is not None else ""


def start_worker(kind, queue, **env):
    w = Proc(WORKERS[kind], DATABASE_URL=URL_DSN, QUEUE=queue, CONCURRENCY=4, POLL_SECONDS=0.5,
             HEARTBEAT_SECONDS=0.3, WORKER_ID=f"{kind}-{queue}", **env)
    wait_for(lambda: w.events("started") or w.p.poll() is not None, 30, what=f"{kind} worker start")
    assert w.p.poll() is None, w.stderr()
    return w


def count(conn, sql, *args):
    return conn.execute(sql, args).fetchone()[0]


def running(conn, queue):
    return count(conn, "SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s AND status = 'running'", queue)


def completed(conn, queue):
    return count(conn, "SELECT count(*) FROM queue_ext.job_archive WHERE queue_name = %s AND status = 'completed'", queue)


@pytest.mark.parametrize("kind", WORKERS)
def test_worker_drains_exactly_once_retries_and_stops_cleanly(conn, kind):
    q = f"ex_{kind}"
    conn.execute("SELECT queue_ext.create_queue(%s, backoff_base => '100 milliseconds', lease_duration => '2 seconds')", (q,))
    ids = [r[0] for r in conn.execute(
        "SELECT queue_ext.enqueue_job(%s, '{\"ms\": 300}') FROM generate_series(1, 24)", (q,))]
    flaky = count(conn, "SELECT queue_ext.enqueue_job(%s, '{\"ms\": 10, \"fail_attempts\": 1}')", q)
    # Outlives its 2 s lease: only heartbeats keep it.
    long = count(conn, "SELECT queue_ext.enqueue_job(%s, '{\"ms\": 4500}')", q)
    everything = {str(i) for i in ids} | {str(flaky), str(long)}

    # SIGTERM while four jobs are in flight: they finish, nothing new is claimed.
    w1 = start_worker(kind, q, SHUTDOWN_GRACE=10)
    wait_for(lambda: completed(conn, q) >= 4 and running(conn, q) == 4, 20, what="jobs in flight")
    assert w1.stop() == 0, w1.stderr()
    assert running(conn, q) == 0
    live = count(conn, "SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s", q)
    assert live > 0, "the worker drained everything before SIGTERM: nothing was tested"
    assert live + completed(conn, q) == len(everything)
    assert w1.events("stopped")

    # A second run drains the rest.
    w2 = start_worker(kind, q, SHUTDOWN_GRACE=10)
    wait_for(lambda: completed(conn, q) == len(everything), 30, what="the queue drained")
    assert w2.stop() == 0, w2.stderr()

    done = [e["job_id"] for e in w1.events("completed") + w2.events("completed")]
    assert sorted(done) == sorted(everything)  # each job completed once, by one run
    archive = dict(conn.execute("SELECT id::text, attempt FROM queue_ext.job_archive WHERE queue_name = %s", (q,)).fetchall())
    assert archive[str(flaky)] == 2
    assert archive[str(long)] == 1, "the long job lost its lease: heartbeats did not extend it"
    failed = [e for e in w1.events("failed") + w2.events("failed")]
    assert [(e["job_id"], e["state"]) for e in failed] == [(str(flaky), "retrying")]
    assert "simulated failure on attempt 1" in failed[0]["error"]


@pytest.mark.parametrize("kind", WORKERS)
def test_worker_gives_back_jobs_that_outlast_the_shutdown_grace(conn, kind):
    q = f"ex_grace_{kind}"
    conn.execute("SELECT queue_ext.create_queue(%s)", (q,))
    ids = {str(r[0]) for r in conn.execute(
        "SELECT queue_ext.enqueue_job(%s, '{\"ms\": 60000}') FROM generate_series(1, 2)", (q,))}
    w = start_worker(kind, q, SHUTDOWN_GRACE=0.5)
    wait_for(lambda: running(conn, q) == 2, 20, what="both jobs running")
    started = time.time()
    assert w.stop() == 0, w.stderr()
    assert time.time() - started < 5
    rows = conn.execute("SELECT id::text, status::text, run_at <= now(), last_error FROM queue_ext.job_queue "
                        "WHERE queue_name = %s", (q,)).fetchall()
    assert {r[0] for r in rows} == ids
    for _, status, due, error in rows:
        assert status in ("queued", "retrying") and due, rows
        assert error == "worker shut down before the job finished"
    conn.execute("SELECT queue_ext.drop_queue(%s, force => true)", (q,))


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def start_receiver(kind, secret):
    r = Proc(RECEIVERS[kind], WEBHOOK_SECRET=secret, PORT=0)
    wait_for(lambda: any("listening" in l for l in r.lines) or r.p.poll() is not None, 30, what="receiver start")
    assert r.p.poll() is None, r.stderr()
    r.url = f"http://127.0.0.1:{next(l['listening'] for l in r.lines if 'listening' in l)}"
    return r


def post(url, body: bytes, headers: dict) -> int:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize("kind", RECEIVERS)
def test_receiver_verifies_real_deliveries_and_refuses_tampered_ones(conn, kind):
    secret = new_secret()
    r = start_receiver(kind, secret)
    sink = Sink()
    try:
        q, capture, wrong = f"hook_{kind}", f"capture_{kind}", f"wrong_{kind}"
        conn.execute("SELECT queue_ext.create_queue(%s, webhook_url => %s, webhook_secret => %s, "
                     "webhook_headers => '{\"Authorization\": \"Bearer example\"}')", (q, r.url + "/hook", secret))
        conn.execute("SELECT queue_ext.create_queue(%s, webhook_url => %s, webhook_secret => %s)",
                     (capture, sink.url + "/capture", secret))
        conn.execute("SELECT queue_ext.create_queue(%s, webhook_url => %s, webhook_secret => %s, max_attempts => 1)",
                     (wrong, r.url + "/hook", new_secret()))
        ids = [str(row[0]) for row in conn.execute(
            "SELECT queue_ext.enqueue_job(%s, jsonb_build_object('n', n)) FROM generate_series(1, 5) AS n", (q,))]
        wait_for(lambda: completed(conn, q) == 5, 20, what="deliveries accepted")
        wait_for(lambda: len([l for l in r.lines if "webhook_id" in l]) == 5, 10, what="receiver output")
        got = {l["webhook_id"]: l for l in r.lines if "webhook_id" in l}
        assert set(got) == {f"msg_{i}" for i in ids}
        assert sorted(l["payload"]["n"] for l in got.values()) == [1, 2, 3, 4, 5]
        assert {l["authorization"] for l in got.values()} == {"Bearer example"}

        # Signed with another secret: refused with 401, which dead-letters the job.
        bad = count(conn, "SELECT queue_ext.enqueue_job(%s, '{\"n\": 0}')", wrong)
        wait_for(lambda: count(conn, "SELECT count(*) FROM queue_ext.job_dead_letter WHERE id = %s", bad), 20,
                 what="wrongly signed delivery refused")
        assert count(conn, "SELECT max(status_code) FROM queue_ext.webhook_deliveries WHERE job_id = %s", bad) == 401

        # A real delivery captured on the way, replayed as sent, then tampered with.
        conn.execute("SELECT queue_ext.enqueue_job(%s, '{\"amount\": 10}')", (capture,))
        wait_for(lambda: sink.to("/capture"), 20, what="captured delivery")
        real = sink.to("/capture")[0]
        headers = {k: v for k, v in real.headers.items()
                   if k.startswith("webhook-") or k == "content-type"}
        assert post(r.url + "/hook", real.body, headers) == 204
        assert post(r.url + "/hook", real.body.replace(b"10", b"99"), headers) == 401
        assert post(r.url + "/hook", real.body, {**headers, "webhook-signature": "v1,"
                                                 + base64.b64encode(b"x" * 32).decode()}) == 401
        assert post(r.url + "/hook", real.body, {**headers, "webhook-timestamp": str(int(time.time()) - 3600)}) == 401
        assert post(r.url + "/hook", real.body, {"content-type": "application/json"}) == 400
        wait_for(lambda: len([l for l in r.lines if "webhook_id" in l]) == 6, 10, what="receiver output")
        assert [l for l in r.lines if "webhook_id" in l][-1]["payload"] == {"amount": 10}
    finally:
        sink.close()
        assert r.stop() == 0


def test_psql_walkthrough(conn):
    out = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", str(EXAMPLES / "psql-walkthrough.sql"), URL_DSN],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 'Asynchronous notification "queue_ext_jobs" with payload "walkthrough"' in out.stdout
    assert "urgent@example.com" in out.stdout.split("== 4.")[0].split("== 3.")[1]  # critical first
    assert "mailbox full | failed 1 of 1 attempts" in out.stdout
    assert count(conn, "SELECT count(*) FROM queue_ext.queues WHERE queue_name = 'walkthrough'") == 0


def run_workflow(number, **env) -> dict:
    script = next((EXAMPLES / "seeds").glob(f"{number}_*.py"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DATABASE_URL": URL_DSN, **env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture
def receiver():
    secret = new_secret()
    r = start_receiver("python", secret)
    r.secret = secret
    yield r
    r.stop()


def accepted(r, path):
    return [l for l in r.lines if l.get("path") == path]


def test_database_webhooks_on_insert(conn, receiver):
    got = run_workflow("000", ENDPOINT_URL=receiver.url, WEBHOOK_SECRET=receiver.secret, SERVICE_ROLE_KEY="k-000")
    assert got["delivered"] == {"process-image-generation": 3, "process-video-generation": 1}
    # The receiver prints each delivery before answering it; its output may still be in transit.
    wait_for(lambda: len(accepted(receiver, "/functions/v1/process-image-generation")) == 3, 10, what="output")
    images = accepted(receiver, "/functions/v1/process-image-generation")
    assert sorted(l["payload"]["record"]["prompt"] for l in images) == ["scene 0", "scene 1", "scene 2"]
    assert {(l["payload"]["type"], l["payload"]["table"], l["authorization"]) for l in images} == \
        {("INSERT", "image_generation_requests", "Bearer k-000")}
    assert [l["payload"]["record"]["prompt"] for l in accepted(receiver, "/functions/v1/process-video-generation")] == ["trailer"]
    commands = dict(conn.execute("SELECT jobname, command FROM cron.job WHERE jobname LIKE 'process-%-generation-fallback'").fetchall())
    assert commands["process-image-generation-fallback"] == \
        "SELECT count(*) FROM queue_ext.process_jobs('process-image-generation', 50)"


def test_upload_trigger_process_jobs_status_view(cluster, conn, receiver):
    conn.execute("CREATE DATABASE uploads")
    uploads = URL_DSN.rsplit("/", 1)[0] + "/uploads"
    with psycopg.connect(uploads, autocommit=True) as db:
        db.execute("CREATE EXTENSION queue_ext")
    got = run_workflow("001", DATABASE_URL=uploads, CRON_DATABASE_URL=URL_DSN, ENDPOINT_URL=receiver.url,
                   WEBHOOK_SECRET=receiver.secret)
    # No dispatcher serves this database: the jobs waited for the tick, which delivered them.
    assert got["before"] == [["uploads/a.pdf", "queued"], ["uploads/b.csv", "queued"]]
    assert [(o, c) for _, o, c in got["tick"]] == [("delivered", 204), ("delivered", 204)]
    assert got["after"] == [["uploads/a.pdf", "completed", 1], ["uploads/b.csv", "completed", 1]]
    wait_for(lambda: len(accepted(receiver, "/functions/v1/worker-pull")) == 2, 10, what="receiver output")
    assert sorted(l["payload"]["path"] for l in accepted(receiver, "/functions/v1/worker-pull")) == \
        ["uploads/a.pdf", "uploads/b.csv"]
    assert conn.execute("SELECT database, schedule FROM cron.job WHERE jobname = 'process-queued-jobs'").fetchone() == \
        ("uploads", "* * * * *")


def test_immediate_processing_completion_webhooks_fifo_metrics(conn, receiver):
    got = run_workflow("002", CALLBACK_URL=receiver.url + "/api/webhooks", WEBHOOK_SECRET=receiver.secret)
    submitted, order = got["submitted"], got["order"]
    assert sorted(order) == sorted(submitted)
    for user in ("alice", "bob"):  # FIFO per user
        assert [j for j, u in order if u == user] == [j for j, u in submitted if u == user]
    assert got["enqueue_to_done_s"] < 1
    assert got["queue_stats"][0] == 6
    assert got["metrics"] == ['queue_ext_jobs_completed_last_5m{queue="generations"} 6']
    wait_for(lambda: len(accepted(receiver, "/api/webhooks")) == 6, 20, what="completion webhooks")
    callbacks = accepted(receiver, "/api/webhooks")
    assert sorted(l["payload"]["job_id"] for l in callbacks) == sorted(j for j, _ in submitted)
    assert {l["payload"]["type"] for l in callbacks} == {"job.completed"}
    assert all(l["payload"]["result"]["video_url"].endswith(l["payload"]["job_id"] + ".mp4") for l in callbacks)


def test_job_system_priorities_dependencies_limits_batches_rls(conn):
    got = run_workflow("003")
    assert got["priority_order"] == ["password_reset", "welcome", "newsletter"]
    assert (got["publish_before"], got["publish_after"]) == ("waiting", "queued")
    assert got["render_progress"] == 60
    assert got["payouts_claimable_now"] == 1  # 5 per minute: one now, the next 12 s later
    assert got["analytics_batches"] == [100, 100]
    assert got["bounce_dead_reason"] == "mailbox does not exist"
    assert got["health"] in ("ok", "degraded")  # degraded: the bounce died in the last hour
    assert got["app_a_sees"] == ["mindscript_app_a"]


def test_fire_and_forget_atomic_result_live_status(conn):
    got = run_workflow("004")
    for job in got["jobs"]:
        assert got["live"][job] == ["queued", "running", "completed"]
        assert got["results"][job] == "completed"
    assert len(got["results"]) == 2 and got["rolled_back_jobs"] == 0
