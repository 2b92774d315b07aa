"""The dispatcher over real HTTP: a real cluster with queue_ext preloaded, a real server on
127.0.0.1 (plain and TLS), real crashes. Delivery rules, signing, SSRF guard, isolation."""
import base64
import hashlib
import hmac
import itertools
import os
import re
import signal
import ssl
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from pgcluster import Cluster, dispatcher_pid, wait_for
from sink import Reply, Sink

SECRET = "whsec_" + base64.b64encode(b"queue_ext test secret 0123456789").decode()
TLS_DIR = Path("/tmp/queue_ext_webhooks_tls")
_names = itertools.count()


def make_certificate():
    """A private CA (what queue_ext.http_ca_file trusts) and a server certificate it signed."""
    TLS_DIR.mkdir(exist_ok=True)
    ca, ca_key = TLS_DIR / "ca.pem", TLS_DIR / "ca.key"
    cert, key, csr = TLS_DIR / "cert.pem", TLS_DIR / "key.pem", TLS_DIR / "cert.csr"
    ext = TLS_DIR / "ext.cnf"
    if not cert.exists():
        run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=queue_ext test CA",
            "-keyout", str(ca_key), "-out", str(ca))
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr))
        ext.write_text("basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", str(cert))
    os.chmod(TLS_DIR, 0o755)
    os.chmod(ca, 0o644)
    return ca, cert, key


@pytest.fixture(scope="module")
def tls_files():
    return make_certificate()


@pytest.fixture(scope="module")
def cluster(tls_files):
    ca, _, _ = tls_files
    c = Cluster("webhooks", 25443, [
        "queue_ext.http_allowlist = '127.0.0.1'",
        "queue_ext.poll_interval = '200ms'",
        f"queue_ext.http_ca_file = '{ca}'",
        "queue_ext.shutdown_grace = '3s'",
    ])
    c.start(fresh=True)
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION queue_ext")
    yield c
    c.stop()


@pytest.fixture
def conn(cluster, request):
    with cluster.connect() as c:
        yield c
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(cluster.log_tail())


@pytest.fixture(scope="module")
def sink():
    s = Sink()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tls_sink(tls_files):
    _, cert, key = tls_files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    s = Sink(tls_context=ctx)
    yield s
    s.close()


def new_queue(conn, base_url, **settings):
    name = f"hooks{next(_names)}"
    path = f"/{name}"
    args = {"webhook_url": base_url + path, "webhook_secret": SECRET, "backoff_base": "200 milliseconds",
            "backoff_cap": "1 second", **settings}
    named = ", ".join(f"{k} => %s" for k in args)
    conn.execute(f"SELECT queue_ext.create_queue(%s, {named})", [name, *args.values()])
    return name, path


def enqueue(conn, queue, payload="{}", **opts):
    named = "".join(f", {k} => %s" for k in opts)
    return conn.execute(f"SELECT queue_ext.enqueue_job(%s, %s::jsonb{named})", [queue, payload, *opts.values()]).fetchone()[0]


def enqueue_many(conn, queue, n):
    """n jobs in one transaction (one claim can take them all), their ids in claim order."""
    return [str(r[0]) for r in conn.execute(
        "SELECT queue_ext.enqueue_jobs(%s, array_fill('{}'::jsonb, ARRAY[%s]))", [queue, n]).fetchall()]


def status(conn, job_id):
    return conn.execute("SELECT status::text, attempt, last_error, result FROM queue_ext.job_status(%s)", [job_id]).fetchone()


def wait_status(conn, job_id, wanted, timeout=20):
    try:
        return wait_for(lambda: status(conn, job_id)[0] in wanted and status(conn, job_id), timeout,
                        what=f"{job_id} {wanted}")
    except AssertionError as e:
        raise AssertionError(f"{e}; job is now {status(conn, job_id)}") from None


def verify(secret, headers, body):
    key = base64.b64decode(secret[len("whsec_"):])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(expected, headers["webhook-signature"])


def test_dispatcher_is_running(conn):
    row = wait_for(lambda: conn.execute("SELECT running, pid FROM queue_ext.dispatcher_status()").fetchone()[0]
                   and conn.execute("SELECT running, pid FROM queue_ext.dispatcher_status()").fetchone(), 10,
                   what="dispatcher")
    assert row[1] > 0


def test_delivers_signed_request_and_completes(conn, sink):
    queue, path = new_queue(conn, sink.url, webhook_headers='{"Authorization": "Bearer t0k3n"}')
    job = enqueue(conn, queue, '{"user_id": 42}')
    done = wait_status(conn, job, {"completed"})
    [req] = sink.to(path)
    assert req.method == "POST"
    assert req.json() == {"user_id": 42}
    assert req.headers["authorization"] == "Bearer t0k3n"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["webhook-id"] == f"msg_{job}"
    assert verify(SECRET, req.headers, req.body), "signature verifies with the queue's secret"
    assert not verify("whsec_" + base64.b64encode(b"another secret").decode(), req.headers, req.body)
    assert done[1] == 1
    assert done[3]["status"] == 200 and done[3]["body"] == '{"ok": true}'
    log = conn.execute("SELECT outcome, status_code FROM queue_ext.webhook_deliveries WHERE job_id = %s", [job]).fetchall()
    assert log == [("delivered", 200)]


def test_other_methods(conn, sink):
    queue, path = new_queue(conn, sink.url, webhook_method="PUT")
    job = enqueue(conn, queue, '{"x": 1}')
    wait_status(conn, job, {"completed"})
    assert sink.to(path)[0].method == "PUT"


def test_retries_after_503_then_succeeds(conn, sink):
    queue, path = new_queue(conn, sink.url)
    sink.script(f"/{queue}", Reply(503), Reply(503))
    job = enqueue(conn, queue)
    done = wait_status(conn, job, {"completed"})
    reqs = sink.to(path)
    assert len(reqs) == 3 and done[1] == 3
    assert len({r.headers["webhook-id"] for r in reqs}) == 1, "the same webhook-id on every attempt"
    outcomes = [r[0] for r in conn.execute(
        "SELECT outcome FROM queue_ext.webhook_deliveries WHERE job_id = %s ORDER BY id", [job])]
    assert outcomes == ["retry", "retry", "delivered"]


def test_retry_after_is_honoured(conn, sink):
    queue, path = new_queue(conn, sink.url)
    sink.script(f"/{queue}", Reply(429, {"Retry-After": "2"}))
    job = enqueue(conn, queue)
    wait_status(conn, job, {"completed"}, timeout=15)
    first, second = sink.to(path)
    assert second.at - first.at >= 1.9, f"second attempt after {second.at - first.at:.2f}s"


def test_client_error_goes_straight_to_dead_letter(conn, sink):
    queue, path = new_queue(conn, sink.url, max_attempts=5)
    sink.default(f"/{queue}", Reply(400, body=b'{"error": "bad"}'))
    job = enqueue(conn, queue)
    dead = wait_status(conn, job, {"dead"})
    assert dead[1] == 1 and "400" in dead[2]
    assert len(sink.to(path)) == 1
    reason = conn.execute("SELECT reason FROM queue_ext.job_dead_letter WHERE id = %s", [job]).fetchone()[0]
    assert reason == "permanent failure"


def test_timeout_is_retried_and_logged(conn, sink):
    queue, path = new_queue(conn, sink.url, webhook_timeout="300 milliseconds", max_attempts=2)
    sink.default(f"/{queue}", Reply(200, delay=1.5))
    job = enqueue(conn, queue)
    dead = wait_status(conn, job, {"dead"}, timeout=20)
    assert "timed out" in dead[2]
    errors = [r[0] for r in conn.execute(
        "SELECT error FROM queue_ext.webhook_deliveries WHERE job_id = %s ORDER BY id", [job])]
    assert len(errors) == 2 and all("timed out after 300 ms" in e for e in errors)


def test_slow_endpoint_does_not_delay_other_queues(conn, sink):
    # The slow endpoint holds its requests for 20 s; the fast queue's 50 deliveries must all
    # arrive while those are still held, so head-of-line blocking would fail the wait.
    slow, slow_path = new_queue(conn, sink.url, webhook_max_in_flight=4, webhook_timeout="30 seconds")
    fast, fast_path = new_queue(conn, sink.url)
    sink.default(slow_path, Reply(200, delay=20))
    for _ in range(8):
        enqueue(conn, slow)
    wait_for(lambda: len(sink.to(slow_path)) == 4, 10, what="the slow requests in flight")
    fast_jobs = [enqueue(conn, fast, f'{{"n": {i}}}') for i in range(50)]
    wait_for(lambda: len(sink.to(fast_path)) == 50, 15, what="fast deliveries behind a held endpoint")
    for job in fast_jobs[:3]:
        wait_status(conn, job, {"completed"})
    assert len(sink.to(slow_path)) <= 4, "the slow queue stays within its webhook_max_in_flight"


def held_while_delivering(conn, sink, queue, path, jobs):
    """The most jobs of the queue running at once, and the longest lease left on one, seen
    while the sink receives the jobs' requests."""
    held, lease = 0, 0.0
    deadline = time.time() + 30
    while time.time() < deadline and len(sink.to(path)) < len(jobs):
        running, longest = conn.execute(
            "SELECT count(*), coalesce(extract(epoch FROM max(lease_expires_at - now())), 0)::float8 "
            "FROM queue_ext.job_queue WHERE queue_name = %s AND status = 'running'", [queue]).fetchone()
        held, lease = max(held, running), max(lease, longest)
        time.sleep(0.01)
    for job in jobs:
        wait_status(conn, job, {"completed"})
    sent = [r.headers["webhook-id"] for r in sink.to(path)]
    assert sorted(sent) == sorted(f"msg_{j}" for j in jobs), "each job sent once"
    assert all(status(conn, j)[1] == 1 for j in jobs), "one attempt each"
    return held, lease


def test_claims_ahead_wait_for_a_slot_and_their_leases_cover_the_wait(conn, sink):
    # A fast endpoint's queue: the dispatcher claims up to twice its webhook_max_in_flight,
    # but never has more than webhook_max_in_flight requests at the endpoint at once: the
    # others wait for one to end, and their leases cover that wait, the request timeout and
    # the margin.
    queue, path = new_queue(conn, sink.url, webhook_max_in_flight=3, webhook_timeout="5 seconds")
    sink.default(path, Reply(200, delay=0.05))
    jobs = enqueue_many(conn, queue, 60)
    held, lease = held_while_delivering(conn, sink, queue, path, jobs)
    assert sink.peak[path] <= 3, f"{sink.peak[path]} requests at once, over webhook_max_in_flight"
    assert 3 < held <= 6, f"{held} jobs held at once: claims ahead go up to twice webhook_max_in_flight"
    assert 35 < lease <= 40, f"a lease of {lease:.1f} s: two request timeouts and the 30 s margin"


def test_a_slow_endpoint_is_claimed_only_into_free_slots(conn, sink):
    # Requests that take longer than the dispatcher's bound for claims ahead (200 ms on
    # average): its jobs stay in the queue until a slot is free, where pausing the queue or
    # cancelling a job still finds them.
    queue, path = new_queue(conn, sink.url, webhook_max_in_flight=2, webhook_timeout="5 seconds")
    sink.default(path, Reply(200, delay=0.3))
    jobs = enqueue_many(conn, queue, 8)
    held, lease = held_while_delivering(conn, sink, queue, path, jobs)
    assert held <= 2, f"{held} jobs held at once from a slow endpoint's queue"
    assert lease <= 35, f"a lease of {lease:.1f} s: one request timeout and the 30 s margin"


def one_slot_behind_a_slow_request(conn, sink, n, delay, **settings):
    """A queue with one request slot whose endpoint answered fast (the dispatcher claims ahead
    only from such a queue), then n jobs in one transaction: the first one's request takes
    `delay` s, the second waits in the dispatcher for the slot. Returns the queue, its path and
    the n job ids once the first request has arrived."""
    queue, path = new_queue(conn, sink.url, webhook_max_in_flight=1, webhook_timeout="20 seconds", **settings)
    sink.default(path, Reply(200, delay=0.01))
    for job in enqueue_many(conn, queue, 5):
        wait_status(conn, job, {"completed"})
    sink.script(path, Reply(200, delay=delay))
    jobs = enqueue_many(conn, queue, n)
    wait_for(lambda: len(sink.to(path)) == 6, 10, what="the first request")
    return queue, path, jobs


def test_a_claim_ahead_of_free_slots_ends_before_a_job_on_its_last_attempt(conn, sink):
    # A fast endpoint's queue with two request slots, none of them busy: the dispatcher claims
    # up to four of its jobs, two for the free slots and two to wait for one. A job on its last
    # attempt may take a free slot but never waits: after a kill -9 the attempt of every job
    # the dispatcher held counts, and a last attempt must not end unsent. The claim ahead ends
    # before such a job, which the next claim with a free slot takes, in its turn.
    queue, _ = new_queue(conn, sink.url, webhook_max_in_flight=2)
    def claim_in_order(last_at, in_flight=0):
        with conn.transaction(force_rollback=True):  # uncommitted: the live dispatcher cannot claim them
            jobs = [str(enqueue(conn, queue, "{}", max_attempts=1 if i in last_at else 3)) for i in range(6)]
            conn.execute("UPDATE queue_ext.job_queue SET run_at = now() - (10 - position) * interval '1 second' "
                         "FROM unnest(%s::uuid[]) WITH ORDINALITY AS u(id, position) WHERE job_queue.id = u.id",
                         [jobs])
            claimed = [str(r[0]) for r in conn.execute(
                "SELECT job_id FROM queue_ext._dispatch_claim_rows('t', 10, ARRAY[%s], ARRAY[%s], %s, "
                "'30 seconds', ARRAY[%s])", [queue, in_flight, queue, queue])]
            return [jobs.index(j) for j in claimed]
    assert claim_in_order(last_at=set()) == [0, 1, 2, 3], "two for the free slots, two ahead"
    assert claim_in_order(last_at={1}) == [0, 1, 2, 3], "a last attempt in a free slot"
    assert claim_in_order(last_at={3}) == [0, 1, 2], "the claim ahead ends before a last attempt"
    assert claim_in_order(last_at={2, 4}) == [0, 1], "nothing ahead of a last attempt"
    assert claim_in_order(last_at={1}, in_flight=1) == [0], "one slot free: the job after it would wait"
    assert claim_in_order(last_at={0}, in_flight=2) == [], "no slot free: nothing ahead of a last attempt"
    assert claim_in_order(last_at={2}, in_flight=2) == [0, 1]


def test_a_kill_9_spends_no_last_attempt_of_a_job_it_had_not_sent(cluster, sink):
    # One request slot, held by a slow request, and jobs with one attempt each: the dispatcher
    # holds none of them waiting for the slot, so when it is killed the only job whose attempt
    # its successor counts is the one whose request was in flight (dead, sent once); the
    # others are each sent once after the restart.
    with cluster.connect() as conn:
        queue, path, (first, *rest) = one_slot_behind_a_slow_request(conn, sink, 3, 5.0, max_attempts=1)
        held = conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s AND status = 'running'",
                            [queue]).fetchone()[0]
        assert held == 1, f"{held} jobs held: only the one sent, none on its last attempt waiting"
        pid = dispatcher_pid(conn)
    os.kill(pid, signal.SIGKILL)
    time.sleep(1)  # the postmaster resets every backend after a worker dies by signal
    cluster.wait_ready()
    with cluster.connect() as conn:
        assert wait_status(conn, first, {"dead"}, timeout=30)[2] == "dispatcher restarted during delivery"
        for job in rest:
            assert wait_status(conn, job, {"completed"}, timeout=30)[1] == 1, "sent once, on its only attempt"
    sent = Counter(r.headers["webhook-id"].removeprefix("msg_") for r in sink.to(path)[5:])
    assert sent == {first: 1, **{job: 1 for job in rest}}, sent


def test_a_stopping_dispatcher_returns_the_jobs_waiting_for_a_slot_unsent(cluster, conn, sink):
    # One request slot: the first job's request outlasts the shutdown grace (3 s here), the
    # second job waits for the slot when the dispatcher is told to stop. The request in flight
    # is released as always: its attempt counts and the next dispatcher sends it again, with
    # the same webhook-id. The waiting job was sent nowhere: it goes back as it was, its
    # attempt not counted, and is sent once.
    queue, path, (first, waiting, last) = one_slot_behind_a_slow_request(conn, sink, 3, 8.0)
    running = conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s AND status = 'running'",
                           [queue]).fetchone()[0]
    assert running == 2, f"{running} jobs held: one sent, one waiting for the slot"
    old = dispatcher_pid(conn)
    assert conn.execute("SELECT pg_terminate_backend(%s)", [old]).fetchone()[0]
    wait_for(lambda: dispatcher_pid(conn) not in (None, old), 30, what="the next dispatcher")
    for job in (first, waiting, last):
        wait_status(conn, job, {"completed"}, timeout=30)
    sent = Counter(r.headers["webhook-id"].removeprefix("msg_") for r in sink.to(path)[5:])
    assert sent == {first: 2, waiting: 1, last: 1}, sent
    assert status(conn, first)[1:3] == (2, "dispatcher stopped during delivery"), status(conn, first)
    assert status(conn, waiting)[1:3] == (1, None), "the waiting job's attempt is not counted"
    assert re.search(r"returned \d+ deliveries waiting for a request slot, unsent", cluster.log_tail(400))


def test_pausing_or_cancelling_takes_back_a_job_waiting_for_a_slot_before_it_is_sent(conn, sink):
    # One request slot, held by a slow request; the dispatcher holds the next job, claimed
    # ahead, waiting for the slot. cancel_job cancels that job before its request starts, and
    # pause_queue puts the one after it back in the queue: neither is sent, neither attempt
    # counts, and the request in flight finishes as any worker's would.
    queue, path, (first, second, third) = one_slot_behind_a_slow_request(conn, sink, 3, 15.0, notify_events=True)
    running = lambda: {r[0] for r in conn.execute(
        "SELECT id::text FROM queue_ext.job_queue WHERE queue_name = %s AND status = 'running'", [queue])}
    assert running() == {first, second}, "one job sent, the next waiting for the slot"

    assert conn.execute("SELECT queue_ext.cancel_job(%s, 'not wanted')", [second]).fetchone()[0] == "running"
    assert wait_status(conn, second, {"cancelled"}, timeout=3)[1:3] == (0, "not wanted")
    wait_for(lambda: running() == {first, third}, 3, what="the third job claimed ahead")
    conn.execute("SELECT queue_ext.pause_queue(%s)", [queue])
    assert wait_status(conn, third, {"queued"}, timeout=3)[1] == 0, "returned unsent, its attempt not counted"
    assert running() == {first}, "the request in flight goes on"
    assert len(sink.to(path)) == 6, "nothing else was sent"

    wait_status(conn, first, {"completed"}, timeout=25)
    time.sleep(0.5)
    assert len(sink.to(path)) == 6, "nothing is sent from a paused queue"
    conn.execute("SELECT queue_ext.resume_queue(%s)", [queue])
    assert wait_status(conn, third, {"completed"})[1] == 1
    sent = Counter(r.headers["webhook-id"].removeprefix("msg_") for r in sink.to(path)[5:])
    assert sent == {first: 1, third: 1}, sent
    log = conn.execute("SELECT from_status::text, to_status::text, error FROM queue_ext.job_status_log "
                       "WHERE job_id = %s ORDER BY id", [third]).fetchall()
    assert ("running", "queued", "not sent: its queue was paused") in log, log


def test_a_dropped_queue_sends_none_of_its_jobs_waiting_for_a_slot(conn, sink):
    # drop_queue(force => true) cancels the queue's jobs, running ones included. A job the
    # dispatcher held, waiting for the queue's one request slot, is then never sent; the
    # request already in flight finishes and finds its job gone.
    queue, path, (first, waiting) = one_slot_behind_a_slow_request(conn, sink, 2, 5.0)
    running = conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s AND status = 'running'",
                           [queue]).fetchone()[0]
    assert running == 2, f"{running} jobs held: one sent, one waiting for the slot"
    conn.execute("SELECT queue_ext.drop_queue(%s, force => true)", [queue])
    wait_for(lambda: sink.active[path] == 0, 15, what="the request in flight to end")
    time.sleep(1)
    assert [r.headers["webhook-id"] for r in sink.to(path)[5:]] == [f"msg_{first}"], "the waiting job was not sent"
    assert conn.execute("SELECT status::text, last_error FROM queue_ext.job_archive WHERE id = %s",
                        [waiting]).fetchone() == ("cancelled", "queue dropped")


def test_a_job_waiting_for_a_slot_goes_to_the_url_its_queue_was_given_since_its_claim(conn, sink):
    # The operator moves a queue to another endpoint while the dispatcher holds one of its jobs,
    # claimed ahead under the old URL, waiting for the queue's one request slot. That job goes
    # back to the queue unsent (its attempt not counted) and is sent once, to the new URL; the
    # request already in flight to the old one finishes as any would.
    queue, path, (first, waiting) = one_slot_behind_a_slow_request(conn, sink, 2, 6.0, notify_events=True)
    running = conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s AND status = 'running'",
                           [queue]).fetchone()[0]
    assert running == 2, f"{running} jobs held: one sent, one waiting for the slot"
    moved = f"{path}-moved"
    conn.execute("SELECT queue_ext.alter_queue(%s, webhook_url => %s)", [queue, sink.url + moved])
    wait_status(conn, first, {"completed"}, timeout=25)
    assert wait_status(conn, waiting, {"completed"})[1] == 1, "its first attempt, at the new URL"
    assert [r.headers["webhook-id"] for r in sink.to(path)[5:]] == [f"msg_{first}"], "nothing more to the old URL"
    assert [r.headers["webhook-id"] for r in sink.to(moved)] == [f"msg_{waiting}"]
    log = conn.execute("SELECT from_status::text, to_status::text, error FROM queue_ext.job_status_log "
                       "WHERE job_id = %s ORDER BY id", [waiting]).fetchall()
    assert ("running", "queued", "not sent: its webhook settings changed") in log, log


def test_only_a_change_of_how_jobs_are_sent_gives_a_target_a_new_settings_version(conn, sink):
    # A new version sends back every job the dispatcher holds unsent for the queue: the number
    # of requests at once is not part of it (the dispatcher's lanes follow it as it is), nor is
    # setting a value to what it was.
    queue, _ = new_queue(conn, sink.url)
    version = lambda: conn.execute("SELECT settings_version FROM queue_ext.webhook_targets WHERE queue_name = %s",
                                   [queue]).fetchone()[0]
    def changed_by(**settings):
        before = version()
        named = ", ".join(f"{k} => %s" for k in settings)
        conn.execute(f"SELECT queue_ext.alter_queue(%s, {named})", [queue, *settings.values()])
        return version() != before
    assert not changed_by(webhook_max_in_flight=7)
    assert not changed_by(webhook_secret=SECRET)
    assert changed_by(webhook_secret=SECRET + "x")
    assert changed_by(webhook_headers='{"X-Tenant": "a"}')
    assert changed_by(webhook_timeout="9 seconds")
    assert changed_by(callback_url=sink.url + "/callbacks")
    removed_and_set_again = version()
    conn.execute("SELECT queue_ext.alter_queue(%s, webhook_url => '', callback_url => '')", [queue])
    assert conn.execute("SELECT count(*) FROM queue_ext.webhook_targets WHERE queue_name = %s", [queue]).fetchone()[0] == 0
    conn.execute("SELECT queue_ext.alter_queue(%s, webhook_url => %s)", [queue, sink.url + "/again"])
    assert version() != removed_and_set_again


def test_return_unsent_gives_back_only_jobs_still_under_their_lease(conn, sink):
    # In one transaction, so that the dispatcher cannot claim the jobs first. The queue
    # publishes its jobs' changes, so the claim and its undoing are both in the log.
    queue, _ = new_queue(conn, sink.url, notify_events=True)
    with conn.transaction(force_rollback=True):
        enqueue_many(conn, queue, 3)
        claimed = conn.execute(
            "SELECT job_id, lease_token FROM queue_ext._dispatch_claim_rows('t', 10, '{}', '{}', %s, "
            "'30 seconds', ARRAY[%s]) ORDER BY job_id", [queue, queue]).fetchall()
        assert len(claimed) == 3
        (kept, kept_token), (other, _), (cancelled, cancelled_token) = claimed
        # Cancelled while it waited for a slot: the job is running, so the cancel is only asked.
        assert conn.execute("SELECT queue_ext.cancel_job(%s, 'not wanted')", [cancelled]).fetchone()[0] == "running"
        returned = conn.execute("SELECT queue_ext._return_unsent(%s, %s, 'not sent: the dispatcher stopped')",
                                [[kept, other, cancelled], [kept_token, uuid.uuid4(), cancelled_token]]).fetchone()[0]
        assert returned == 2, "a token that is not the job's lease returns nothing"
        rows = dict((r[0], r[1:]) for r in conn.execute(
            "SELECT id, status::text, attempt, lease_token IS NULL, started_at IS NULL FROM queue_ext.job_queue "
            "WHERE queue_name = %s", [queue]))
        assert rows[kept] == ("queued", 0, True, True), rows[kept]
        assert rows[other] == ("running", 1, False, False), rows[other]
        assert cancelled not in rows
        log = conn.execute("SELECT from_status::text, to_status::text, attempt, error FROM queue_ext.job_status_log "
                           "WHERE job_id = %s ORDER BY id", [kept]).fetchall()
        assert log[-2:] == [("queued", "running", 1, None), ("running", "queued", 1, "not sent: the dispatcher stopped")], log
        assert conn.execute("SELECT status::text, attempt, last_error FROM queue_ext.job_archive WHERE id = %s",
                            [cancelled]).fetchone() == ("cancelled", 0, "not wanted")


def test_return_unsent_gives_back_the_rate_limit_token(conn, sink):
    # One token an hour: the job returned unsent made no request, so its token comes back and
    # the next claim can take the job at once; a token that was not given back would hold it
    # for an hour.
    queue, _ = new_queue(conn, sink.url)
    key = f"unsent{next(_names)}"
    conn.execute("SELECT queue_ext.set_rate_limit(%s, 1, '1 hour')", [key])
    claim = ("SELECT job_id, lease_token FROM queue_ext._dispatch_claim_rows('t', 10, '{}', '{}', %s, "
             "'30 seconds', ARRAY[%s])")
    tokens = lambda: conn.execute("SELECT floor(queue_ext._tokens(r)) FROM queue_ext.rate_limits AS r WHERE key = %s",
                                  [key]).fetchone()[0]
    with conn.transaction(force_rollback=True):
        job = enqueue(conn, queue, rate_limit_key=key)
        (claimed, token), = conn.execute(claim, [queue, queue]).fetchall()
        assert claimed == job and tokens() == 0
        assert conn.execute("SELECT queue_ext._return_unsent(ARRAY[%s], ARRAY[%s], 'test')", [job, token]).fetchone()[0] == 1
        assert tokens() == 1
        assert [r[0] for r in conn.execute(claim, [queue, queue])] == [job], "claimed again at once"
        assert tokens() == 0


def test_ssrf_guard_refuses_metadata_and_private_addresses(conn):
    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/hook", "http://[::1]:1/x"):
        queue, _ = new_queue(conn, url.rsplit("/", 1)[0])
        conn.execute("SELECT queue_ext.alter_queue(%s, webhook_url => %s)", [queue, url])
        job = enqueue(conn, queue)
        dead = wait_status(conn, job, {"dead"})
        assert "SSRF guard refused" in dead[2], dead


def test_ssrf_guard_checks_names_after_resolution_and_reloads(conn, sink):
    # "localhost" resolves to 127.0.0.1, which the allowlist opens: delivered.
    queue, path = new_queue(conn, sink.url.replace("127.0.0.1", "localhost"))
    wait_status(conn, enqueue(conn, queue), {"completed"})
    # Narrow the allowlist and reload (SIGHUP): the same name is now refused after resolution.
    conn.execute("ALTER SYSTEM SET queue_ext.http_allowlist = '127.0.0.2'")
    conn.execute("SELECT pg_reload_conf()")
    try:
        time.sleep(1)
        job = enqueue(conn, queue)
        dead = wait_status(conn, job, {"dead"})
        assert "SSRF guard refused the target" in dead[2] and "resolves only to" in dead[2], dead
        assert "localhost" not in dead[2], dead  # producers read last_error: no host names in it
    finally:
        conn.execute("ALTER SYSTEM RESET queue_ext.http_allowlist")
        conn.execute("SELECT pg_reload_conf()")
        time.sleep(1)


def test_rolled_back_enqueue_sends_nothing(cluster, conn, sink):
    queue, path = new_queue(conn, sink.url)
    with cluster.connect() as other:
        other.autocommit = False
        other.execute("SELECT queue_ext.enqueue_job(%s, '{}')", [queue])
        other.rollback()
    committed = enqueue(conn, queue)  # proves the dispatcher was awake for this queue
    wait_status(conn, committed, {"completed"})
    time.sleep(0.5)
    assert [r.headers["webhook-id"] for r in sink.to(path)] == [f"msg_{committed}"]


def test_commit_wakes_the_dispatcher_at_once(conn, sink):
    # With a 60 s poll, only the commit's wake-up can deliver within the 10 s wait, and only
    # the finished request's own signal can get its outcome recorded before the next enqueue.
    queue, path = new_queue(conn, sink.url)
    conn.execute("ALTER SYSTEM SET queue_ext.poll_interval = '60s'")
    conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    try:
        latencies, recorded = [], []
        for i in range(20):
            t0 = time.time()
            job = enqueue(conn, queue, f'{{"n": {i}}}')
            wait_for(lambda: len(sink.to(path)) == i + 1, 10, interval=0.001, what="delivery")
            arrived = sink.to(path)[-1].at
            latencies.append(arrived - t0)
            wait_for(lambda: status(conn, job)[0] == "completed", 10, interval=0.001, what="completed")
            recorded.append(time.time() - arrived)
            time.sleep(0.05)
    finally:
        conn.execute("ALTER SYSTEM RESET queue_ext.poll_interval")
        conn.execute("SELECT pg_reload_conf()")
    latencies.sort()
    recorded.sort()
    # Polling would put the median near 30 s. (Latency figures: the benchmark.)
    assert latencies[len(latencies) // 2] < 5, latencies
    # Without the request's signal its outcome would wait for the next sweep (every second):
    # a median near 0.5 s.
    assert recorded[len(recorded) // 2] < 0.25, recorded


def test_tls_with_a_trusted_self_signed_certificate(conn, tls_sink):
    queue, path = new_queue(conn, tls_sink.url)
    job = enqueue(conn, queue, '{"secure": true}')
    wait_status(conn, job, {"completed"})
    assert tls_sink.to(path)[0].json() == {"secure": True}


def make_bad_certificates(ca, ca_key):
    """Two certificates the client must refuse, both for servers on 127.0.0.1 (an address the
    SSRF guard lets through here, so that only the certificate check can refuse them): one
    signed by the trusted CA but for another name, one for 127.0.0.1 but self-signed."""
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)
    wrong, wrong_key = TLS_DIR / "wrong-name.pem", TLS_DIR / "wrong-name.key"
    untrusted, untrusted_key = TLS_DIR / "untrusted.pem", TLS_DIR / "untrusted.key"
    if not wrong.exists():
        csr, ext = TLS_DIR / "wrong-name.csr", TLS_DIR / "wrong-name.cnf"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=wrong.example", "-keyout", str(wrong_key),
            "-out", str(csr))
        ext.write_text("basicConstraints=CA:FALSE\nsubjectAltName=DNS:wrong.example\n")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-extfile", str(ext), "-out", str(wrong))
    if not untrusted.exists():
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(untrusted_key), "-out", str(untrusted))
    return (wrong, wrong_key), (untrusted, untrusted_key)


@pytest.fixture(scope="module")
def bad_tls_sinks(tls_files):
    ca, _, _ = tls_files
    sinks = []
    for cert, key in make_bad_certificates(ca, TLS_DIR / "ca.key"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        sinks.append(Sink(tls_context=ctx))
    yield sinks
    for s in sinks:
        s.close()


def test_tls_certificate_is_checked(conn, tls_sink, bad_tls_sinks):
    # The same address and CA with a good certificate is delivered to: what fails below is
    # the certificate, not TLS, the address or the guard.
    good, good_path = new_queue(conn, tls_sink.url, max_attempts=1)
    wait_status(conn, enqueue(conn, good), {"completed"})
    assert len(tls_sink.to(good_path)) == 1
    for sink, why in zip(bad_tls_sinks, ("a name the certificate does not cover", "an untrusted issuer")):
        queue, path = new_queue(conn, sink.url, max_attempts=1)
        job = enqueue(conn, queue)
        dead = wait_status(conn, job, {"dead", "completed"})
        assert dead[0] == "dead", f"{why}: {dead}"
        assert "certificate" in dead[2].lower() and "SSRF" not in dead[2], f"{why}: {dead[2]}"
        assert sink.to(path) == [], f"{why}: the request went out over an unverified connection"


def test_completion_callbacks_are_sent_for_worker_and_sql_completions(conn, sink):
    queue, path = new_queue(conn, sink.url, callback_url=f"{sink.url}/callbacks-a")
    job = enqueue(conn, queue)
    wait_status(conn, job, {"completed"})
    wait_for(lambda: sink.to("/callbacks-a"), 10, what="callback")
    event = sink.to("/callbacks-a")[0]
    assert event.json()["type"] == "job.completed" and event.json()["job_id"] == str(job)
    assert verify(SECRET, event.headers, event.body)
    # A plain queue with a callback, finished by an external worker through SQL.
    conn.execute("SELECT queue_ext.create_queue('external_cb', callback_url => %s, max_attempts => 1)",
                 [f"{sink.url}/callbacks-b"])
    ok = enqueue(conn, "external_cb")
    bad = enqueue(conn, "external_cb")
    for expected in (ok, bad):
        claimed = conn.execute("SELECT job_id FROM queue_ext.get_next_job('external_cb', 'ext')").fetchone()[0]
        assert claimed == expected
    conn.execute("SELECT queue_ext.complete_job(%s, '{\"done\": 1}')", [ok])
    conn.execute("SELECT queue_ext.fail_job(%s, 'nope')", [bad])
    wait_for(lambda: len(sink.to("/callbacks-b")) == 2, 10, what="two callbacks")
    types = sorted(r.json()["type"] for r in sink.to("/callbacks-b"))
    assert types == ["job.completed", "job.dead"]


def test_process_jobs_delivers_synchronously_from_sql(conn, sink):
    queue, path = new_queue(conn, sink.url)
    # Enqueued and delivered in one transaction: the dispatcher cannot see these jobs before
    # the commit, so process_jobs must deliver every one of them itself.
    with conn.transaction():
        jobs = sorted(str(enqueue(conn, queue, f'{{"n": {i}}}')) for i in range(3))
        rows = conn.execute("SELECT job_id::text, outcome, status_code FROM queue_ext.process_jobs(%s, 10)",
                            [queue]).fetchall()
        assert sorted(rows) == [(job, "delivered", 200) for job in jobs]
        assert sorted(r.headers["webhook-id"] for r in sink.to(path)) == [f"msg_{job}" for job in jobs], \
            "the requests went out before the function returned"
    for job in jobs:
        assert status(conn, job)[0] == "completed"
    assert len(sink.to(path)) == 3, "each job sent once"
    with pytest.raises(psycopg.errors.UndefinedObject):
        conn.execute("SELECT * FROM queue_ext.process_jobs('nope')")
    conn.execute("SELECT queue_ext.create_queue('not_webhook')")
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
        conn.execute("SELECT * FROM queue_ext.process_jobs('not_webhook')")


def test_bad_webhook_settings_are_rejected(conn):
    for args, needle in [({"webhook_url": "ftp://x/y"}, "invalid webhook_url"),
                         ({"webhook_url": "http://x/", "webhook_method": "TRACE"}, "invalid webhook_method"),
                         ({"webhook_url": "http://x/", "webhook_headers": '{"Bad Header": "v"}'}, "invalid webhook header"),
                         ({"webhook_url": "http://x/", "webhook_headers": '{"X-A": "v\\r\\nX-B: injected"}'}, "invalid webhook header"),
                         ({"webhook_url": "http://x/", "webhook_timeout": "2 hours"}, "webhook_timeout")]:
        named = ", ".join(f"{k} => %s" for k in args)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=needle):
            conn.execute(f"SELECT queue_ext.create_queue('badhook', {named})", list(args.values()))


def test_producers_cannot_read_webhook_secrets(conn):
    conn.execute("DROP ROLE IF EXISTS hook_producer")
    conn.execute("CREATE ROLE hook_producer; GRANT queue_ext_producer TO hook_producer")
    conn.execute("SET ROLE hook_producer")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT secret FROM queue_ext.webhook_targets")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM queue_ext.webhook_deliveries")
    finally:
        conn.execute("RESET ROLE")


# --- crashes and restarts: each leaves every job delivered at least once, or dead with a reason.

def crash_scenario(cluster, sink, crash, jobs=30, delay=1.0):
    with cluster.connect() as conn:
        queue, path = new_queue(conn, sink.url, webhook_max_in_flight=10)
        sink.default(path, Reply(200, delay=delay))
        ids = [str(enqueue(conn, queue, f'{{"n": {i}}}')) for i in range(jobs)]
        wait_for(lambda: len(sink.to(path)) >= 5, 10, what="requests in flight")
    crash()
    cluster.wait_ready()
    with cluster.connect() as conn:
        wait_for(lambda: conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s",
                                      [queue]).fetchone()[0] == 0, 60, what="queue drained after the crash")
        done = {r[0]: r[1] for r in conn.execute(
            "SELECT id::text, status::text FROM queue_ext.job_archive WHERE queue_name = %s", [queue])}
    assert sorted(done) == sorted(ids), "every job completed, none lost"
    delivered = {r.headers["webhook-id"] for r in sink.to(path)}
    assert delivered == {f"msg_{i}" for i in ids}, "every job reached the receiver"
    return queue, path


def test_kill_9_of_the_dispatcher_loses_nothing(cluster, sink):
    def crash():
        with cluster.connect() as conn:
            pid = dispatcher_pid(conn)
        os.kill(pid, signal.SIGKILL)
        time.sleep(1)  # the postmaster resets every backend after a worker dies by signal
    queue, path = crash_scenario(cluster, sink, crash)
    with cluster.connect() as conn:
        redelivered = conn.execute(
            "SELECT count(*) FROM queue_ext.job_status_history WHERE queue_name = %s AND error LIKE '%%restarted%%'",
            [queue]).fetchone()[0]
    assert redelivered > 0, "jobs in flight at the crash were re-queued by the restarted dispatcher"


def test_kill_9_of_the_postmaster_loses_nothing(cluster, sink):
    crash_scenario(cluster, sink, cluster.kill_postmaster)


def test_the_delivery_log_keeps_to_its_retention_however_far_behind(conn):
    # A busy queue adds far more than one trimming batch (10,000 rows) a minute. 35,000
    # expired rows: a dispatcher that starts trims them all in batches that follow each other,
    # within seconds, and keeps every row younger than the retention (7 days).
    old_rows = ("SELECT count(*) FROM queue_ext.webhook_deliveries WHERE queue_name = 'retention_test' "
                "AND delivered_at < now() - interval '7 days'")
    conn.execute("""INSERT INTO queue_ext.webhook_deliveries (job_id, queue_name, attempt, url, outcome, delivered_at)
                    SELECT queue_ext.uuid_generate_v7(), 'retention_test', 1, 'http://127.0.0.1/', 'delivered',
                           now() - interval '8 days' - i * interval '1 second'
                    FROM generate_series(1, 35000) AS i""")
    conn.execute("""INSERT INTO queue_ext.webhook_deliveries (job_id, queue_name, attempt, url, outcome, delivered_at)
                    SELECT queue_ext.uuid_generate_v7(), 'retention_test', 1, 'http://127.0.0.1/', 'delivered',
                           now() - interval '6 days' - i * interval '1 second'
                    FROM generate_series(1, 3) AS i""")
    old = wait_for(lambda: dispatcher_pid(conn), 20, what="a running dispatcher")
    assert conn.execute("SELECT pg_terminate_backend(%s)", [old]).fetchone()[0]
    wait_for(lambda: dispatcher_pid(conn) not in (None, old), 20, what="the dispatcher back")
    wait_for(lambda: conn.execute(old_rows).fetchone()[0] == 0, 20, what="every expired row trimmed")
    kept = conn.execute("SELECT count(*) FROM queue_ext.webhook_deliveries WHERE queue_name = 'retention_test'")
    assert kept.fetchone()[0] == 3


def test_sigterm_drains_or_requeues_in_flight_work(cluster, sink):
    # pg_ctl restart -m fast sends SIGTERM; requests slower than shutdown_grace are released.
    def crash():
        subprocess.run(["bash", "scripts/cluster.sh", "restart", str(cluster.dir)], check=True,
                       cwd=Path(__file__).resolve().parent.parent)
    queue, _ = crash_scenario(cluster, sink, crash, delay=0.5)
    with cluster.connect() as conn:
        log = cluster.log_tail(200)
    assert "stopped" in log or "released" in log


def test_rate_limited_webhooks_are_paced_by_the_dispatcher(conn, sink):
    # The dispatcher sleeps until the next token, not until its next poll: with a 60 s poll,
    # 40 jobs at 20/s can only all arrive within the 20 s wait if it does.
    conn.execute("SELECT queue_ext.set_rate_limit('hook-rate', 20, '1 second')")
    conn.execute("ALTER SYSTEM SET queue_ext.poll_interval = '60s'")
    conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.5)
    queue, path = new_queue(conn, sink.url)
    try:
        conn.execute("SELECT queue_ext.enqueue_jobs(%s, array_fill('{}'::jsonb, ARRAY[40]), rate_limit_key => 'hook-rate')",
                     [queue])
        wait_for(lambda: len(sink.to(path)) == 40, 20, what="40 paced deliveries")
        times = sorted(r.at for r in sink.to(path))
        # Tokens are taken at the claim; arrival adds network jitter, hence the small margin.
        worst = max(sum(1 for t in times[i:] if t < s + 1.0) for i, s in enumerate(times))
        assert worst <= 25, f"{worst} deliveries within one second, limit 20/s"
        assert times[-1] - times[0] >= 0.8, "40 jobs at 20/s cannot all arrive at once"
    finally:
        wait_for(lambda: conn.execute("SELECT count(*) FROM queue_ext.job_queue WHERE queue_name = %s",
                                      [queue]).fetchone()[0] == 0, 15)
        conn.execute("SELECT queue_ext.remove_rate_limit('hook-rate')")
        conn.execute("ALTER SYSTEM RESET queue_ext.poll_interval")
        conn.execute("SELECT pg_reload_conf()")
